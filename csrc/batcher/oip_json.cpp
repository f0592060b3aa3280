#include "batcher/oip_json.h"

#include "common/datatypes.h"

#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>

namespace vivace {

// The datatypes the fast path parses; names come from the shared table (common/datatypes.h).
JsonType JsonTypeFromName(const std::string& datatype) {
  const DTypeInfo* d = FindDType(datatype.c_str());
  if (d == nullptr) return JsonType::kUnsupported;
  switch (d->type) {
    case DType::kBool: return JsonType::kBool;
    case DType::kInt32: return JsonType::kI32;
    case DType::kInt64: return JsonType::kI64;
    case DType::kFp32: return JsonType::kF32;
    case DType::kFp64: return JsonType::kF64;
    default: return JsonType::kUnsupported;
  }
}

namespace {

size_t TypeSize(JsonType t) {
  switch (t) {
    case JsonType::kBool: return 1;
    case JsonType::kI32: case JsonType::kF32: return 4;
    case JsonType::kI64: case JsonType::kF64: return 8;
    case JsonType::kUnsupported: return 0;
  }
  return 0;
}

// A cursor over the body; every method returns false to decline.
class Cursor {
 public:
  Cursor(const char* p, const char* end) : p_(p), end_(end) {}

  void SkipSpace() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\r' || *p_ == '\t')) ++p_;
  }
  bool Eat(char c) {
    SkipSpace();
    if (p_ < end_ && *p_ == c) {
      ++p_;
      return true;
    }
    return false;
  }
  bool Peek(char c) {
    SkipSpace();
    return p_ < end_ && *p_ == c;
  }
  bool AtEnd() {
    SkipSpace();
    return p_ == end_;
  }
  // An ASCII string without escapes or control characters (anything else declines: the
  // general decoder validates UTF-8, and an echoed id must stay valid JSON).
  bool String(const char** begin, const char** stop) {
    if (!Eat('"')) return false;
    *begin = p_;
    while (p_ < end_ && *p_ != '"') {
      const auto c = static_cast<unsigned char>(*p_);
      if (c == '\\' || c < 0x20 || c >= 0x80) return false;
      ++p_;
    }
    if (p_ == end_) return false;
    *stop = p_++;
    return true;
  }
  // The extent of one JSON number, checked against the JSON grammar (from_chars alone
  // would also take "inf", "01" or "1.").
  bool Number(const char** begin, const char** stop) {
    SkipSpace();
    const char* s = p_;
    const char* q = p_;
    if (q < end_ && *q == '-') ++q;
    if (q == end_) return false;
    if (*q == '0') {
      ++q;
    } else if (*q >= '1' && *q <= '9') {
      while (q < end_ && *q >= '0' && *q <= '9') ++q;
    } else {
      return false;
    }
    if (q < end_ && *q == '.') {
      ++q;
      if (q == end_ || *q < '0' || *q > '9') return false;
      while (q < end_ && *q >= '0' && *q <= '9') ++q;
    }
    if (q < end_ && (*q == 'e' || *q == 'E')) {
      ++q;
      if (q < end_ && (*q == '+' || *q == '-')) ++q;
      if (q == end_ || *q < '0' || *q > '9') return false;
      while (q < end_ && *q >= '0' && *q <= '9') ++q;
    }
    *begin = s;
    *stop = q;
    p_ = q;
    return true;
  }
  // Skips a whole array (nested arrays of scalars), recording its extent.
  bool ArraySpan(const char** begin, const char** stop) {
    SkipSpace();
    *begin = p_;
    int depth = 0;
    while (p_ < end_) {
      const char c = *p_;
      if (c == '[') {
        ++depth;
      } else if (c == ']') {
        if (--depth == 0) {
          *stop = ++p_;
          return true;
        }
      } else if (c == '"' || c == '{' || c == '}') {
        return false;  // strings and objects never appear in numeric data
      }
      ++p_;
    }
    return false;
  }
  bool Literal(const char* word) {
    SkipSpace();
    const size_t n = std::strlen(word);
    if (static_cast<size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0) return false;
    p_ += n;
    return true;
  }

 private:
  const char* p_;
  const char* end_;
};

bool Equals(const char* b, const char* e, const char* word) {
  const size_t n = std::strlen(word);
  return static_cast<size_t>(e - b) == n && std::memcmp(b, word, n) == 0;
}

struct ParsedInput {
  const char *name_b = nullptr, *name_e = nullptr, *type_b = nullptr, *type_e = nullptr;
  const char *data_b = nullptr, *data_e = nullptr;
  std::vector<int64_t> shape;
};

bool ParseInput(Cursor& c, ParsedInput* in) {
  if (!c.Eat('{')) return false;
  bool first = true;
  while (!c.Eat('}')) {
    if (!first && !c.Eat(',')) return false;
    first = false;
    const char *kb, *ke;
    if (!c.String(&kb, &ke) || !c.Eat(':')) return false;
    if (Equals(kb, ke, "name")) {
      if (in->name_b || !c.String(&in->name_b, &in->name_e)) return false;
    } else if (Equals(kb, ke, "datatype")) {
      if (in->type_b || !c.String(&in->type_b, &in->type_e)) return false;
    } else if (Equals(kb, ke, "shape")) {
      if (!in->shape.empty() || !c.Eat('[')) return false;
      bool first_dim = true;
      while (!c.Eat(']')) {
        if (!first_dim && !c.Eat(',')) return false;
        first_dim = false;
        const char *nb, *ne;
        if (!c.Number(&nb, &ne)) return false;
        int64_t dim;
        auto r = std::from_chars(nb, ne, dim);
        if (r.ec != std::errc() || r.ptr != ne) return false;
        in->shape.push_back(dim);
      }
      if (in->shape.empty()) return false;
    } else if (Equals(kb, ke, "data")) {
      if (in->data_b || !c.ArraySpan(&in->data_b, &in->data_e)) return false;
    } else {
      return false;  // parameters or unknown keys: the general path decides
    }
  }
  return in->name_b && in->type_b && in->data_b && !in->shape.empty();
}

template <typename T>
bool ParseInt(const char* b, const char* e, uint8_t* dst) {
  int64_t v;
  auto r = std::from_chars(b, e, v);
  if (r.ec != std::errc() || r.ptr != e) return false;  // fractions and exponents decline
  if (v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max()) return false;
  const T t = static_cast<T>(v);
  std::memcpy(dst, &t, sizeof(T));
  return true;
}

}  // namespace

OipJsonCodec::OipJsonCodec(std::string model_name, std::string model_version, std::vector<JsonTensor> inputs,
                           std::vector<JsonTensor> outputs)
    : model_name_(std::move(model_name)),
      model_version_(std::move(model_version)),
      inputs_(std::move(inputs)),
      outputs_(std::move(outputs)) {
  for (const auto* list : {&inputs_, &outputs_})
    for (const auto& t : *list) {
      if (t.type == JsonType::kUnsupported) usable_ = false;
      for (char ch : t.name)
        if (ch == '"' || ch == '\\' || static_cast<unsigned char>(ch) < 0x20) usable_ = false;
    }
  for (char ch : model_name_ + model_version_)
    if (ch == '"' || ch == '\\' || static_cast<unsigned char>(ch) < 0x20) usable_ = false;
}

int64_t OipJsonCodec::Parse(const char* body, size_t size, std::vector<std::pair<const char*, const char*>>* spans,
                            std::string* id, bool* has_id) const {
  if (!usable_) return 0;
  *has_id = false;
  Cursor c(body, body + size);
  std::vector<ParsedInput> parsed;
  bool have_inputs = false, first = true;
  if (!c.Eat('{')) return 0;
  while (!c.Eat('}')) {
    if (!first && !c.Eat(',')) return 0;
    first = false;
    const char *kb, *ke;
    if (!c.String(&kb, &ke) || !c.Eat(':')) return 0;
    if (Equals(kb, ke, "id")) {
      const char *ib, *ie;
      if (!c.String(&ib, &ie)) return 0;
      id->assign(ib, ie);
      *has_id = true;
    } else if (Equals(kb, ke, "inputs")) {
      if (have_inputs || !c.Eat('[')) return 0;
      have_inputs = true;
      bool first_input = true;
      while (!c.Eat(']')) {
        if (!first_input && !c.Eat(',')) return 0;
        first_input = false;
        parsed.emplace_back();
        if (!ParseInput(c, &parsed.back())) return 0;
      }
    } else {
      return 0;  // parameters, outputs, unknown keys
    }
  }
  if (!c.AtEnd() || !have_inputs || parsed.size() != inputs_.size()) return 0;
  spans->assign(inputs_.size(), {nullptr, nullptr});
  int64_t rows = -1;
  for (const ParsedInput& in : parsed) {
    size_t i = 0;
    while (i < inputs_.size() && !Equals(in.name_b, in.name_e, inputs_[i].name.c_str())) ++i;
    if (i == inputs_.size() || (*spans)[i].first != nullptr) return 0;
    const JsonTensor& spec = inputs_[i];
    if (!Equals(in.type_b, in.type_e, spec.datatype.c_str())) return 0;
    if (in.shape.size() != spec.row_shape.size() + 1 || in.shape[0] < 1) return 0;
    for (size_t d = 0; d < spec.row_shape.size(); ++d)
      if (in.shape[d + 1] != spec.row_shape[d]) return 0;
    if (rows != -1 && in.shape[0] != rows) return 0;
    rows = in.shape[0];
    (*spans)[i] = {in.data_b, in.data_e};
  }
  return rows;
}

bool OipJsonCodec::Fill(const std::vector<std::pair<const char*, const char*>>& spans, int64_t rows,
                        uint8_t* dest) const {
  for (size_t i = 0; i < inputs_.size(); ++i) {
    const JsonTensor& spec = inputs_[i];
    const size_t width = TypeSize(spec.type);
    const int64_t want = spec.row_elements * rows;
    int64_t count = 0;
    Cursor c(spans[i].first, spans[i].second);
    // Flattened walk over nested arrays: '[' and ']' only change depth; commas separate.
    int depth = 0;
    bool expect_value = true, after_comma = false;
    while (!c.AtEnd()) {
      if (c.Eat('[')) {
        if (!expect_value) return false;
        ++depth;
        after_comma = false;
        continue;
      }
      if (c.Eat(']')) {
        if (--depth < 0 || after_comma) return false;
        expect_value = false;
        continue;
      }
      if (c.Eat(',')) {
        if (expect_value) return false;
        expect_value = true;
        after_comma = true;
        continue;
      }
      after_comma = false;
      if (!expect_value || depth == 0 || count >= want) return false;
      uint8_t* dst = dest + static_cast<size_t>(count) * width;
      if (spec.type == JsonType::kBool) {
        if (c.Literal("true"))
          *dst = 1;
        else if (c.Literal("false"))
          *dst = 0;
        else
          return false;
      } else {
        const char *nb, *ne;
        if (!c.Number(&nb, &ne)) return false;
        switch (spec.type) {
          case JsonType::kI32:
            if (!ParseInt<int32_t>(nb, ne, dst)) return false;
            break;
          case JsonType::kI64:
            if (!ParseInt<int64_t>(nb, ne, dst)) return false;
            break;
          case JsonType::kF32:
          case JsonType::kF64: {
            double v;
            auto r = std::from_chars(nb, ne, v);
            if (r.ec != std::errc() || r.ptr != ne) return false;  // out of range declines
            if (spec.type == JsonType::kF32) {
              const float f = static_cast<float>(v);
              std::memcpy(dst, &f, 4);
            } else {
              std::memcpy(dst, &v, 8);
            }
            break;
          }
          default:
            return false;
        }
      }
      ++count;
      expect_value = false;
    }
    if (depth != 0 || count != want) return false;
    dest += static_cast<size_t>(want) * width;
  }
  return true;
}

std::string OipJsonCodec::Format(const uint8_t* output, int64_t rows, const std::string& id, bool has_id) const {
  std::string out;
  out.reserve(96 + static_cast<size_t>(rows) * 16 * outputs_.size());
  out += "{\"model_name\":\"";
  out += model_name_;
  out += "\",\"model_version\":\"";
  out += model_version_;
  out += "\",\"outputs\":[";
  char buf[32];
  for (size_t j = 0; j < outputs_.size(); ++j) {
    const JsonTensor& spec = outputs_[j];
    if (j) out += ',';
    out += "{\"name\":\"";
    out += spec.name;
    out += "\",\"datatype\":\"";
    out += spec.datatype;
    out += "\",\"shape\":[";
    out += std::to_string(rows);
    for (int64_t d : spec.row_shape) {
      out += ',';
      out += std::to_string(d);
    }
    out += "],\"data\":[";
    const int64_t n = spec.row_elements * rows;
    const size_t width = TypeSize(spec.type);
    for (int64_t k = 0; k < n; ++k) {
      if (k) out += ',';
      const uint8_t* src = output + static_cast<size_t>(k) * width;
      std::to_chars_result r{buf, std::errc()};
      switch (spec.type) {
        case JsonType::kBool:
          out += *src ? "true" : "false";
          continue;
        case JsonType::kI32: {
          int32_t v;
          std::memcpy(&v, src, 4);
          r = std::to_chars(buf, buf + sizeof(buf), v);
          break;
        }
        case JsonType::kI64: {
          int64_t v;
          std::memcpy(&v, src, 8);
          r = std::to_chars(buf, buf + sizeof(buf), v);
          break;
        }
        case JsonType::kF32: {
          float v;
          std::memcpy(&v, src, 4);
          if (!std::isfinite(v)) {  // JSON has no NaN/Infinity; msgspec writes null too
            out += "null";
            continue;
          }
          r = std::to_chars(buf, buf + sizeof(buf), v);  // shortest round-trip form
          break;
        }
        case JsonType::kF64: {
          double v;
          std::memcpy(&v, src, 8);
          if (!std::isfinite(v)) {
            out += "null";
            continue;
          }
          r = std::to_chars(buf, buf + sizeof(buf), v);
          break;
        }
        case JsonType::kUnsupported:
          break;
      }
      out.append(buf, r.ptr);
    }
    out += "]}";
    output += static_cast<size_t>(n) * width;
  }
  out += ']';
  if (has_id) {
    out += ",\"id\":\"";
    out += id;
    out += '"';
  }
  out += '}';
  return out;
}

}  // namespace vivace

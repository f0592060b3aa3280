#include "otlp.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <random>
#include <thread>

namespace vivace::otlp {
namespace {

// Wire tags (field number << 3 | wire type) of the messages written here.
constexpr uint8_t kScopeSpansSpan = 0x12;
constexpr uint8_t kSpanTraceId = 0x0A, kSpanId = 0x12, kSpanTraceState = 0x1A, kSpanParentId = 0x22,
                  kSpanName = 0x2A, kSpanKind = 0x30, kSpanStart = 0x39, kSpanEnd = 0x41, kSpanAttribute = 0x4A;
constexpr char kStatusError[] = "\x7A\x02\x18\x02";  // Span.status { code: STATUS_CODE_ERROR }
constexpr uint8_t kKeyValueKey = 0x0A, kKeyValueValue = 0x12;
constexpr uint8_t kAnyString = 0x0A, kAnyInt = 0x18;
constexpr int kKindInternal = 1, kKindServer = 2;

using SpanId = std::array<uint8_t, 8>;

// splitmix64, seeded per thread: ids need to be unique, not secret.
class IdSource {
 public:
  IdSource() {
    std::random_device device;
    state_ = (static_cast<uint64_t>(device()) << 32) ^ device() ^
             static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
             std::hash<std::thread::id>{}(std::this_thread::get_id());
  }
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  void Fill(uint8_t* out, size_t size) {  // never all zero: W3C ids must not be
    for (size_t at = 0; at < size; at += 8) {
      uint64_t v = Next() | (at == 0 ? 1 : 0);
      std::memcpy(out + at, &v, std::min<size_t>(8, size - at));
    }
  }

 private:
  uint64_t state_;
};

IdSource& ThreadIds() {
  thread_local IdSource ids;
  return ids;
}

void Varint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

void Bytes(uint8_t tag, const void* data, size_t size, std::string* out) {
  out->push_back(static_cast<char>(tag));
  Varint(size, out);
  out->append(static_cast<const char*>(data), size);
}

void Fixed64(uint8_t tag, uint64_t v, std::string* out) {
  out->push_back(static_cast<char>(tag));
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

size_t VarintSize(uint64_t v) {
  size_t size = 1;
  for (; v >= 0x80; v >>= 7) ++size;
  return size;
}

// Span.attributes: KeyValue { key, value: AnyValue }, the AnyValue's one field given by
// its tag and payload size; the caller appends the payload.
void AttributeHead(std::string_view key, uint8_t value_tag, size_t value_size, std::string* out) {
  const size_t any_value = 1 + value_size;
  const size_t key_value = 1 + VarintSize(key.size()) + key.size() + 1 + VarintSize(any_value) + any_value;
  out->push_back(static_cast<char>(kSpanAttribute));
  Varint(key_value, out);
  Bytes(kKeyValueKey, key.data(), key.size(), out);
  out->push_back(static_cast<char>(kKeyValueValue));
  Varint(any_value, out);
  out->push_back(static_cast<char>(value_tag));
}

void StringAttribute(std::string_view key, std::string_view value, std::string* out) {
  AttributeHead(key, kAnyString, VarintSize(value.size()) + value.size(), out);
  Varint(value.size(), out);
  out->append(value);
}

void IntAttribute(std::string_view key, int64_t value, std::string* out) {
  AttributeHead(key, kAnyInt, VarintSize(static_cast<uint64_t>(value)), out);
  Varint(static_cast<uint64_t>(value), out);
}

// The fields every span has; the caller appends attributes and status to `span`.
void SpanHead(const uint8_t* trace_id, const SpanId& id, const uint8_t* parent_id, std::string_view trace_state,
              std::string_view name, int kind, int64_t start, int64_t end, std::string* span) {
  Bytes(kSpanTraceId, trace_id, 16, span);
  Bytes(kSpanId, id.data(), id.size(), span);
  if (!trace_state.empty()) Bytes(kSpanTraceState, trace_state.data(), trace_state.size(), span);
  if (parent_id != nullptr) Bytes(kSpanParentId, parent_id, 8, span);
  Bytes(kSpanName, name.data(), name.size(), span);
  span->push_back(static_cast<char>(kSpanKind));
  Varint(static_cast<uint64_t>(kind), span);
  Fixed64(kSpanStart, static_cast<uint64_t>(start), span);
  Fixed64(kSpanEnd, static_cast<uint64_t>(std::max(start, end)), span);
}

}  // namespace

int AppendRequestSpans(const RequestSpans& r, std::string* out) {
  IdSource& ids = ThreadIds();
  std::array<uint8_t, 16> new_trace{};
  const uint8_t* trace_id = r.trace_id;
  if (trace_id == nullptr) {
    ids.Fill(new_trace.data(), new_trace.size());
    trace_id = new_trace.data();
  }
  thread_local std::string span;
  int count = 0;
  auto emit = [&] {
    Bytes(kScopeSpansSpan, span.data(), span.size(), out);
    ++count;
  };
  auto new_id = [&] {
    SpanId id;
    ids.Fill(id.data(), id.size());
    return id;
  };

  const bool infer = !r.model.empty();
  const std::string_view path = r.target.substr(0, r.target.find('?'));
  std::string name(r.method);
  name += ' ';
  if (infer) {
    name += "/v2/models/";
    name += r.model;
    name += "/infer";
  } else {
    name += path;
  }
  const SpanId root = new_id();
  span.clear();
  SpanHead(trace_id, root, r.parent_id, r.trace_state, name, kKindServer, r.received,
           std::max({r.answered, r.batch_end, r.parsed, r.received}), &span);
  StringAttribute("http.request.method", r.method, &span);
  StringAttribute("url.path", path, &span);
  if (infer) {
    StringAttribute("vivace.model", r.model, &span);
    StringAttribute("vivace.model_version", r.version, &span);
  }
  StringAttribute("vivace.frontend", r.frontend, &span);
  if (r.status != 0) IntAttribute("http.response.status_code", r.status, &span);
  if (infer && r.rows != 0) IntAttribute("vivace.rows", r.rows, &span);
  if (r.status >= 500) span.append(kStatusError, sizeof(kStatusError) - 1);
  emit();
  if (!infer) return count;

  auto child = [&](const uint8_t* parent, const SpanId& id, std::string_view child_name, int64_t start, int64_t end) {
    span.clear();
    SpanHead(trace_id, id, parent, {}, child_name, kKindInternal, start, end, &span);
  };
  if (r.received != 0 && r.parsed != 0) {
    child(root.data(), new_id(), "http.receive", r.received, r.parsed);
    emit();
  }
  if (r.enqueued != 0 && r.batch_start != 0) {
    child(root.data(), new_id(), "batcher.queue", r.enqueued, r.batch_start);
    emit();
  }
  if (r.batch_start != 0 && r.batch_end != 0) {
    const SpanId batch = new_id();
    child(root.data(), batch, "batch.execute", r.batch_start, r.batch_end);
    IntAttribute("vivace.batch_size", r.batch_rows, &span);
    emit();
    if (r.features != 0) {
      child(batch.data(), new_id(), "features.lookup", r.batch_start, r.features);
      emit();
    }
  }
  if (r.answered != 0) {
    child(root.data(), new_id(), "http.response", r.batch_end != 0 ? r.batch_end : r.parsed, r.answered);
    emit();
  }
  return count;
}

}  // namespace vivace::otlp

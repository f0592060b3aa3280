// libFuzzer harness for the native OIP JSON fast path (csrc/batcher/oip_json.cpp): the
// bytes a client sends go straight into OipJsonCodec::Parse and Fill, and what they fill
// goes out again through Format. Any sanitizer report or abort is a finding; a declined
// body is a normal outcome.
//
// Input layout: two signature bytes, then the HTTP body.
//   byte 0: datatype of input "x" (% 5: BOOL, INT32, INT64, FP32, FP64) and its width
//           (1 + (byte / 5) % 4)
//   byte 1: bit 0 adds a second input "y" of row shape [2] whose datatype is (byte >> 1) % 5
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "batcher/oip_json.h"

namespace {

using vivace::JsonTensor;
using vivace::JsonType;

const char* const kTypeNames[] = {"BOOL", "INT32", "INT64", "FP32", "FP64"};
constexpr int64_t kTypeSizes[] = {1, 4, 8, 4, 8};

JsonTensor Tensor(const char* name, unsigned type, std::vector<int64_t> row_shape) {
  int64_t elements = 1;
  for (int64_t d : row_shape) elements *= d;
  return {name, kTypeNames[type], vivace::JsonTypeFromName(kTypeNames[type]), std::move(row_shape), elements};
}


}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const unsigned x_type = data[0] % 5, x_width = 1 + (data[0] / 5) % 4;
  const bool with_y = data[1] & 1;
  const unsigned y_type = (data[1] >> 1) % 5;
  std::vector<JsonTensor> inputs{Tensor("x", x_type, {x_width})};
  std::vector<JsonTensor> outputs{Tensor("out", x_type, {x_width})};
  if (with_y) {
    inputs.push_back(Tensor("y", y_type, {2}));
    outputs.push_back(Tensor("out_y", y_type, {2}));
  }
  int64_t row_bytes = 0;
  for (size_t i = 0; i < inputs.size(); ++i)
    row_bytes += inputs[i].row_elements * kTypeSizes[i == 0 ? x_type : y_type];
  const vivace::OipJsonCodec codec("m", "1", inputs, outputs);
  if (!codec.usable()) abort();  // every signature above has a fast path

  // The body in its own allocation, so ASan sees any read past its end.
  const size_t body_size = size - 2;
  std::vector<char> body(data + 2, data + size);
  std::vector<std::pair<const char*, const char*>> spans;
  std::string id;
  bool has_id = false;
  const int64_t rows = codec.Parse(body.data(), body_size, &spans, &id, &has_id);
  if (rows < 0) abort();
  if (rows == 0) return 0;
  if (spans.size() != inputs.size()) abort();
  for (const auto& [b, e] : spans)
    if (b < body.data() || e > body.data() + body_size || b >= e) abort();
  // As the binding (PyBatcher::SubmitJson) does before sizing the request buffer: every
  // element takes at least one byte of the body, so more rows than that are declined.
  int64_t row_elements = 0;
  for (const JsonTensor& t : inputs) row_elements += t.row_elements;
  if (rows > static_cast<int64_t>(body_size) / row_elements) return 0;
  std::vector<uint8_t> buffer(static_cast<size_t>(rows * row_bytes));
  if (!codec.Fill(spans, rows, buffer.data())) return 0;
  // Outputs mirror the inputs, so the filled buffer is a valid output block.
  const std::string response = codec.Format(buffer.data(), rows, id, has_id);
  if (response.size() < 2 || response.front() != '{' || response.back() != '}') abort();
  return 0;
}

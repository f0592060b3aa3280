// Fast path for the most common inference request: an OIP JSON body with inputs given as
// JSON number arrays, no parameters and no output selection. Numbers are parsed straight
// into the pooled request buffer; the response body is formatted from the output bytes.
//
// Anything else (binary tensors, parameters, escapes in strings, unusual datatypes, and
// every malformed request) is declined, and the caller takes the general path, which
// owns all error reporting. So this code never has to explain a refusal, only to be
// exact about what it accepts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace vivace {

enum class JsonType { kBool, kI32, kI64, kF32, kF64, kUnsupported };

JsonType JsonTypeFromName(const std::string& datatype);

struct JsonTensor {
  std::string name;
  std::string datatype;
  JsonType type;
  std::vector<int64_t> row_shape;
  int64_t row_elements;
};

class OipJsonCodec {
 public:
  OipJsonCodec(std::string model_name, std::string model_version, std::vector<JsonTensor> inputs,
               std::vector<JsonTensor> outputs);

  // True when every input and output datatype has a fast path.
  bool usable() const { return usable_; }

  // Parses `body`. On success returns the row count and fills *spans (one per input, in
  // signature order), *id and *has_id; returns 0 when the request must take the general path.
  int64_t Parse(const char* body, size_t size, std::vector<std::pair<const char*, const char*>>* spans,
                std::string* id, bool* has_id) const;
  // Writes the numbers of each data span into `dest` (inputs back to back, `rows` rows
  // each). Returns false on any mismatch in count or type.
  bool Fill(const std::vector<std::pair<const char*, const char*>>& spans, int64_t rows, uint8_t* dest) const;

  // The response body for a finished request (outputs back to back in `output`).
  std::string Format(const uint8_t* output, int64_t rows, const std::string& id, bool has_id) const;

 private:
  std::string model_name_, model_version_;
  std::vector<JsonTensor> inputs_, outputs_;
  bool usable_ = true;
};

}  // namespace vivace

// The native parts of a Python `vivace._core.Batcher`, for other native components that
// take requests straight into it (the HTTP front end's fast routes).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>

#include "batcher/batcher.h"
#include "batcher/oip_json.h"

namespace vivace {

struct JsonEndpoint {
  std::shared_ptr<Batcher> batcher;
  std::shared_ptr<const OipJsonCodec> codec;
  int64_t row_elements;  // elements per row over all inputs
};

// Raises ValueError when the batcher's JSON fast path is off.
JsonEndpoint JsonEndpointOf(pybind11::handle batcher);

// The batcher of a Python Batcher whose batches run a native kernel (no GIL needed), for
// a native thread to run them; raises ValueError otherwise.
std::shared_ptr<Batcher> NativeBatcherOf(pybind11::handle batcher);

}  // namespace vivace

#include "batcher/batch_hooks.h"

#include <stdexcept>
#include <string>
#include <utility>

#include "featcache/featcache.h"
#include "sketch/sketch.h"

namespace vivace {

void NativeForward::Run(Batcher& batcher, int executor, int64_t rows) const {
  const int rc = fn(model, reinterpret_cast<const float*>(batcher.input_buffer(executor, 0)), rows,
                    reinterpret_cast<float*>(batcher.output_buffer(executor, 0)));
  if (rc != 0) throw std::runtime_error("native kernel failed with code " + std::to_string(rc));
}

void AttachFeatureLookup(Batcher& batcher, std::shared_ptr<featcache::FeatureLookup> lookup,
                         std::vector<float*> feature_rows) {
  const auto& c = batcher.config();
  if (c.input_row_bytes.size() != 1 || c.input_row_bytes[0] != 8)
    throw std::invalid_argument("serving by entity id needs one INT64 input of shape [-1, 1]");
  if (c.output_row_bytes.empty() || c.output_row_bytes.back() != 1)
    throw std::invalid_argument("serving by entity id needs a last BOOL [-1, 1] output for the found flags");
  if (feature_rows.size() != static_cast<size_t>(c.executors))
    throw std::invalid_argument("one feature buffer per executor is needed");
  Batcher* b = &batcher;
  const size_t found_output = c.output_row_bytes.size() - 1;
  batcher.set_before_batch([b, lookup = std::move(lookup), rows_of = std::move(feature_rows), found_output](
                               int executor, int64_t rows) {
    lookup->LookupInto(reinterpret_cast<const int64_t*>(b->input_buffer(executor, 0)), static_cast<size_t>(rows),
                       rows_of[static_cast<size_t>(executor)], b->output_buffer(executor, found_output));
  });
}

void AttachDriftSketches(Batcher& batcher, std::shared_ptr<DriftSketch> inputs,
                         std::shared_ptr<DriftSketch> outputs, std::vector<float*> feature_rows,
                         int64_t input_stride) {
  const auto& c = batcher.config();
  const int64_t output_stride = c.output_row_bytes.empty() ? 0 : c.output_row_bytes[0] / 4;
  if (inputs && inputs->min_row_stride() > input_stride)
    throw std::invalid_argument("input sketch reads past the input row");
  if (outputs && outputs->min_row_stride() > output_stride)
    throw std::invalid_argument("prediction sketch reads past the output row");
  Batcher* b = &batcher;
  batcher.set_after_batch([b, inputs = std::move(inputs), outputs = std::move(outputs),
                           rows_of = std::move(feature_rows), input_stride, output_stride](int executor,
                                                                                          int64_t rows) {
    const float* model_inputs = rows_of.empty() ? reinterpret_cast<const float*>(b->input_buffer(executor, 0))
                                                : rows_of[static_cast<size_t>(executor)];
    if (inputs) inputs->Update(model_inputs, rows, input_stride);
    if (outputs) outputs->Update(reinterpret_cast<const float*>(b->output_buffer(executor, 0)), rows, output_stride);
  });
}

}  // namespace vivace

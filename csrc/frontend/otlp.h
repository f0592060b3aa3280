// OTLP/protobuf encoding of the server's request spans (opentelemetry-proto trace/v1 Span,
// common/v1 KeyValue and AnyValue), written by hand: the one writer of the span layout,
// for both front ends. The native front end encodes its traced requests here in bulk; the
// Python path calls it per traced request; monitor/tracing.py SpanExport wraps the bytes
// in an ExportTraceServiceRequest and POSTs them.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace vivace::otlp {

// One traced request: what the spans say. Times in Unix-epoch ns; 0: did not happen.
struct RequestSpans {
  const uint8_t* trace_id = nullptr;   // 16 bytes; null: the request starts a new trace
  const uint8_t* parent_id = nullptr;  // 8 bytes; null: the server span is the trace's root
  std::string_view trace_state, method, target, frontend;
  // An infer call's model and version; an empty model: another route, which gets the
  // server span alone, named after its method and path.
  std::string_view model, version;
  int status = 0;  // the response's HTTP status; 0: none was sent
  int64_t rows = 0, batch_rows = 0;
  int64_t received = 0, parsed = 0, enqueued = 0, batch_start = 0, features = 0, batch_end = 0, answered = 0;
};

// Appends the request's spans to `out`, each as one ScopeSpans.spans field (number 2,
// length-delimited), and returns how many: the server span (status ERROR on a 5xx) and,
// for an infer call, under it http.receive, batcher.queue, batch.execute (with
// vivace.batch_size; features.lookup under it when features were looked up) and
// http.response, each only when both its ends were timed. Span ids are random, drawn
// from a per-thread generator.
int AppendRequestSpans(const RequestSpans& request, std::string* out);

}  // namespace vivace::otlp

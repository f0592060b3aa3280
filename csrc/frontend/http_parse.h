// Pure HTTP/1.1 request framing: bytes in, a result or an error code out. No connection,
// no I/O, no allocation (results point into the caller's buffer), so it can be fuzzed and
// tested alone. The front end (frontend.cpp) maps the error codes to HTTP statuses.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vivace::http {

enum class Error {
  kOk = 0,
  kIncomplete,            // more bytes are needed
  kBareLf,                // a line ended with LF alone
  kHeadTooLarge,          // no end of head within the header limit
  kBadRequestLine,
  kTooManyHeaders,        // more header lines than allowed
  kBadHeaderLine,
  kBadContentLength,
  kBodyTooLarge,          // Content-Length, or the chunks so far, over the body limit
  kBadTransferEncoding,
  kLengthAndChunked,      // both Content-Length and Transfer-Encoding: a smuggling vector
  kBadChunkSize,
  kBadChunkEnd,           // chunk data not followed by CRLF
  kBadTrailer,
  kTrailersTooLarge,
};

struct Limits {
  int64_t max_body_bytes = 64 << 20;
  int64_t max_header_bytes = 64 << 10;
  int64_t max_headers = 100;
};

struct Span {
  const char* data = nullptr;
  size_t size = 0;
};

struct RequestHead {
  Span method;
  Span target;  // origin-form: the absolute-form's scheme and authority are dropped (RFC 9112 3.2.2)
  bool http10 = false;
  bool keep_alive = true;
  bool chunked = false;
  bool has_length = false;
  int64_t content_length = 0;
  bool expect_continue = false;
  bool has_header_length = false, has_authorization = false;
  Span header_length;  // inference-header-content-length
  Span authorization;
  bool has_traceparent = false, has_tracestate = false;  // W3C trace context (the last one given)
  Span traceparent, tracestate;
};

// A W3C trace-context `traceparent` value (version-traceid-parentid-flags). Parsing
// follows the recommendation's rules: lowercase hex only, version ff refused, all-zero
// trace or parent ids refused, version 00 exactly 55 characters, a later version at least
// that and a '-' after them. Anything else is treated as if the header were absent.
struct TraceParent {
  uint8_t trace_id[16] = {};
  uint8_t parent_id[8] = {};
  uint8_t flags = 0;
  bool sampled() const { return (flags & 1) != 0; }
};
bool ParseTraceparent(const char* p, size_t size, TraceParent* out);

// Leading empty lines before a request line (RFC 9112 2.2): how many bytes to skip.
size_t SkipEmptyLines(const char* p, size_t avail);

// Looks for the end of a request head in p[0, avail). `scanned` carries how far earlier
// calls searched (0 at first), so a head trickling in byte by byte costs linear time.
// kOk sets *head_size (request line + headers + blank line).
Error FindHeadEnd(const char* p, size_t avail, const Limits& limits, size_t* scanned, size_t* head_size);

// Parses a whole head (as found by FindHeadEnd: ends with CRLF CRLF, no bare LF).
Error ParseRequestHead(const char* p, size_t head_size, const Limits& limits, RequestHead* out);

// One step of a chunked body: reads the chunk at p[0, avail). `decoded` is the body size
// decoded so far (for the body limit). kOk: *consumed bytes were used; the chunk's data is
// *data (size 0 with *last set: the last chunk and its trailers were read).
struct Chunk {
  Span data;
  size_t consumed = 0;
  bool last = false;
};
Error DecodeChunk(const char* p, size_t avail, uint64_t decoded, const Limits& limits, Chunk* out);

}  // namespace vivace::http

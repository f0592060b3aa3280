// libFuzzer harness for the pure HTTP/1.1 request framing (csrc/frontend/http_parse.cpp):
// every byte of it comes from clients. Besides sanitizer reports, it aborts when a result
// breaks the framing invariants: spans lie inside the input, a head found incrementally
// (byte by byte, as a slow client sends it) is the head found at once, and a chunked
// body decodes the same whether its bytes arrive whole or one at a time.
//
// Input layout: byte 0 picks small limits (so that the limit paths are reached), the rest
// is the bytes a client sent.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "frontend/http_parse.h"

namespace {

using vivace::http::Error;

void Check(bool ok) {
  if (!ok) std::abort();
}

bool Inside(vivace::http::Span s, const char* p, size_t size) {
  if (s.size == 0) return true;
  return (s.data >= p && s.data + s.size <= p + size) || (s.size == 1 && s.data[0] == '/');
}

// Decodes a whole chunked body from p, feeding it `step` bytes more at a time (0: whole).
Error Decode(const char* p, size_t size, size_t step, const vivace::http::Limits& limits, std::string* body,
             size_t* used) {
  size_t pos = 0, avail = step == 0 ? size : 0;
  for (;;) {
    vivace::http::Chunk chunk;
    const Error e = vivace::http::DecodeChunk(p + pos, avail - pos, body->size(), limits, &chunk);
    if (e == Error::kIncomplete && avail < size) {
      avail = std::min(size, avail + step);
      continue;
    }
    if (e != Error::kOk) return e;
    Check(chunk.consumed > 0 && chunk.consumed <= avail - pos);
    Check(Inside(chunk.data, p + pos, chunk.consumed));
    body->append(chunk.data.data, chunk.data.size);
    Check(body->size() <= static_cast<size_t>(limits.max_body_bytes));
    pos += chunk.consumed;
    if (chunk.last) {
      *used = pos;
      return Error::kOk;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  vivace::http::Limits limits;
  if (data[0] & 1) limits = {64, 256, 4};
  const char* p = reinterpret_cast<const char*>(data + 1);
  size = size - 1;

  const size_t skip = vivace::http::SkipEmptyLines(p, size);
  Check(skip <= size && skip % 2 == 0);
  const char* q = p + skip;
  const size_t avail = size - skip;

  size_t scanned = 0, head_size = 0;
  const Error found = vivace::http::FindHeadEnd(q, avail, limits, &scanned, &head_size);
  // Byte by byte: the same answer.
  size_t scanned_slow = 0, head_slow = 0;
  Error slow = Error::kIncomplete;
  for (size_t n = 1; n <= avail && slow == Error::kIncomplete; ++n)
    slow = vivace::http::FindHeadEnd(q, n, limits, &scanned_slow, &head_slow);
  if (avail > 0) Check(slow == found);
  if (found != Error::kOk) return 0;
  Check(head_slow == head_size && head_size >= 4 && head_size <= avail);
  Check(std::memcmp(q + head_size - 4, "\r\n\r\n", 4) == 0);

  vivace::http::RequestHead head;
  if (vivace::http::ParseRequestHead(q, head_size, limits, &head) != Error::kOk) return 0;
  Check(head.method.size > 0 && Inside(head.method, q, head_size));
  Check(head.target.size > 0 && Inside(head.target, q, head_size));
  Check(Inside(head.header_length, q, head_size) && Inside(head.authorization, q, head_size));
  Check(!(head.chunked && head.has_length));
  Check(head.content_length >= 0 && head.content_length <= limits.max_body_bytes);
  if (!head.chunked) return 0;

  const char* body = q + head_size;
  const size_t body_avail = avail - head_size;
  std::string whole, trickled;
  size_t used_whole = 0, used_trickled = 0;
  const Error a = Decode(body, body_avail, 0, limits, &whole, &used_whole);
  const Error b = Decode(body, body_avail, 1, limits, &trickled, &used_trickled);
  Check(a == b);
  if (a == Error::kOk) Check(whole == trickled && used_whole == used_trickled && used_whole <= body_avail);
  return 0;
}

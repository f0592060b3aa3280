// Unit test of the front end's pure parts, the HTTP/1.1 request framing
// (csrc/frontend/http_parse.cpp) and the OTLP span encoder (otlp.cpp), run under ASan/UBSan
// by tests/test_native_sanitizers.py: every input is copied into a buffer of exactly its
// size, so a read past the end is a sanitizer report. Exits non-zero on the first wrong
// answer. (tests/test_tracing.py decodes the encoder's output with opentelemetry-proto.)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "frontend/http_parse.h"
#include "frontend/otlp.h"

using vivace::http::Chunk;
using vivace::http::Error;
using vivace::http::Limits;
using vivace::http::RequestHead;

namespace {

int failures = 0;

void Expect(bool ok, const char* what, int line) {
  if (ok) return;
  std::fprintf(stderr, "http_parse_test:%d: %s\n", line, what);
  ++failures;
}
#define EXPECT(x) Expect((x), #x, __LINE__)

std::string S(vivace::http::Span s) { return std::string(s.data, s.size); }

// Exactly-sized heap copy: ASan sees any read past the input.
std::unique_ptr<char[]> Copy(const std::string& s) {
  std::unique_ptr<char[]> p(new char[s.size() == 0 ? 1 : s.size()]);
  std::memcpy(p.get(), s.data(), s.size());
  return p;
}

Error Head(const std::string& text, RequestHead* head, const Limits& limits = Limits()) {
  auto p = Copy(text);
  size_t scanned = 0, size = 0;
  const Error found = vivace::http::FindHeadEnd(p.get(), text.size(), limits, &scanned, &size);
  if (found != Error::kOk) return found;
  static std::string keep;  // spans point into the input: keep it for the caller's checks
  keep = text.substr(0, size);
  return vivace::http::ParseRequestHead(keep.data(), size, limits, head);
}

// Decodes a whole chunked body; *body gets the data.
Error Chunked(const std::string& text, std::string* body, size_t* used, const Limits& limits = Limits()) {
  auto p = Copy(text);
  size_t pos = 0;
  body->clear();
  for (;;) {
    Chunk chunk;
    const Error e = vivace::http::DecodeChunk(p.get() + pos, text.size() - pos, body->size(), limits, &chunk);
    if (e != Error::kOk) return e;
    body->append(chunk.data.data, chunk.data.size);
    pos += chunk.consumed;
    if (chunk.last) {
      *used = pos;
      return Error::kOk;
    }
  }
}

void HeadCases() {
  RequestHead h;
  EXPECT(Head("POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n"
              "Authorization: Bearer t\r\nInference-Header-Content-Length: 5\r\n\r\nbody",
              &h) == Error::kOk);
  EXPECT(S(h.method) == "POST" && S(h.target) == "/v2/models/m/infer");
  EXPECT(h.has_length && h.content_length == 12 && !h.chunked && h.keep_alive && !h.http10);
  EXPECT(h.has_authorization && S(h.authorization) == "Bearer t");
  EXPECT(h.has_header_length && S(h.header_length) == "5");

  // Absolute form (RFC 9112 3.2.2) is routed by its path.
  EXPECT(Head("POST http://127.0.0.1:8000/v2/models/m/infer?x=1 HTTP/1.1\r\n\r\n", &h) == Error::kOk);
  EXPECT(S(h.target) == "/v2/models/m/infer?x=1");
  EXPECT(Head("GET HTTPS://host HTTP/1.1\r\n\r\n", &h) == Error::kOk && S(h.target) == "/");
  EXPECT(Head("GET http:///v2 HTTP/1.1\r\n\r\n", &h) == Error::kBadRequestLine);
  EXPECT(Head("GET http://host?q HTTP/1.1\r\n\r\n", &h) == Error::kBadRequestLine);

  EXPECT(Head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", &h) == Error::kOk && h.http10 && h.keep_alive);
  EXPECT(Head("GET / HTTP/1.0\r\n\r\n", &h) == Error::kOk && !h.keep_alive);
  EXPECT(Head("GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n", &h) == Error::kOk && !h.keep_alive);
  EXPECT(Head("POST / HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n", &h) ==
             Error::kOk &&
         h.expect_continue && h.chunked);

  EXPECT(Head("GET / HTTP/1.1\nHost: x\r\n\r\n", &h) == Error::kBareLf);
  EXPECT(Head("GET / HTTP/1.1\r\n", &h) == Error::kIncomplete);
  EXPECT(Head("get / HTTP/1.1\r\n\r\n", &h) == Error::kBadRequestLine);
  EXPECT(Head("PO0/v2/\x01.1\r\nContent-Length: 0\r\n\r\n", &h) == Error::kBadRequestLine);  // fuzz finding
  EXPECT(Head("GET  / HTTP/1.1\r\n\r\n", &h) == Error::kBadRequestLine);
  EXPECT(Head("GET / HTTP/2.0\r\n\r\n", &h) == Error::kBadRequestLine);
  EXPECT(Head("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", &h) == Error::kBadHeaderLine);
  EXPECT(Head("GET / HTTP/1.1\r\nA: \x01\r\n\r\n", &h) == Error::kBadHeaderLine);
  EXPECT(Head("GET / HTTP/1.1\r\n: x\r\n\r\n", &h) == Error::kBadHeaderLine);
  EXPECT(Head("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", &h) == Error::kBadContentLength);
  EXPECT(Head("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", &h) == Error::kBadContentLength);
  EXPECT(Head("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", &h) == Error::kOk);
  EXPECT(Head("POST / HTTP/1.1\r\nContent-Length: 9999999999999999999\r\n\r\n", &h) == Error::kBadContentLength);
  EXPECT(Head("POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", &h) == Error::kBodyTooLarge);
  EXPECT(Head("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", &h) == Error::kBadTransferEncoding);
  EXPECT(Head("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", &h) ==
         Error::kBadTransferEncoding);
  EXPECT(Head("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", &h) ==
         Error::kLengthAndChunked);

  const Limits small{64, 64, 2};
  EXPECT(Head("GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", &h, small) == Error::kTooManyHeaders);
  EXPECT(Head("GET /" + std::string(100, 'a') + " HTTP/1.1\r\n\r\n", &h, small) == Error::kHeadTooLarge);

  // Empty lines before a request are skipped; a head found byte by byte is found once.
  EXPECT(vivace::http::SkipEmptyLines("\r\n\r\nGET", 7) == 4);
  EXPECT(vivace::http::SkipEmptyLines("\r", 1) == 0);
  const std::string text = "GET /a HTTP/1.1\r\nHost: x\r\n\r\nrest";
  auto p = Copy(text);
  size_t scanned = 0, size = 0;
  Error e = Error::kIncomplete;
  for (size_t n = 1; n <= text.size() && e == Error::kIncomplete; ++n)
    e = vivace::http::FindHeadEnd(p.get(), n, Limits(), &scanned, &size);
  EXPECT(e == Error::kOk && size == text.size() - 4);
}

void ChunkCases() {
  std::string body;
  size_t used = 0;
  const std::string good = "5;ext=1\r\nhello\r\n6 \t;x\r\n world\r\n0\r\nChecksum: 1\r\n\r\nNEXT";
  EXPECT(Chunked(good, &body, &used) == Error::kOk && body == "hello world" && used == good.size() - 4);
  EXPECT(Chunked("A\r\n0123456789\r\n0\r\n\r\n", &body, &used) == Error::kOk && body == "0123456789");
  EXPECT(Chunked("5\r\nhel", &body, &used) == Error::kIncomplete);
  EXPECT(Chunked("0\r\nTrailer: x\r\n", &body, &used) == Error::kIncomplete);
  EXPECT(Chunked("\r\n", &body, &used) == Error::kBadChunkSize);
  EXPECT(Chunked("5x\r\nhello\r\n", &body, &used) == Error::kBadChunkSize);
  EXPECT(Chunked("5;a\nb\r\nhello\r\n", &body, &used) == Error::kBadChunkSize);
  EXPECT(Chunked(std::string(2000, '0'), &body, &used) == Error::kBadChunkSize);
  EXPECT(Chunked("5\r\nhelloXX0\r\n\r\n", &body, &used) == Error::kBadChunkEnd);
  EXPECT(Chunked("0\r\nbad trailer\r\n\r\n", &body, &used) == Error::kBadTrailer);
  // Sizes far past the limit saturate instead of overflowing.
  EXPECT(Chunked("fffffffffffffffffffffffff\r\n", &body, &used) == Error::kBodyTooLarge);
  const Limits small{8, 16, 4};
  EXPECT(Chunked("5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n", &body, &used, small) == Error::kBodyTooLarge);
  EXPECT(Chunked("0\r\nA: 0123456789abcdef\r\n\r\n", &body, &used, small) == Error::kTrailersTooLarge);
  // A trailer line ending exactly at the limit is accepted whole and byte by byte, even
  // when its CR arrives before its LF (fuzz finding: the trickled decode said too large).
  const std::string at_limit = "0\r\nA: 0123456789a\r\n\r\n";  // the last CR at the 16-byte limit
  EXPECT(Chunked(at_limit, &body, &used, small) == Error::kOk);
  Error trickled = Error::kIncomplete;
  for (size_t n = 1; n <= at_limit.size() && trickled == Error::kIncomplete; ++n) {
    auto p = Copy(at_limit.substr(0, n));
    Chunk chunk;
    trickled = vivace::http::DecodeChunk(p.get(), n, 0, small, &chunk);
  }
  EXPECT(trickled == Error::kOk);
}

// A protobuf reader just strict enough to check the encoder's framing: a varint, or false
// past the end.
bool ReadVarint(const std::string& b, size_t* at, uint64_t* v) {
  *v = 0;
  for (int shift = 0; *at < b.size() && shift < 64; shift += 7) {
    const uint8_t byte = static_cast<uint8_t>(b[(*at)++]);
    *v |= static_cast<uint64_t>(byte & 0x7F) << shift;
    if ((byte & 0x80) == 0) return true;
  }
  return false;
}

// The fields of one message, as (field number, wire type) pairs; false when a field runs
// past the end. `payloads` gets each field's bytes (empty for a varint).
bool Fields(const std::string& b, std::vector<std::pair<int, int>>* fields, std::vector<std::string>* payloads) {
  for (size_t at = 0; at < b.size();) {
    uint64_t tag = 0, size = 0;
    if (!ReadVarint(b, &at, &tag)) return false;
    const int wire = static_cast<int>(tag & 7);
    fields->emplace_back(static_cast<int>(tag >> 3), wire);
    if (wire == 0) {
      if (!ReadVarint(b, &at, &size)) return false;
      payloads->emplace_back();
    } else if (wire == 1) {
      if (b.size() - at < 8) return false;
      payloads->push_back(b.substr(at, 8));
      at += 8;
    } else if (wire == 2) {
      if (!ReadVarint(b, &at, &size) || size > b.size() - at) return false;
      payloads->push_back(b.substr(at, size));
      at += size;
    } else {
      return false;
    }
  }
  return true;
}

void OtlpCases() {
  const uint8_t trace_id[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  const uint8_t parent_id[8] = {9, 9, 9, 9, 9, 9, 9, 9};
  const std::string long_state(300, 'k'), model = "m\xc3\xb6" "del";
  vivace::otlp::RequestSpans r;
  r.trace_id = trace_id;
  r.parent_id = parent_id;
  r.trace_state = long_state;
  r.method = "POST";
  r.target = "/v2/models/x/infer?debug=1";
  r.frontend = "native";
  r.model = model;
  r.version = "7";
  r.status = 503;
  r.rows = int64_t{1} << 40;
  r.batch_rows = 8;
  r.received = 1000, r.parsed = 2000, r.enqueued = 2100, r.batch_start = 3000, r.features = 3500;
  r.batch_end = 5000, r.answered = 6000;
  std::string out;
  EXPECT(vivace::otlp::AppendRequestSpans(r, &out) == 6);
  std::vector<std::pair<int, int>> top;
  std::vector<std::string> spans;
  EXPECT(Fields(out, &top, &spans));
  EXPECT(top.size() == 6);
  for (size_t i = 0; i < top.size() && i < spans.size(); ++i) {
    EXPECT(top[i] == std::make_pair(2, 2));  // ScopeSpans.spans
    std::vector<std::pair<int, int>> fields;
    std::vector<std::string> values;
    EXPECT(Fields(spans[i], &fields, &values));
    EXPECT(fields.size() >= 7 && fields[0] == std::make_pair(1, 2) && values[0].size() == 16);
    EXPECT(values.size() > 1 && values[1].size() == 8);  // span id
  }
  // The server span carries the client's state and an error status; the children neither.
  EXPECT(spans.size() == 6 && spans[0].find(long_state) != std::string::npos);
  EXPECT(spans.size() == 6 && spans[0].find("\x7A\x02\x18\x02") != std::string::npos);
  EXPECT(spans.size() == 6 && spans[1].find(long_state) == std::string::npos);

  // Another route: the server span alone; no parent: a fresh, non-zero trace id.
  vivace::otlp::RequestSpans other;
  other.method = "GET";
  other.target = "/v2/health/ready";
  other.frontend = "python";
  other.received = 10;
  other.answered = 20;
  std::string alone;
  EXPECT(vivace::otlp::AppendRequestSpans(other, &alone) == 1);
  std::vector<std::pair<int, int>> one;
  std::vector<std::string> payload;
  EXPECT(Fields(alone, &one, &payload) && one.size() == 1);
  std::vector<std::pair<int, int>> fields;
  std::vector<std::string> values;
  EXPECT(!payload.empty() && Fields(payload[0], &fields, &values));
  EXPECT(!values.empty() && values[0].size() == 16 && values[0] != std::string(16, '\0'));
  EXPECT(payload.empty() || payload[0].find("GET /v2/health/ready") != std::string::npos);
}

}  // namespace

int main() {
  HeadCases();
  ChunkCases();
  OtlpCases();
  if (failures != 0) {
    std::fprintf(stderr, "http_parse_test: %d checks failed\n", failures);
    return 1;
  }
  std::printf("http_parse_test: all checks passed\n");
  return 0;
}

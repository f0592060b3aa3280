#include "frontend/http_parse.h"

#include <algorithm>
#include <cstring>

namespace vivace::http {

namespace {

bool IsTokenChar(unsigned char ch) {  // RFC 9110 tchar
  if (ch >= '0' && ch <= '9') return true;
  if ((ch | 0x20) >= 'a' && (ch | 0x20) <= 'z') return true;
  return ch != 0 && std::strchr("!#$%&'*+-.^_`|~", ch) != nullptr;
}

// Field values: visible characters, SP and HTAB; no other control character.
bool IsValueChar(unsigned char ch) { return (ch >= 0x20 && ch != 0x7f) || ch == '\t'; }

char Lower(char ch) { return (ch >= 'A' && ch <= 'Z') ? static_cast<char>(ch | 0x20) : ch; }

// The value of a lowercase hex digit, or -1.
int LowerHexDigit(char ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  return -1;
}

bool EqualsIgnoreCase(const char* a, size_t a_size, const char* b) {
  const size_t b_size = std::strlen(b);
  if (a_size != b_size) return false;
  for (size_t i = 0; i < a_size; ++i)
    if (Lower(a[i]) != b[i]) return false;
  return true;
}

bool StartsWithIgnoreCase(const char* a, size_t a_size, const char* prefix) {
  const size_t n = std::strlen(prefix);
  return a_size >= n && EqualsIgnoreCase(a, n, prefix);
}

const char* FindCrlf(const char* p, const char* end) {
  return static_cast<const char*>(memmem(p, static_cast<size_t>(end - p), "\r\n", 2));
}

// Does the comma-separated list hold `token` (case-insensitive)?
bool HasToken(const char* v, size_t size, const char* token) {
  const char* end = v + size;
  for (const char* start = v; start <= end;) {
    const char* comma = static_cast<const char*>(std::memchr(start, ',', static_cast<size_t>(end - start)));
    const char* stop = comma ? comma : end;
    const char* a = start;
    const char* b = stop;
    while (a < b && (*a == ' ' || *a == '\t')) ++a;
    while (b > a && (b[-1] == ' ' || b[-1] == '\t')) --b;
    if (EqualsIgnoreCase(a, static_cast<size_t>(b - a), token)) return true;
    if (comma == nullptr) break;
    start = comma + 1;
  }
  return false;
}

// A header or trailer field line (RFC 9110 5.5): token ":" OWS value OWS.
bool SplitFieldLine(const char* line, const char* eol, Span* name, Span* value) {
  const char* colon = static_cast<const char*>(std::memchr(line, ':', static_cast<size_t>(eol - line)));
  if (colon == nullptr || colon == line) return false;
  for (const char* q = line; q < colon; ++q)
    if (!IsTokenChar(static_cast<unsigned char>(*q))) return false;
  const char* v = colon + 1;
  const char* v_end = eol;
  while (v < v_end && (*v == ' ' || *v == '\t')) ++v;
  while (v_end > v && (v_end[-1] == ' ' || v_end[-1] == '\t')) --v_end;
  for (const char* q = v; q < v_end; ++q)
    if (!IsValueChar(static_cast<unsigned char>(*q))) return false;
  *name = {line, static_cast<size_t>(colon - line)};
  *value = {v, static_cast<size_t>(v_end - v)};
  return true;
}

// absolute-form "http://authority/path?query" → "/path?query" (RFC 9112 3.2.2: a server
// must accept it). Any other target is returned as it is.
bool OriginForm(Span target, Span* out) {
  size_t skip = 0;
  if (StartsWithIgnoreCase(target.data, target.size, "http://")) {
    skip = 7;
  } else if (StartsWithIgnoreCase(target.data, target.size, "https://")) {
    skip = 8;
  } else {
    *out = target;
    return true;
  }
  const char* authority = target.data + skip;
  const char* end = target.data + target.size;
  const char* path = authority;
  while (path < end && *path != '/' && *path != '?' && *path != '#') ++path;
  if (path == authority) return false;  // no host
  if (path == end) {
    static const char kRoot[] = "/";
    *out = {kRoot, 1};
    return true;
  }
  if (*path != '/') return false;  // "http://host?q": no path to route
  *out = {path, static_cast<size_t>(end - path)};
  return true;
}

// Lowercase hex digits only (W3C trace context HEXDIGLC): fills out[size / 2].
bool LowerHex(const char* p, size_t size, uint8_t* out) {
  for (size_t i = 0; i < size; ++i) {
    const int digit = LowerHexDigit(p[i]);
    if (digit < 0) return false;
    if (i % 2 == 0) {
      out[i / 2] = static_cast<uint8_t>(digit << 4);
    } else {
      out[i / 2] = static_cast<uint8_t>(out[i / 2] | digit);
    }
  }
  return true;
}

bool AllZero(const uint8_t* p, size_t size) {
  for (size_t i = 0; i < size; ++i)
    if (p[i] != 0) return false;
  return true;
}

}  // namespace

bool ParseTraceparent(const char* p, size_t size, TraceParent* out) {
  // 2 version, '-', 32 trace id, '-', 16 parent id, '-', 2 flags = 55
  if (size < 55 || p[2] != '-' || p[35] != '-' || p[52] != '-') return false;
  uint8_t version = 0;
  TraceParent t;
  if (!LowerHex(p, 2, &version) || version == 0xff) return false;
  if (version == 0 ? size != 55 : (size > 55 && p[55] != '-')) return false;
  if (!LowerHex(p + 3, 32, t.trace_id) || !LowerHex(p + 36, 16, t.parent_id) || !LowerHex(p + 53, 2, &t.flags))
    return false;
  if (AllZero(t.trace_id, 16) || AllZero(t.parent_id, 8)) return false;
  *out = t;
  return true;
}

size_t SkipEmptyLines(const char* p, size_t avail) {
  size_t skip = 0;
  while (avail - skip >= 2 && p[skip] == '\r' && p[skip + 1] == '\n') skip += 2;
  return skip;
}

Error FindHeadEnd(const char* p, size_t avail, const Limits& limits, size_t* scanned, size_t* head_size) {
  const size_t limit = static_cast<size_t>(limits.max_header_bytes) + 4;
  const size_t stop = std::min(avail, limit);
  size_t i = *scanned;
  while (i < stop) {
    const char* lf = static_cast<const char*>(std::memchr(p + i, '\n', stop - i));
    if (lf == nullptr) break;
    const size_t at = static_cast<size_t>(lf - p);
    if (at == 0 || p[at - 1] != '\r') {
      *scanned = at;
      return Error::kBareLf;
    }
    i = at + 1;
    if (at >= 3 && p[at - 2] == '\n' && p[at - 3] == '\r') {
      *scanned = i;
      *head_size = i;
      return Error::kOk;
    }
  }
  *scanned = stop;
  return avail > limit ? Error::kHeadTooLarge : Error::kIncomplete;
}

Error ParseRequestHead(const char* p, size_t head_size, const Limits& limits, RequestHead* out) {
  RequestHead h;
  const char* end = p + head_size - 2;  // the final CRLF
  const char* line_end = FindCrlf(p, end + 2);
  // Request line: METHOD SP target SP HTTP/1.x
  const char* sp1 = static_cast<const char*>(std::memchr(p, ' ', static_cast<size_t>(line_end - p)));
  const char* sp2 = sp1 ? static_cast<const char*>(std::memchr(sp1 + 1, ' ', static_cast<size_t>(line_end - sp1 - 1)))
                        : nullptr;
  bool ok = sp1 != nullptr && sp2 != nullptr && sp1 > p && sp2 > sp1 + 1 && line_end - sp2 == 9 &&
            std::memcmp(sp2 + 1, "HTTP/1.", 7) == 0 && (sp2[8] == '0' || sp2[8] == '1');
  if (!ok) return Error::kBadRequestLine;
  for (const char* q = p; ok && q < sp1; ++q) ok = *q >= 'A' && *q <= 'Z';
  for (const char* q = sp1 + 1; ok && q < sp2; ++q) ok = static_cast<unsigned char>(*q) > 0x20 && *q != 0x7f;
  if (!ok || !OriginForm({sp1 + 1, static_cast<size_t>(sp2 - sp1 - 1)}, &h.target)) return Error::kBadRequestLine;
  h.http10 = sp2[8] == '0';
  h.method = {p, static_cast<size_t>(sp1 - p)};
  bool close = false, keep_alive = false;
  int64_t headers = 0;
  for (const char* line = line_end + 2; line < end;) {
    const char* eol = FindCrlf(line, end + 2);
    if (++headers > limits.max_headers) return Error::kTooManyHeaders;
    Span name, value;
    if (!SplitFieldLine(line, eol, &name, &value)) return Error::kBadHeaderLine;
    if (EqualsIgnoreCase(name.data, name.size, "content-length")) {
      int64_t length = 0;
      bool digits = value.size > 0 && value.size <= 18;
      for (size_t i = 0; digits && i < value.size; ++i) {
        const char ch = value.data[i];
        digits = ch >= '0' && ch <= '9';
        length = length * 10 + (ch - '0');
      }
      if (!digits || (h.has_length && length != h.content_length)) return Error::kBadContentLength;
      if (length > limits.max_body_bytes) return Error::kBodyTooLarge;
      h.has_length = true;
      h.content_length = length;
    } else if (EqualsIgnoreCase(name.data, name.size, "transfer-encoding")) {
      // Only "chunked" as the final coding frames a request body (RFC 9112 6.3).
      const char* final_coding = value.data;
      for (const char* q = value.data; q < value.data + value.size; ++q)
        if (*q == ',') final_coding = q + 1;
      while (final_coding < value.data + value.size && (*final_coding == ' ' || *final_coding == '\t')) ++final_coding;
      const size_t size = static_cast<size_t>(value.data + value.size - final_coding);
      if (!EqualsIgnoreCase(final_coding, size, "chunked") || h.chunked) return Error::kBadTransferEncoding;
      h.chunked = true;
    } else if (EqualsIgnoreCase(name.data, name.size, "connection")) {
      close = close || HasToken(value.data, value.size, "close");
      keep_alive = keep_alive || HasToken(value.data, value.size, "keep-alive");
    } else if (EqualsIgnoreCase(name.data, name.size, "expect")) {
      h.expect_continue = EqualsIgnoreCase(value.data, value.size, "100-continue");
    } else if (EqualsIgnoreCase(name.data, name.size, "inference-header-content-length")) {
      h.has_header_length = true;
      h.header_length = value;
    } else if (EqualsIgnoreCase(name.data, name.size, "authorization")) {
      h.has_authorization = true;
      h.authorization = value;
    } else if (EqualsIgnoreCase(name.data, name.size, "traceparent")) {
      h.has_traceparent = true;
      h.traceparent = value;
    } else if (EqualsIgnoreCase(name.data, name.size, "tracestate")) {
      h.has_tracestate = true;
      h.tracestate = value;
    }
    line = eol + 2;
  }
  if (h.chunked && h.has_length) return Error::kLengthAndChunked;  // refuse, do not guess
  h.keep_alive = h.http10 ? keep_alive && !close : !close;
  *out = h;
  return Error::kOk;
}

Error DecodeChunk(const char* p, size_t avail, uint64_t decoded, const Limits& limits, Chunk* out) {
  const char* end = p + avail;
  const char* eol = FindCrlf(p, end);
  if (eol == nullptr) return avail > 1024 ? Error::kBadChunkSize : Error::kIncomplete;
  // chunk-size [BWS ";" chunk-ext]: hex digits, then nothing or an extension free of
  // control characters (a bare LF there would end the line for another parser).
  const uint64_t max_body = static_cast<uint64_t>(limits.max_body_bytes);
  uint64_t size = 0;
  const char* q = p;
  for (; q < eol; ++q) {
    const int digit = LowerHexDigit(Lower(*q));
    if (digit < 0) break;
    if (size <= max_body) size = size * 16 + static_cast<uint64_t>(digit);  // saturates past the limit
  }
  const char* ext = q;
  while (ext < eol && (*ext == ' ' || *ext == '\t')) ++ext;
  bool valid = q > p && (q == eol || (ext < eol && *ext == ';'));
  for (const char* e = ext; valid && e < eol; ++e) valid = IsValueChar(static_cast<unsigned char>(*e));
  if (!valid) return Error::kBadChunkSize;
  if (size > max_body || decoded + size > max_body) return Error::kBodyTooLarge;
  const char* data = eol + 2;
  if (size == 0) {  // trailers, then the blank line; they count against the header limit
    const size_t limit = static_cast<size_t>(limits.max_header_bytes);
    for (const char* t = data;;) {
      const char* t_eol = FindCrlf(t, end);
      // Where this line's CR is, or the earliest it can still be: a CR that arrived
      // without its LF yet may end the line exactly at the limit.
      const char* cr = t_eol ? t_eol : (end > t && end[-1] == '\r' ? end - 1 : end);
      if (static_cast<size_t>(cr - data) > limit) return Error::kTrailersTooLarge;
      if (t_eol == nullptr) return Error::kIncomplete;
      if (t_eol == t) {
        *out = Chunk{{data, 0}, static_cast<size_t>(t_eol + 2 - p), true};
        return Error::kOk;
      }
      Span name, value;
      if (!SplitFieldLine(t, t_eol, &name, &value)) return Error::kBadTrailer;
      t = t_eol + 2;
    }
  }
  if (static_cast<uint64_t>(end - data) < size + 2) return Error::kIncomplete;
  if (data[size] != '\r' || data[size + 1] != '\n') return Error::kBadChunkEnd;
  *out = Chunk{{data, static_cast<size_t>(size)}, static_cast<size_t>(data + size + 2 - p), false};
  return Error::kOk;
}

}  // namespace vivace::http

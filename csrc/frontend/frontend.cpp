#include "frontend/frontend.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <random>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace vivace {

namespace {

constexpr uint64_t kListenTag = 0;
constexpr uint64_t kWakeTag = 1;
constexpr uint64_t kFirstConnection = 16;
constexpr uint64_t kDrivenTag = uint64_t{1} << 63;  // | index into driven_
constexpr size_t kReadSize = 64 << 10;
constexpr int kReadsPerWake = 64;
// A client that does not read its responses: stop reading its requests past this much
// unsent output, and resume once it has caught up.
constexpr size_t kMaxUnsentOutput = 4 << 20;
// After refusing a request the client may still be sending it: half-close and discard
// input for a moment so that the error response is not destroyed by a reset.
constexpr double kLingerSeconds = 2.0;

double UnixNow() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int64_t SteadyNs(Clock::time_point t) {
  return static_cast<int64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count());
}

int64_t SecondsToNs(double seconds) { return static_cast<int64_t>(std::llround(seconds * 1e9)); }

const char* Reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 408: return "Request Timeout";
    case 413: return "Payload Too Large";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Unknown";
  }
}

void AppendJsonString(std::string* out, const std::string& text) {
  out->push_back('"');
  for (unsigned char ch : text) {
    if (ch == '"' || ch == '\\') {
      out->push_back('\\');
      out->push_back(static_cast<char>(ch));
    } else if (ch < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\u%04x", ch);
      out->append(escaped);
    } else {
      out->push_back(static_cast<char>(ch));
    }
  }
  out->push_back('"');
}

std::string ErrorResponse(int status, const std::string& message, bool close, const char* extra_headers = "") {
  std::string body = "{\"error\":";
  AppendJsonString(&body, message);
  body += "}";
  std::string out = "HTTP/1.1 " + std::to_string(status) + " " + Reason(status) +
                    "\r\ncontent-type: application/json\r\ncontent-length: " + std::to_string(body.size()) + "\r\n";
  if (status == 503) out += "retry-after: 1\r\n";  // every 503 tells the client when to retry
  out += extra_headers;
  if (close) out += "connection: close\r\n";
  out += "\r\n";
  out += body;
  return out;
}

std::string PeerName(const sockaddr_storage& addr) {
  char host[INET6_ADDRSTRLEN] = {0};
  int port = 0;
  if (addr.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&addr);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    port = ntohs(in->sin_port);
  } else if (addr.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&addr);
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    port = ntohs(in6->sin6_port);
  } else {
    return "";
  }
  return std::string(host) + ":" + std::to_string(port);
}

}  // namespace

struct HttpFrontend::Head {
  bool parsed = false;
  size_t size = 0;  // request line + headers + the blank line
  size_t scanned = 0;  // bytes already searched for the end of the head
  std::string method, target;
  bool keep_alive = true;
  bool chunked = false;
  int64_t content_length = 0;
  bool expect_continue = false, continue_sent = false;
  bool has_header_length = false, has_authorization = false;
  std::string header_length, authorization;
  bool has_traceparent = false, has_tracestate = false;
  std::string traceparent, tracestate;
  size_t chunk_pos = 0;  // chunked: bytes of the encoded body consumed so far
  std::string body;      // chunked: the decoded body so far
};

struct HttpFrontend::Conn {
  uint64_t id = 0;
  int fd = -1;
  std::string peer;
  std::string in;
  size_t in_start = 0;
  std::string out;
  size_t out_sent = 0;
  uint64_t next_seq = 0, next_write = 0;
  std::map<uint64_t, std::string> held;  // responses finished out of order
  int64_t close_after = -1;              // sequence number after whose response we close
  bool rejected = false;                 // stop reading requests; linger-close at the end
  bool closing = false;                  // the last response is queued: close once sent
  bool lingering = false;
  bool peer_closed = false;  // the client sent its end of stream: answer, then close
  double linger_until = 0;
  uint32_t events = EPOLLIN;
  bool dirty = false;
  // Answers queued in `out` and not yet all sent: counted in unsent_connections_, so a
  // drain (InFlight) waits for them to reach the socket, not only to be produced.
  bool unsent = false;
  bool python_knows = false;  // a request went to Python: tell it when the connection goes
  // At the drain this connection was part-way through a request the drain lets through:
  // counted in drain_reads_ (InFlight) until that request is read whole or the connection goes.
  bool drain_read = false;
  double reading_since = 0, headers_done_at = 0, last_active = 0;
  Head head;
  std::vector<uint64_t> tokens;  // fast-path requests still in a batcher
  // With --auth: the Authorization header this connection was last granted infer with, under
  // which token-file generation, and until when (Unix seconds; 0: never).
  std::string granted_header;
  uint64_t granted_generation = 0;
  double granted_expires = 0.0;
};

HttpFrontend::HttpFrontend(int listen_fd, FrontendLimits limits)
    : limits_(limits), parse_limits_{limits.max_body_bytes, limits.max_header_bytes, limits.max_headers} {
  // Each process its own sequence of rollout draws: with one seed for all, every worker of
  // --workers (and every restart) would repeat the same first draws, whatever they are.
  std::random_device entropy;
  draw_state_ = (static_cast<uint64_t>(entropy()) << 32 | entropy()) | 1;
  listen_fd_ = fcntl(listen_fd, F_DUPFD_CLOEXEC, 0);
  if (listen_fd_ < 0) throw std::runtime_error(std::string("dup of the listening socket: ") + std::strerror(errno));
  fcntl(listen_fd_, F_SETFL, fcntl(listen_fd_, F_GETFL) | O_NONBLOCK);
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  python_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (epoll_fd_ < 0 || wake_fd_ < 0 || python_fd_ < 0) {
    const std::string error = std::strerror(errno);
    for (int fd : {listen_fd_, epoll_fd_, wake_fd_, python_fd_})
      if (fd >= 0) close(fd);
    throw std::runtime_error("HTTP front end: " + error);
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kListenTag;
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev);
  ev.data.u64 = kWakeTag;
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);
  next_conn_ = kFirstConnection;
  read_buffer_.resize(kReadSize);
  thread_ = std::thread([this] { Loop(); });
}

HttpFrontend::~HttpFrontend() { Stop(); }

void HttpFrontend::SetRoutes(std::unordered_map<std::string, std::shared_ptr<const InferRoute>> routes) {
  std::unordered_map<std::string, std::shared_ptr<const InferRoute>> old;
  {
    std::lock_guard<std::mutex> lk(routes_mu_);
    old.swap(routes_);
    routes_ = std::move(routes);
    // Their counts so far go to Python with the next TakeRouted (a request the io thread
    // is routing through an old route right now may go uncounted).
    for (auto& [target, route] : old)
      if (route->canary) replaced_routed_.push_back({target, route->routed.exchange(0), route->routed_canary.exchange(0)});
  }
}

void HttpFrontend::SetAuth(bool required, std::vector<TokenGrant> grants, std::vector<std::string> open_paths) {
  std::unordered_map<std::string, TokenGrant> table;
  for (TokenGrant& g : grants) {
    std::string key(reinterpret_cast<const char*>(g.digest.data()), g.digest.size());
    table[std::move(key)] = std::move(g);
  }
  std::lock_guard<std::mutex> lk(routes_mu_);
  auth_required_ = required;
  grants_.swap(table);
  ++grants_generation_;  // connections check their cached grant again
  open_paths_ = std::move(open_paths);
}

// The rules and words of engine/auth.py Authenticator.authenticate: the Bearer scheme (any
// case), the token hashed before it is looked up (the lookup's time depends on the digest,
// not on how much of a real token was guessed), the digests compared in constant time.
const TokenGrant* HttpFrontend::TokenLocked(const Head& h, std::string* refusal) const {
  const std::string& header = h.authorization;
  if (!h.has_authorization || header.empty()) {
    *refusal = "missing bearer token (send 'Authorization: Bearer <token>')";
    return nullptr;
  }
  const size_t space = std::min(header.find(' '), header.size());
  static constexpr char kBearer[] = "bearer";
  bool bearer = space == 6;
  for (size_t i = 0; bearer && i < 6; ++i)
    bearer = std::tolower(static_cast<unsigned char>(header[i])) == kBearer[i];
  if (!bearer) {
    *refusal = "the Authorization header must use the Bearer scheme";
    return nullptr;
  }
  size_t begin = space, end = header.size();
  while (begin < end && std::isspace(static_cast<unsigned char>(header[begin]))) ++begin;
  while (end > begin && std::isspace(static_cast<unsigned char>(header[end - 1]))) --end;
  const Sha256Digest digest = Sha256(header.data() + begin, end - begin);
  const auto it = grants_.find(std::string(reinterpret_cast<const char*>(digest.data()), digest.size()));
  if (it == grants_.end() || !DigestsEqual(it->second.digest, digest)) {
    *refusal = "invalid or revoked token";
    return nullptr;
  }
  const TokenGrant& grant = it->second;
  if (grant.expires_at != 0.0 && UnixNow() >= grant.expires_at) {
    *refusal = "token '" + grant.name + "' has expired";
    return nullptr;
  }
  return &grant;
}

// A keep-alive connection that repeats the header it was granted with is not hashed again
// until the token file changes or the token expires: the comparison is with what this same
// client sent before, so its timing tells nothing about other tokens.
bool HttpFrontend::InferGrantedLocked(Conn* c, const Head& h) const {
  if (!auth_required_) return true;
  if (c->granted_generation == grants_generation_ && h.has_authorization && h.authorization == c->granted_header &&
      (c->granted_expires == 0.0 || UnixNow() < c->granted_expires))
    return true;
  std::string refusal;
  const TokenGrant* grant = TokenLocked(h, &refusal);
  if (grant == nullptr || !grant->infer) return false;
  c->granted_header = h.authorization;
  c->granted_generation = grants_generation_;
  c->granted_expires = grant->expires_at;
  return true;
}

bool HttpFrontend::MayContinueLocked(const Head& h, std::string* refusal) const {
  if (!auth_required_) return true;
  const std::string path = h.target.substr(0, h.target.find('?'));
  if (std::find(open_paths_.begin(), open_paths_.end(), path) != open_paths_.end()) return true;
  return TokenLocked(h, refusal) != nullptr;
}

std::vector<RoutedCounts> HttpFrontend::TakeRouted() {
  std::lock_guard<std::mutex> lk(routes_mu_);
  std::vector<RoutedCounts> out;
  out.swap(replaced_routed_);
  for (auto& [target, route] : routes_)
    if (route->canary) out.push_back({target, route->routed.exchange(0), route->routed_canary.exchange(0)});
  return out;
}

void HttpFrontend::SetDriven(std::vector<std::shared_ptr<Batcher>> batchers) {
  {
    std::lock_guard<std::mutex> lk(routes_mu_);
    driven_next_ = std::move(batchers);
    driven_changed_ = true;
  }
  Wake();
}

void HttpFrontend::Respond(uint64_t conn, uint64_t seq, std::string response) {
  bool was_empty;
  {
    std::lock_guard<std::mutex> lk(outbox_mu_);
    was_empty = outbox_.empty();
    Outgoing o;
    o.conn = conn;
    o.seq = seq;
    o.response = std::move(response);
    outbox_.push_back(std::move(o));
  }
  if (was_empty) Wake();
}

void HttpFrontend::Deliver(Batcher* batcher, std::vector<Request*>* done) {
  const bool on_io_thread = std::this_thread::get_id() == io_thread_;
  // On our own thread (a driven batch, a cancellation) the loop processes the outbox
  // before it waits again; from another thread, the first completion wakes it.
  if (on_io_thread) outbox_filled_here_ = true;
  // The wake-up is written under the lock: Stop() closes the descriptor under it once the
  // last completion is in, so a late Deliver never writes to a closed (or reused) one.
  std::lock_guard<std::mutex> lk(outbox_mu_);
  const bool was_empty = outbox_.empty();
  for (Request* r : *done) {
    Outgoing o;
    o.request = r;
    o.batcher = batcher;
    outbox_.push_back(std::move(o));
  }
  done->clear();
  if (was_empty && !on_io_thread) Wake();
}

std::vector<ForwardedRequest> HttpFrontend::Take() {
  std::vector<ForwardedRequest> out;
  std::lock_guard<std::mutex> lk(inbox_mu_);
  uint64_t counter;
  while (read(python_fd_, &counter, sizeof(counter)) > 0) {
  }
  out.swap(inbox_);
  return out;
}

void HttpFrontend::StopAccepting() {
  stop_accepting_ = true;
  Wake();
}

void HttpFrontend::BeginDrain() {
  drain_ = true;
  Wake();
}

void HttpFrontend::Stop() {
  if (thread_.joinable()) {
    stop_ = true;
    Wake();
    thread_.join();
  }
  // Requests still in a batcher point at this sink: cancel them and wait for their
  // completions, so that no batcher calls Deliver on a destroyed front end.
  for (const auto& [token, pending] : pending_) pending.route->batcher->Cancel(token);
  const double give_up = Now() + 10.0;
  while (!pending_.empty() && Now() < give_up) {
    std::vector<Outgoing> batch;
    {
      std::lock_guard<std::mutex> lk(outbox_mu_);
      batch.swap(outbox_);
    }
    for (Outgoing& o : batch) {
      if (o.request == nullptr) continue;
      auto it = pending_.find(o.request->token);
      o.batcher->Release(o.request);
      if (it != pending_.end()) pending_.erase(it);
    }
    if (!pending_.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  driven_.clear();
  for (auto& [id, conn] : conns_) close(conn->fd);
  open_connections_ -= static_cast<int64_t>(conns_.size());
  conns_.clear();
  std::lock_guard<std::mutex> lk(outbox_mu_);  // see Deliver
  for (int* fd : {&listen_fd_, &epoll_fd_, &wake_fd_, &python_fd_}) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
  }
}

void HttpFrontend::Wake() {
  const uint64_t one = 1;
  ssize_t n = write(wake_fd_, &one, sizeof(one));
  (void)n;  // a full counter already signals
}

HttpFrontend::Conn* HttpFrontend::Find(uint64_t id) {
  auto it = conns_.find(id);
  return it == conns_.end() ? nullptr : it->second.get();
}

std::map<int, uint64_t> HttpFrontend::HttpErrors() const {
  std::lock_guard<std::mutex> lk(counters_mu_);
  return http_errors_;
}

std::map<std::tuple<std::string, std::string, std::string>, uint64_t> HttpFrontend::Failures() const {
  std::lock_guard<std::mutex> lk(counters_mu_);
  return failures_;
}

void HttpFrontend::CountHttpError(int status) {
  std::lock_guard<std::mutex> lk(counters_mu_);
  ++http_errors_[status];
}

// -- the io thread -----------------------------------------------------------------------

void HttpFrontend::Loop() {
  io_thread_ = std::this_thread::get_id();
  std::vector<epoll_event> events(512);
  const double tick = std::max(
      0.05, std::min({limits_.header_timeout_s, limits_.body_timeout_s, limits_.idle_timeout_s, 4.0}) / 4);
  double next_sweep = Now() + tick;
  while (!stop_) {
    const double wake_at = std::min(next_sweep, NextDue());
    // No wait while work is already here: completions of our own, or rows that requests
    // parsed after a flush queued for a driven model.
    const bool work_here =
        outbox_filled_here_ || std::any_of(driven_.begin(), driven_.end(), [](const Driven& d) { return d.kick; });
    const int timeout_ms = work_here ? 0 : std::max(0, static_cast<int>(std::ceil((wake_at - Now()) * 1000)));
    const int n = epoll_wait(epoll_fd_, events.data(), static_cast<int>(events.size()), timeout_ms);
    if (n < 0 && errno != EINTR) break;
    for (int i = 0; i < n; ++i) {
      const uint64_t tag = events[static_cast<size_t>(i)].data.u64;
      const uint32_t ev = events[static_cast<size_t>(i)].events;
      if (tag == kListenTag) {
        Accept();
      } else if (tag == kWakeTag) {
        uint64_t counter;
        while (read(wake_fd_, &counter, sizeof(counter)) > 0) {
        }
      } else if (tag & kDrivenTag) {
        const size_t index = static_cast<size_t>(tag & ~kDrivenTag);
        if (index < driven_.size()) driven_[index].kick = true;  // rows queued by Python
      } else if (Conn* c = Find(tag)) {
        if ((ev & EPOLLOUT) && !c->dirty) {
          c->dirty = true;
          dirty_.push_back(c);
        }
        if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) OnReadable(c);
      }
    }
    // Every row read in this round is queued: wake whoever runs each model's batches
    // (the Python loop for torch models), and run the driven models' batches now.
    SignalQueued();
    ApplyDriven();
    RunDriven(Now());
    // Completions and Python's answers, whatever woke us: an outbox filled while we
    // were busy is written in the same round as the requests just read.
    ProcessOutbox();
    if (stop_accepting_ && listen_fd_ >= 0) {
      epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
      close(listen_fd_);
      listen_fd_ = -1;
    }
    if (drain_ && !draining_) ApplyDrain();
    const double now = Now();
    if (now >= next_sweep) {
      Sweep(now);
      next_sweep = now + tick;
    }
    // One send per connection for everything answered this round. Flushing may parse
    // requests held back by a backlog, which can answer more: repeat until quiet.
    while (!dirty_.empty()) {
      std::vector<uint64_t> ids;
      ids.reserve(dirty_.size());
      for (Conn* c : dirty_) {
        c->dirty = false;
        ids.push_back(c->id);
      }
      dirty_.clear();
      for (uint64_t id : ids)
        if (Conn* c = Find(id)) Flush(c);
    }
    SignalQueued();  // requests a flush let through
  }
}

void HttpFrontend::SignalQueued() {
  for (const auto& batcher : queued_this_round_) batcher->SignalReady();
  queued_this_round_.clear();
}

void HttpFrontend::ApplyDriven() {
  std::vector<std::shared_ptr<Batcher>> next;
  {
    std::lock_guard<std::mutex> lk(routes_mu_);
    if (!driven_changed_) return;
    driven_changed_ = false;
    next = driven_next_;
  }
  for (const Driven& d : driven_) epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, d.batcher->ready_fd(), nullptr);
  driven_.clear();
  for (auto& batcher : next) {
    if (batcher->ready_fd() < 0) continue;  // executor threads run it
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kDrivenTag | driven_.size();
    if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, batcher->ready_fd(), &ev) != 0) continue;
    driven_.push_back({std::move(batcher), true, 0});  // kicked: it may hold rows already
  }
}

void HttpFrontend::RunDriven(double now) {
  for (Driven& d : driven_) {
    if (!d.kick && (d.due == 0 || now < d.due)) continue;
    d.kick = false;
    const int64_t wait_us = d.batcher->RunReady(Batcher::kServingSliceUs);
    d.due = wait_us < 0 ? 0 : Now() + static_cast<double>(wait_us) * 1e-6;
  }
}

double HttpFrontend::NextDue() const {
  double due = std::numeric_limits<double>::infinity();
  for (const Driven& d : driven_)
    if (d.due != 0) due = std::min(due, d.due);
  return due;
}

void HttpFrontend::Accept() {
  for (int i = 0; i < 256 && listen_fd_ >= 0; ++i) {
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    const int fd = accept4(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;  // EAGAIN, or out of descriptors: the next round retries
    }
    if (static_cast<int64_t>(conns_.size()) >= limits_.max_connections || draining_) {
      const std::string busy = ErrorResponse(503, draining_ ? "server is draining" : "too many connections", true);
      ssize_t sent = send(fd, busy.data(), busy.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      (void)sent;
      close(fd);
      continue;
    }
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    auto conn = std::make_unique<Conn>();
    conn->id = next_conn_++;
    conn->fd = fd;
    conn->peer = PeerName(addr);
    conn->last_active = Now();
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = conn->id;
    if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
      close(fd);
      continue;
    }
    conns_.emplace(conn->id, std::move(conn));
    ++open_connections_;
  }
}

void HttpFrontend::OnReadable(Conn* c) {
  bool eof = false;
  // A bounded number of reads per wake-up: a client that keeps its socket full cannot hold
  // the thread (epoll reports the rest next round).
  for (int reads = 0; reads < kReadsPerWake; ++reads) {
    const ssize_t n = recv(c->fd, read_buffer_.data(), read_buffer_.size(), 0);
    if (n == 0) {
      eof = true;
      break;
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      Close(c);  // reset: the client is gone, drop its queued requests
      return;
    }
    if (c->rejected || c->closing) continue;  // refusing: discard what the client still sends
    c->in.append(read_buffer_.data(), static_cast<size_t>(n));
    c->last_active = Now();
    // Parse after every read, so that the limits hold while a client is still sending.
    while (ParseOne(c)) {
    }
    if (c->in_start == c->in.size()) {
      c->in.clear();
      c->in_start = 0;
    } else if (c->in_start > (64u << 10)) {
      c->in.erase(0, c->in_start);
      c->in_start = 0;
    }
    if (static_cast<size_t>(n) < read_buffer_.size()) break;
    if (c->out.size() - c->out_sent > kMaxUnsentOutput) break;  // reading resumes after Flush
  }
  if (!eof) return;
  // The client sends nothing more, but it may only have half-closed (nc, shell scripts):
  // answer the requests it sent, then close. A client that has really gone resets the
  // connection at our first response, which cancels the rest.
  if (c->next_write == c->next_seq && c->out.empty()) {
    Close(c);
    return;
  }
  c->peer_closed = true;
  c->rejected = true;  // read no further (an incomplete request stays unanswered)
  const int64_t last = static_cast<int64_t>(c->next_seq) - 1;
  c->close_after = c->close_after >= 0 ? std::min(c->close_after, last) : last;
  if (static_cast<int64_t>(c->next_write) > c->close_after) c->closing = true;
  WatchWrites(c, (c->events & EPOLLOUT) != 0);  // the end of stream stays readable: stop watching it
}

bool HttpFrontend::ParseOne(Conn* c) {
  if (c->rejected || c->closing) return false;
  if (c->close_after >= 0 && static_cast<int64_t>(c->next_seq) > c->close_after) return false;
  if (c->out.size() - c->out_sent > kMaxUnsentOutput) return false;  // resumes after Flush
  Head& h = c->head;
  if (!h.parsed) {
    const size_t skip = http::SkipEmptyLines(c->in.data() + c->in_start, c->in.size() - c->in_start);
    c->in_start += skip;
    h.scanned = h.scanned > skip ? h.scanned - skip : 0;
  }
  const size_t avail = c->in.size() - c->in_start;
  if (avail == 0) {
    c->reading_since = 0;
    return false;
  }
  const double now = Now();
  if (c->reading_since == 0) c->reading_since = now;
  const char* p = c->in.data() + c->in_start;
  if (!h.parsed) {
    // A bare LF is refused as soon as it arrives rather than at the header timeout.
    size_t size = 0;
    const http::Error e = http::FindHeadEnd(p, avail, parse_limits_, &h.scanned, &size);
    if (e != http::Error::kOk) {
      if (e != http::Error::kIncomplete) RejectParse(c, e);
      return false;
    }
    if (!ParseHead(c, p, size)) return false;
    c->headers_done_at = now;
  }
  const char* body;
  size_t body_size, consumed;
  if (h.chunked) {
    if (!ReadChunked(c)) {
      if (c->rejected) return false;
      body = nullptr;
    } else {
      body = h.body.data();
    }
    body_size = h.body.size();
    consumed = h.size + h.chunk_pos;
  } else {
    body_size = static_cast<size_t>(h.content_length);
    body = avail - h.size >= body_size ? p + h.size : nullptr;
    consumed = h.size + body_size;
  }
  if (body == nullptr) {
    if (h.expect_continue && !h.continue_sent) {
      std::string refusal;
      bool may_continue;
      {
        std::lock_guard<std::mutex> lk(routes_mu_);
        may_continue = MayContinueLocked(h, &refusal);
      }
      if (!may_continue) {  // refused before the client sends the body it announced
        Reject(c, 401, refusal, "www-authenticate: Bearer realm=\"vivace\"\r\n");
        return false;
      }
      h.continue_sent = true;
      c->out += "HTTP/1.1 100 Continue\r\n\r\n";
      if (!c->dirty) {
        c->dirty = true;
        dirty_.push_back(c);
      }
    }
    return false;
  }
  Dispatch(c, body, body_size);
  c->in_start += consumed;
  c->head = Head();
  c->reading_since = 0;
  c->headers_done_at = 0;
  return true;
}

// The same statuses and words as the Python front end (engine/http.py).
void HttpFrontend::RejectParse(Conn* c, http::Error e) {
  const std::string too_large =
      "request body exceeds the limit of " + std::to_string(limits_.max_body_bytes) + " bytes";
  switch (e) {
    case http::Error::kOk:
    case http::Error::kIncomplete: return;
    case http::Error::kBareLf: return Reject(c, 400, "malformed HTTP request: bare LF (lines must end with CRLF)");
    case http::Error::kHeadTooLarge: return Reject(c, 431, "request line and headers exceed the size limit");
    case http::Error::kBadRequestLine: return Reject(c, 400, "malformed HTTP request: invalid request line");
    case http::Error::kTooManyHeaders:
    case http::Error::kTrailersTooLarge: return Reject(c, 431, "too many or too large request headers");
    case http::Error::kBadHeaderLine: return Reject(c, 400, "malformed HTTP request: invalid header line");
    case http::Error::kBadContentLength: return Reject(c, 400, "malformed HTTP request: invalid Content-Length");
    case http::Error::kBodyTooLarge: return Reject(c, 413, too_large);
    case http::Error::kBadTransferEncoding:
      return Reject(c, 400, "malformed HTTP request: unsupported Transfer-Encoding");
    case http::Error::kLengthAndChunked:
      return Reject(c, 400, "malformed HTTP request: both Content-Length and Transfer-Encoding");
    case http::Error::kBadChunkSize: return Reject(c, 400, "malformed HTTP request: invalid chunk size line");
    case http::Error::kBadChunkEnd: return Reject(c, 400, "malformed HTTP request: chunk data does not end with CRLF");
    case http::Error::kBadTrailer: return Reject(c, 400, "malformed HTTP request: invalid trailer line");
  }
}

bool HttpFrontend::ParseHead(Conn* c, const char* p, size_t size) {
  http::RequestHead parsed;
  const http::Error e = http::ParseRequestHead(p, size, parse_limits_, &parsed);
  if (e != http::Error::kOk) {
    RejectParse(c, e);
    return false;
  }
  Head& h = c->head;
  h.method.assign(parsed.method.data, parsed.method.size);
  h.target.assign(parsed.target.data, parsed.target.size);
  // An Upgrade offer (curl --http2 sends h2c) is declined by answering in HTTP/1.1
  // (RFC 9110 7.8), as the Python front end answers the request that carries it.
  h.keep_alive = parsed.keep_alive;
  h.chunked = parsed.chunked;
  h.content_length = parsed.content_length;
  h.expect_continue = parsed.expect_continue;
  h.has_header_length = parsed.has_header_length;
  h.header_length.assign(parsed.header_length.data, parsed.header_length.size);
  h.has_authorization = parsed.has_authorization;
  h.authorization.assign(parsed.authorization.data, parsed.authorization.size);
  h.has_traceparent = parsed.has_traceparent;
  if (parsed.has_traceparent) h.traceparent.assign(parsed.traceparent.data, parsed.traceparent.size);
  h.has_tracestate = parsed.has_tracestate;
  if (parsed.has_tracestate) h.tracestate.assign(parsed.tracestate.data, parsed.tracestate.size);
  h.size = size;
  h.parsed = true;
  return true;
}

// Decodes as much of a chunked body as has arrived; true once the last chunk and the
// trailers are in.
bool HttpFrontend::ReadChunked(Conn* c) {
  Head& h = c->head;
  const char* base = c->in.data() + c->in_start + h.size;
  const size_t avail = c->in.size() - c->in_start - h.size;
  for (;;) {
    http::Chunk chunk;
    const http::Error e = http::DecodeChunk(base + h.chunk_pos, avail - h.chunk_pos, h.body.size(), parse_limits_, &chunk);
    if (e == http::Error::kIncomplete) {
      // Decoded chunks leave the input buffer: what waits for the rest of the body is the
      // body itself, not its encoding (tiny chunks with long extensions would multiply it).
      if (h.chunk_pos > 0) {
        c->in.erase(c->in_start + h.size, h.chunk_pos);
        h.chunk_pos = 0;
      }
      return false;
    }
    if (e != http::Error::kOk) {
      RejectParse(c, e);
      return false;
    }
    h.body.append(chunk.data.data, chunk.data.size);
    h.chunk_pos += chunk.consumed;
    if (chunk.last) return true;
  }
}

void HttpFrontend::EndDrainRead(Conn* c) {
  if (c->drain_read) {
    c->drain_read = false;
    --drain_reads_;
  }
}

void HttpFrontend::Dispatch(Conn* c, const char* body, size_t body_size) {
  Head& h = c->head;
  const uint64_t seq = c->next_seq++;
  ++unanswered_;
  EndDrainRead(c);
  if (!h.keep_alive) {
    c->close_after = static_cast<int64_t>(seq);
    c->rejected = true;  // nothing after a Connection: close request is read
  }
  // Also while draining: only requests the drain lets through reach here (see ApplyDrain).
  if (!h.has_header_length && h.method == "POST") {
    std::shared_ptr<const InferRoute> route;
    {
      std::lock_guard<std::mutex> lk(routes_mu_);
      auto it = routes_.find(h.target);
      // Without an infer grant the request goes to Python, which explains the 401/403 and audits it.
      if (it != routes_.end() && InferGrantedLocked(c, h)) route = it->second;
    }
    const bool traced = route && tracing_.load(std::memory_order_relaxed) && Sampled(h);
    if (route && route->canary) {  // a weighted rollout: this request's version, drawn
      const bool to_canary = NextDraw() % 1000000 < route->canary_per_million;
      if (SubmitNative(c, seq, to_canary ? route->canary : route, body, body_size, traced)) {
        (to_canary ? route->routed_canary : route->routed).fetch_add(1, std::memory_order_relaxed);
        return;
      }
    } else if (route && SubmitNative(c, seq, route, body, body_size, traced)) {
      return;
    }
  }
  ForwardedRequest f;
  f.conn = c->id;
  f.seq = seq;
  f.method = std::move(h.method);
  f.target = std::move(h.target);
  f.body.assign(body, body_size);
  if (!c->python_knows) f.peer = c->peer;
  f.has_header_length = h.has_header_length;
  f.header_length = std::move(h.header_length);
  f.has_authorization = h.has_authorization;
  f.authorization = std::move(h.authorization);
  f.has_traceparent = h.has_traceparent;
  f.traceparent = std::move(h.traceparent);
  f.has_tracestate = h.has_tracestate;
  f.tracestate = std::move(h.tracestate);
  if (tracing_.load(std::memory_order_relaxed)) f.received_ns = SecondsToNs(c->reading_since);
  c->python_knows = true;
  ToPython(std::move(f));
}

void HttpFrontend::ToPython(ForwardedRequest f) {
  bool was_empty;
  {
    std::lock_guard<std::mutex> lk(inbox_mu_);
    was_empty = inbox_.empty();
    inbox_.push_back(std::move(f));
  }
  if (was_empty) {  // Python is woken once per burst
    const uint64_t one = 1;
    ssize_t n = write(python_fd_, &one, sizeof(one));
    (void)n;
  }
}

uint64_t HttpFrontend::NextDraw() {  // xorshift64
  draw_state_ ^= draw_state_ << 13;
  draw_state_ ^= draw_state_ >> 7;
  draw_state_ ^= draw_state_ << 17;
  return draw_state_;
}

bool HttpFrontend::Sampled(const Head& h) {
  http::TraceParent parent;
  if (h.has_traceparent && http::ParseTraceparent(h.traceparent.data(), h.traceparent.size(), &parent))
    return parent.sampled();  // parent-based: the caller decided
  return (NextDraw() >> 11) < trace_threshold_.load(std::memory_order_relaxed);
}

void HttpFrontend::SetTracing(bool on, double ratio) {
  ratio = std::clamp(ratio, 0.0, 1.0);
  trace_threshold_.store(static_cast<uint64_t>(ratio * 9007199254740992.0));  // ratio x 2^53
  tracing_.store(on);
}

std::vector<TraceRecord> HttpFrontend::TakeTraces(uint64_t* dropped) {
  std::vector<TraceRecord> out;
  std::lock_guard<std::mutex> lk(traces_mu_);
  out.swap(traces_);
  *dropped = traces_dropped_;
  traces_dropped_ = 0;
  return out;
}

void HttpFrontend::FinishTrace(std::unique_ptr<TraceRecord> trace, const Request& r, int status) {
  TraceRecord& t = *trace;
  t.status = status;
  t.rows = r.rows;
  t.batch_rows = r.batch_rows;
  if (r.batch_start != Clock::time_point{}) {
    t.batch_start_ns = SteadyNs(r.batch_start);
    t.features_ns = r.features_done == Clock::time_point{} ? 0 : SteadyNs(r.features_done);
    t.batch_end_ns = SteadyNs(r.batch_end);
  }
  t.answered_ns = SteadyNs(Clock::now());
  std::lock_guard<std::mutex> lk(traces_mu_);
  if (traces_.size() >= kMaxTraces) {
    ++traces_dropped_;
    return;
  }
  traces_.push_back(std::move(t));
}

// Declines (false) whatever the general path must handle or explain: requests the JSON
// codec does not take, and invalid arguments. Refusals under load are answered here.
bool HttpFrontend::SubmitNative(Conn* c, uint64_t seq, const std::shared_ptr<const InferRoute>& route,
                                const char* body, size_t body_size, bool traced) {
  // Under overload a request is refused before its body is decoded: a refusal then costs
  // reading its bytes, not parsing thousands of numbers that the server would throw away.
  const Status admission = route->batcher->Admission();
  if (admission != Status::kOk) {
    Refuse(c, seq, *route, admission);
    return true;
  }
  thread_local std::vector<std::pair<const char*, const char*>> spans;
  std::string id;
  bool has_id = false;
  const int64_t rows = route->codec->Parse(body, body_size, &spans, &id, &has_id);
  if (rows <= 0 || rows > static_cast<int64_t>(body_size) / std::max<int64_t>(route->row_elements, 1)) return false;
  Batcher& batcher = *route->batcher;
  Request* r = batcher.Acquire(rows);
  if (!route->codec->Fill(spans, rows, r->input.data())) {
    batcher.Release(r);
    return false;
  }
  r->json_response = true;
  r->has_id = has_id;
  r->id = std::move(id);
  r->sink = this;
  const uint64_t token = next_token_++;
  std::unique_ptr<TraceRecord> trace;
  if (traced) {
    const Head& h = c->head;
    trace = std::make_unique<TraceRecord>();
    http::TraceParent parent;
    if (h.has_traceparent && http::ParseTraceparent(h.traceparent.data(), h.traceparent.size(), &parent)) {
      std::copy(std::begin(parent.trace_id), std::end(parent.trace_id), trace->trace_id.begin());
      std::copy(std::begin(parent.parent_id), std::end(parent.parent_id), trace->parent_id.begin());
      trace->has_parent = true;
      if (h.has_tracestate) trace->tracestate = h.tracestate;
    }
    trace->target = h.target;
    trace->model = route->model;
    trace->version = route->version;
    trace->received_ns = SecondsToNs(c->reading_since);
    trace->parsed_ns = SteadyNs(Clock::now());
    r->traced = true;
  }
  Pending& pending = pending_.emplace(token, Pending{c->id, seq, route, std::move(trace)}).first->second;
  // The thread that runs inline batches is told once, after the whole round is queued
  // (see Loop): waking it at the first row would hand it the core for a batch of one.
  const Status status = batcher.Enqueue(r, token, 0, 0, /*defer_ready=*/true);
  if (pending.trace && status == Status::kOk) pending.trace->enqueued_ns = SteadyNs(r->enqueue_time);
  if (status != Status::kOk) {
    pending_.erase(token);
    batcher.Release(r);
    if (status != Status::kQueueFull && status != Status::kOverloaded && status != Status::kShutdown) return false;
    Refuse(c, seq, *route, status);
    return true;
  }
  c->tokens.push_back(token);
  bool driven = false;
  for (Driven& d : driven_)
    if (d.batcher.get() == &batcher) driven = d.kick = true;
  if (!driven && batcher.ready_fd() >= 0 &&
      std::none_of(queued_this_round_.begin(), queued_this_round_.end(),
                   [&](const std::shared_ptr<Batcher>& b) { return b.get() == &batcher; }))
    queued_this_round_.push_back(route->batcher);
  return true;
}

// A refusal by the batcher, answered here: under overload Python (busy running batches)
// must not stand between a client and its 503. Same words and counts as engine/server.py.
void HttpFrontend::Refuse(Conn* c, uint64_t seq, const InferRoute& route, Status status) {
  const std::string model = "'" + route.model + "'";
  std::string message;
  if (status == Status::kQueueFull) {
    message = "queue of model " + model + " is full";
  } else if (status == Status::kOverloaded) {
    char ms[32];
    std::snprintf(ms, sizeof(ms), "%g", static_cast<double>(route.batcher->config().shed_queue_wait_us) / 1000.0);
    message = "model " + model + " is overloaded: its queue holds more than " + ms + " ms of work; retry later";
  } else {
    message = "model " + model + " is shutting down";
  }
  {
    std::lock_guard<std::mutex> lk(counters_mu_);
    ++failures_[{route.model, route.version, status == Status::kShutdown ? "bad_request" : "rejected"}];
  }
  Answer(c, seq, ErrorResponse(503, message, false));
}

void HttpFrontend::ProcessOutbox() {
  outbox_filled_here_ = false;
  std::vector<Outgoing> batch;
  {
    std::lock_guard<std::mutex> lk(outbox_mu_);
    batch.swap(outbox_);
  }
  for (Outgoing& o : batch) {
    if (o.request == nullptr) {
      if (Conn* c = Find(o.conn)) Answer(c, o.seq, std::move(o.response));
      continue;
    }
    Request* r = o.request;
    auto it = pending_.find(r->token);
    if (it == pending_.end()) {
      o.batcher->Release(r);
      continue;
    }
    Pending pending = std::move(it->second);
    pending_.erase(it);
    Conn* c = Find(pending.conn);
    if (c != nullptr) {
      auto& tokens = c->tokens;
      auto t = std::find(tokens.begin(), tokens.end(), r->token);
      if (t != tokens.end()) {
        *t = tokens.back();
        tokens.pop_back();
      }
      const InferRoute& route = *pending.route;
      const Status status = r->status.load();
      if (status == Status::kOk) {
        const std::string body = route.codec->Format(r->output.data(), r->rows, r->id, r->has_id);
        std::string response = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ";
        response += std::to_string(body.size());
        response += "\r\n\r\n";
        response += body;
        Answer(c, pending.seq, std::move(response));
        if (pending.trace) FinishTrace(std::move(pending.trace), *r, 200);
      } else {
        // The same words and failure reasons as the Python path (engine/http.py InferCall).
        const std::string model = "'" + route.model + "'";
        int code = 503;
        const char* reason;
        std::string message;
        if (status == Status::kError) {
          code = 500;
          reason = "backend_error";
          message = "model " + model + " version " + route.version + " failed: " + r->error;
        } else if (status == Status::kTimeout) {
          reason = "timeout";
          message = "request for model " + model + " timed out in the queue";
        } else {
          reason = status == Status::kShutdown    ? "shutdown"
                   : status == Status::kCancelled ? "cancelled"
                   : status == Status::kQueueFull ? "rejected"
                                                  : "backend_error";
          message = "request for model " + model + " was not run: " + (r->error.empty() ? StatusName(status) : r->error);
        }
        {
          std::lock_guard<std::mutex> lk(counters_mu_);
          ++failures_[{route.model, route.version, reason}];
        }
        Answer(c, pending.seq, ErrorResponse(code, message, false));
        if (pending.trace) FinishTrace(std::move(pending.trace), *r, code);
      }
    }
    o.batcher->Release(r);
  }
}

void HttpFrontend::Answer(Conn* c, uint64_t seq, std::string response) {
  if (seq != c->next_write) {
    c->held.emplace(seq, std::move(response));
    return;
  }
  if (c->out.empty()) {
    c->out.swap(response);
  } else {
    c->out += response;
  }
  ++c->next_write;
  if (!c->unsent) {  // answered, but in flight until Flush has sent it
    c->unsent = true;
    ++unsent_connections_;
  }
  --unanswered_;
  while (!c->held.empty() && c->held.begin()->first == c->next_write) {
    c->out += c->held.begin()->second;
    c->held.erase(c->held.begin());
    ++c->next_write;
    --unanswered_;
  }
  c->last_active = Now();
  if (c->close_after >= 0 && static_cast<int64_t>(c->next_write) > c->close_after) c->closing = true;
  if (!c->dirty) {
    c->dirty = true;
    dirty_.push_back(c);
  }
}

void HttpFrontend::Reject(Conn* c, int status, const std::string& message, const char* extra_headers) {
  if (c->rejected && c->close_after >= 0 && static_cast<int64_t>(c->next_seq) > c->close_after) return;
  CountHttpError(status);
  const uint64_t seq = c->next_seq++;
  ++unanswered_;
  EndDrainRead(c);
  c->rejected = true;
  c->close_after = static_cast<int64_t>(seq);
  Answer(c, seq, ErrorResponse(status, message, true, extra_headers));
}

void HttpFrontend::WatchWrites(Conn* c, bool on) {
  // Reading stops while a client leaves a backlog of unread responses.
  const bool backlog = c->out.size() - c->out_sent > kMaxUnsentOutput;
  const uint32_t events = (on ? EPOLLOUT : 0u) | (backlog || c->peer_closed ? 0u : static_cast<uint32_t>(EPOLLIN));
  if (events == c->events) return;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = c->id;
  epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, c->fd, &ev);
  c->events = events;
}

void HttpFrontend::Flush(Conn* c) {
  while (c->out_sent < c->out.size()) {
    const ssize_t n = send(c->fd, c->out.data() + c->out_sent, c->out.size() - c->out_sent, MSG_NOSIGNAL);
    if (n > 0) {
      c->out_sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      WatchWrites(c, true);
      if (!c->unsent) {
        c->unsent = true;
        ++unsent_connections_;
      }
      return;
    }
    Close(c);
    return;
  }
  c->out.clear();
  c->out_sent = 0;
  if (c->unsent) {
    c->unsent = false;
    --unsent_connections_;
  }
  WatchWrites(c, false);
  if (c->closing) {
    if (!c->rejected || c->peer_closed) {
      Close(c);
      return;
    }
    if (!c->lingering) {
      shutdown(c->fd, SHUT_WR);
      c->lingering = true;
      c->linger_until = Now() + kLingerSeconds;
    }
    return;
  }
  // Requests held back while the client had a backlog of responses.
  if (c->in_start < c->in.size()) {
    while (ParseOne(c)) {
    }
  }
}

void HttpFrontend::Close(Conn* c) {
  epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, c->fd, nullptr);
  close(c->fd);
  if (c->unsent) --unsent_connections_;
  EndDrainRead(c);
  unanswered_ -= static_cast<int64_t>(c->next_seq - c->next_write);
  // Queued fast-path requests of a client that has gone are dropped before they run.
  for (uint64_t token : c->tokens) {
    auto it = pending_.find(token);
    if (it != pending_.end()) it->second.route->batcher->Cancel(token);
  }
  if (c->python_knows) {
    ForwardedRequest notice;
    notice.conn = c->id;
    notice.closed = true;
    ToPython(std::move(notice));
  }
  if (c->dirty) dirty_.erase(std::remove(dirty_.begin(), dirty_.end(), c), dirty_.end());
  --open_connections_;
  conns_.erase(c->id);
}

void HttpFrontend::ApplyDrain() {
  // Requests whose bytes reached the kernel before the drain began were sent before the
  // signal: read and dispatch them now (fast routes still run), so that none is refused
  // or lost to the reset a close with unread input causes.
  std::vector<uint64_t> ids;
  ids.reserve(conns_.size());
  for (auto& [id, conn] : conns_)
    if (!conn->closing && !conn->lingering && !conn->rejected) ids.push_back(id);
  for (uint64_t id : ids)
    if (Conn* c = Find(id)) OnReadable(c);
  draining_ = true;
  std::vector<Conn*> idle;
  for (auto& [id, conn] : conns_) {
    Conn* c = conn.get();
    if (c->closing || c->lingering) continue;
    const bool reading = c->in_start < c->in.size();
    if (!reading && c->next_write == c->next_seq) {
      if (c->out.empty()) {
        idle.push_back(c);
      } else {  // close once the answers already written are sent
        c->close_after = static_cast<int64_t>(c->next_seq) - 1;
        c->closing = true;
      }
      continue;
    }
    const int64_t last = static_cast<int64_t>(reading ? c->next_seq : c->next_seq - 1);
    c->close_after = c->close_after >= 0 ? std::min(c->close_after, last) : last;
    if (reading && !c->rejected && !c->drain_read) {  // the rest of it is still on its way
      c->drain_read = true;
      ++drain_reads_;
    }
  }
  for (Conn* c : idle) Close(c);
}

void HttpFrontend::Sweep(double now) {
  std::vector<Conn*> expired;
  for (auto& [id, conn] : conns_) {
    Conn* c = conn.get();
    if (c->lingering) {
      if (now >= c->linger_until) expired.push_back(c);
    } else if (c->rejected || c->closing) {
      continue;
    } else if (c->reading_since != 0) {
      if (!c->head.parsed && now - c->reading_since > limits_.header_timeout_s)
        Reject(c, 408, "timed out waiting for request headers");
      else if (c->head.parsed && now - c->headers_done_at > limits_.body_timeout_s)
        Reject(c, 408, "timed out waiting for the request body");
    } else if (c->next_seq == c->next_write && c->out.empty() &&
               // The first request must arrive within the header timeout.
               now - c->last_active > (c->next_seq == 0 ? limits_.header_timeout_s : limits_.idle_timeout_s)) {
      expired.push_back(c);
    }
  }
  for (Conn* c : expired) Close(c);
}

}  // namespace vivace

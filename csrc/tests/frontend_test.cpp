// Stress test of the native HTTP front end for the sanitizer builds (ASan/UBSan, TSan):
// real sockets on 127.0.0.1, real batchers, an "owner" thread standing in for Python
// (Take/Respond, driving an inline batcher through ready_fd). Several client threads
// pipeline fast-path and forwarded requests while routes and driven batchers change,
// clients vanish with requests queued, and malformed requests arrive; then the server
// drains and shuts down in the order the Python side uses. Every response must be the
// right one, in request order. Exits non-zero on the first violation.
//
// Phases (an argument runs only those whose name contains it): "drain meets answer",
// "mixed traffic", "drain", "shutdown with queued requests", "stop with requests in flight".
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "batcher/batcher.h"
#include "batcher/oip_json.h"
#include "frontend/frontend.h"
#include "frontend/sha256.h"

using vivace::Batcher;
using vivace::BatcherConfig;
using vivace::HttpFrontend;
using vivace::InferRoute;
using vivace::JsonTensor;
using vivace::JsonType;
using vivace::OipJsonCodec;
using vivace::Status;

namespace {

using Routes = std::unordered_map<std::string, std::shared_ptr<const InferRoute>>;
using SteadyClock = std::chrono::steady_clock;

std::atomic<const char*> current_phase{"start"};

[[noreturn]] void Fail(const std::string& what) {
  std::fflush(stdout);
  std::fprintf(stderr, "FAILED (%s): %s\n", current_phase.load(), what.c_str());
  std::fflush(stderr);
  std::_Exit(1);
}

void Check(bool ok, const std::string& what) {
  if (!ok) Fail(what);
}

std::string Clip(const std::string& s) { return s.size() > 300 ? s.substr(0, 300) + "..." : s; }

// Waits up to `seconds` for `done`; false on timeout.
template <typename F>
bool WaitFor(double seconds, F done) {
  const auto until = SteadyClock::now() + std::chrono::duration<double>(seconds);
  while (!done()) {
    if (SteadyClock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

// -- the model: 4 INT64 features per row; the output is their sum ---------------------------

constexpr int64_t kWidth = 4;

struct Model {
  std::string name, target;
  std::shared_ptr<Batcher> batcher;
  std::shared_ptr<const OipJsonCodec> codec;
  std::shared_ptr<const InferRoute> route;
};

std::shared_ptr<Model> MakeModel(const std::string& name, BatcherConfig config, int execute_sleep_us = 0) {
  config.model_name = name;
  config.input_row_bytes = {kWidth * 8};
  config.output_row_bytes = {8};
  // The execute function outlives the Model when a route still holds the batcher: it
  // reaches the batcher through a holder it shares, never through the Model.
  auto holder = std::make_shared<Batcher*>(nullptr);
  auto model = std::make_shared<Model>();
  model->name = name;
  model->target = "/v2/models/" + name + "/infer";
  model->batcher = std::make_shared<Batcher>(config, [holder, execute_sleep_us](int executor, int64_t rows) {
    if (execute_sleep_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(execute_sleep_us));
    Batcher* b = *holder;
    const auto* in = reinterpret_cast<const int64_t*>(b->input_buffer(executor, 0));
    auto* out = reinterpret_cast<int64_t*>(b->output_buffer(executor, 0));
    for (int64_t r = 0; r < rows; ++r) {
      int64_t sum = 0;
      for (int64_t k = 0; k < kWidth; ++k) sum += in[r * kWidth + k];
      out[r] = sum;
    }
  });
  *holder = model->batcher.get();  // before any request: Enqueue's lock orders it for the executors
  model->codec = std::make_shared<OipJsonCodec>(
      name, "1", std::vector<JsonTensor>{{"x", "INT64", JsonType::kI64, {kWidth}, kWidth}},
      std::vector<JsonTensor>{{"y", "INT64", JsonType::kI64, {1}, 1}});
  Check(model->codec->usable(), "codec unusable");
  auto route = std::make_shared<InferRoute>();
  route->batcher = model->batcher;
  route->codec = model->codec;
  route->model = name;
  route->version = "1";
  route->row_elements = kWidth;
  model->route = route;
  return model;
}

// The row sums of a request body, formatted as the codec formats a response: both the
// native path and the owner's answer must produce exactly this.
std::string ExpectedBody(const Model& m, const std::vector<int64_t>& values, const std::string& id) {
  const int64_t rows = static_cast<int64_t>(values.size()) / kWidth;
  std::vector<int64_t> sums(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < kWidth; ++k) sums[static_cast<size_t>(r)] += values[static_cast<size_t>(r * kWidth + k)];
  return m.codec->Format(reinterpret_cast<const uint8_t*>(sums.data()), rows, id, true);
}

std::string HttpResponse(int status, const std::string& body, bool close = false) {
  std::string out = "HTTP/1.1 " + std::to_string(status) + (status == 200 ? " OK" : " Error") +
                    "\r\ncontent-type: application/json\r\ncontent-length: " + std::to_string(body.size()) + "\r\n";
  if (close) out += "connection: close\r\n";
  return out + "\r\n" + body;
}

// -- the owner: what Python does with forwarded requests --------------------------------------

class Owner {
 public:
  Owner(HttpFrontend* frontend, std::vector<std::shared_ptr<Model>> models, Batcher* owner_driven, Batcher* switchable)
      : frontend_(frontend), models_(std::move(models)), owner_driven_(owner_driven), switchable_(switchable) {
    thread_ = std::thread([this] { Run(); });
  }
  ~Owner() { Join(); }

  void Join() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }

  std::atomic<bool> refuse_infer{false};    // draining or shut down: infer gets 503
  std::atomic<bool> drive_switchable{false};  // the front end does not drive `switchable` now

  // After Join(): connections that sent requests, and closed notices per connection.
  std::set<uint64_t> seen;
  std::map<uint64_t, int> closed;
  int64_t answered = 0;

 private:
  struct Answer {
    uint64_t conn, seq;
    std::string response;
  };

  std::string Handle(const vivace::ForwardedRequest& f) {
    if (f.method == "POST") {
      for (const auto& m : models_) {
        if (f.target != m->target) continue;
        // The general path: decode, run, format (here: the same codec, the same sums).
        std::vector<std::pair<const char*, const char*>> spans;
        std::string id;
        bool has_id = false;
        const int64_t rows = m->codec->Parse(f.body.data(), f.body.size(), &spans, &id, &has_id);
        if (rows <= 0) break;  // declined on purpose by the client: echo it
        if (refuse_infer) return HttpResponse(503, "{\"error\":\"refused\"}");
        std::vector<int64_t> values(static_cast<size_t>(rows * kWidth));
        Check(m->codec->Fill(spans, rows, reinterpret_cast<uint8_t*>(values.data())), "owner: Fill failed");
        Check(has_id, "owner: infer without id");
        return HttpResponse(200, ExpectedBody(*m, values, id));
      }
    }
    return HttpResponse(200, "fwd " + f.method + " " + f.target + " " + f.body);
  }

  void Run() {
    std::vector<Answer> deferred;
    std::mt19937 rng(99);
    double owner_due = 0, switch_due = 0;
    auto now_s = [] { return std::chrono::duration<double>(SteadyClock::now().time_since_epoch()).count(); };
    for (;;) {
      const bool stopping = stop_.load();
      pollfd fds[3] = {{frontend_->python_fd(), POLLIN, 0}, {-1, POLLIN, 0}, {-1, POLLIN, 0}};
      if (owner_driven_ != nullptr) fds[1].fd = owner_driven_->ready_fd();
      const bool drive_switch = switchable_ != nullptr && drive_switchable.load();
      if (drive_switch) fds[2].fd = switchable_->ready_fd();
      poll(fds, 3, 2);
      const double now = now_s();
      // Inline batchers, as the Python loop drives them: on ready_fd, or when a delayed batch is due.
      if (owner_driven_ != nullptr && ((fds[1].revents & POLLIN) || (owner_due != 0 && now >= owner_due))) {
        const int64_t wait = owner_driven_->RunReady();
        owner_due = wait < 0 ? 0 : now_s() + static_cast<double>(wait) * 1e-6;
      }
      if (drive_switch && ((fds[2].revents & POLLIN) || (switch_due != 0 && now >= switch_due))) {
        const int64_t wait = switchable_->RunReady();
        switch_due = wait < 0 ? 0 : now_s() + static_cast<double>(wait) * 1e-6;
      }
      // Answers wait one round, in reverse order: they come back out of order relative to
      // each other and to the fast path, and the front end must restore request order.
      for (auto it = deferred.rbegin(); it != deferred.rend(); ++it)
        frontend_->Respond(it->conn, it->seq, std::move(it->response));
      answered += static_cast<int64_t>(deferred.size());
      deferred.clear();
      for (const auto& f : frontend_->Take()) {
        if (f.closed) {
          Check(seen.count(f.conn) == 1, "closed notice for a connection Python never saw");
          Check(++closed[f.conn] == 1, "two closed notices for one connection");
          continue;
        }
        Check(closed.count(f.conn) == 0, "a request forwarded after its connection's closed notice");
        seen.insert(f.conn);
        deferred.push_back({f.conn, f.seq, Handle(f)});
      }
      if (rng() % 4 == 0 && !deferred.empty()) {  // sometimes answer at once
        for (auto& a : deferred) frontend_->Respond(a.conn, a.seq, std::move(a.response));
        answered += static_cast<int64_t>(deferred.size());
        deferred.clear();
      }
      if (stopping && deferred.empty()) return;
    }
  }

  HttpFrontend* frontend_;
  std::vector<std::shared_ptr<Model>> models_;
  Batcher* owner_driven_;
  Batcher* switchable_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// -- the server under test ---------------------------------------------------------------------

struct Server {
  Server(std::vector<std::shared_ptr<Model>> all, vivace::FrontendLimits limits) : models(std::move(all)) {
    const int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    Check(listener >= 0, "socket");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    Check(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0, "bind");
    Check(listen(listener, 512) == 0, "listen");
    socklen_t len = sizeof(addr);
    getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
    port = ntohs(addr.sin_port);
    frontend = std::make_unique<HttpFrontend>(listener, limits);
    // The front end holds its own duplicate: with ours open, the socket would keep
    // listening (and queueing connections) after StopAccepting.
    close(listener);
  }

  Routes AllRoutes() const {
    Routes routes;
    for (const auto& m : models) routes[m->target] = m->route;
    return routes;
  }

  std::vector<std::shared_ptr<Model>> models;
  int port = 0;
  std::unique_ptr<HttpFrontend> frontend;
};

// -- the client side ----------------------------------------------------------------------------

int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  Check(fd >= 0, "client socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int error = errno;
    close(fd);
    errno = error;
    return -1;
  }
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  timeval tv{30, 0};  // a missing response fails the test instead of hanging it
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

// Sends `data` in a few fragments so that the server sees partial requests. False when
// the server has closed the connection.
bool SendAll(int fd, const std::string& data, std::mt19937* rng) {
  size_t sent = 0;
  while (sent < data.size()) {
    size_t piece = data.size() - sent;
    if ((*rng)() % 3 == 0) piece = std::min(piece, 1 + static_cast<size_t>((*rng)() % 200));
    const ssize_t n = send(fd, data.data() + sent, piece, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      Check(errno == EPIPE || errno == ECONNRESET, std::string("send: ") + std::strerror(errno));
      return false;
    }
    sent += static_cast<size_t>(n);
  }
  return true;
}

struct Response {
  int status = 0;
  bool close = false;
  std::string body;
};

enum class Read { kOk, kEof };

// Reads one response (skipping 100 Continue). kEof: the connection closed (or was reset)
// with no partial response pending.
Read ReadResponse(int fd, std::string* buf, Response* out) {
  for (;;) {
    const size_t head_end = buf->find("\r\n\r\n");
    if (head_end != std::string::npos) {
      const std::string head = buf->substr(0, head_end);
      Check(head.compare(0, 9, "HTTP/1.1 ") == 0 && head.size() >= 12, "bad status line: " + Clip(head));
      out->status = std::atoi(head.c_str() + 9);
      std::string lower = head;
      std::transform(lower.begin(), lower.end(), lower.begin(),
                     [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
      size_t length = 0;
      const size_t cl = lower.find("\r\ncontent-length:");
      if (cl != std::string::npos) length = std::strtoul(lower.c_str() + cl + 17, nullptr, 10);
      Check(out->status == 100 || cl != std::string::npos, "response without content-length: " + Clip(head));
      out->close = lower.find("\r\nconnection: close") != std::string::npos;
      if (buf->size() >= head_end + 4 + length) {
        out->body = buf->substr(head_end + 4, length);
        buf->erase(0, head_end + 4 + length);
        if (out->status == 100) continue;
        return Read::kOk;
      }
    }
    char chunk[16384];
    const ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
    if (n > 0) {
      buf->append(chunk, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) Fail("no response within 30 s");
    Check(n == 0 || errno == ECONNRESET, std::string("recv: ") + std::strerror(errno));
    Check(buf->empty(), "connection closed in the middle of a response: " + Clip(*buf));
    return Read::kEof;
  }
}

// True when the server closes the connection without sending anything more.
void ExpectEof(int fd, std::string* buf, const char* what) {
  Response extra;
  if (ReadResponse(fd, buf, &extra) != Read::kEof)
    Fail(std::string(what) + ": a response after the last one: " + std::to_string(extra.status) + " " + Clip(extra.body));
}

struct Expect {
  int status = 200;
  std::string body;
  bool may_refuse = false;  // draining or shutting down: a 503 is a right answer too
};

// Builds requests and their expected responses for one client.
class Traffic {
 public:
  Traffic(const std::vector<std::shared_ptr<Model>>& models, unsigned seed, const std::string& tag)
      : models_(models), rng_(seed), tag_(tag) {}

  std::mt19937& rng() { return rng_; }
  size_t Roll(size_t n) { return rng_() % n; }

  // One fast-path infer request to `m` (chunked sometimes).
  void Infer(const Model& m, std::string* wire, std::vector<Expect>* expects, bool close = false) {
    const std::string id = tag_ + "-" + std::to_string(serial_++);
    const int64_t rows = 1 + static_cast<int64_t>(rng_() % 5);
    std::vector<int64_t> values(static_cast<size_t>(rows * kWidth));
    std::string body = "{\"id\":\"" + id + "\",\"inputs\":[{\"name\":\"x\",\"shape\":[" + std::to_string(rows) +
                       ",4],\"datatype\":\"INT64\",\"data\":[";
    for (size_t i = 0; i < values.size(); ++i) {
      values[i] = static_cast<int64_t>(rng_() % 2001) - 1000;
      if (i) body += ',';
      body += std::to_string(values[i]);
    }
    body += "]}]}";
    Post(m.target, body, wire, close);
    expects->push_back({200, ExpectedBody(m, values, id), false});
  }

  // A request the front end forwards: a GET, or an infer body the fast path declines.
  void Forwarded(std::string* wire, std::vector<Expect>* expects) {
    const std::string id = tag_ + "-" + std::to_string(serial_++);
    if (rng_() % 2) {
      const std::string target = "/fwd/" + id;
      *wire += "GET " + target + " HTTP/1.1\r\nhost: t\r\n\r\n";
      expects->push_back({200, "fwd GET " + target + " ", false});
    } else {
      const Model& m = *models_[rng_() % models_.size()];
      const std::string body = "{\"id\":\"" + id + "\",\"parameters\":{},\"inputs\":[]}";
      Post(m.target, body, wire, false);
      expects->push_back({200, "fwd POST " + m.target + " " + body, false});
    }
  }

  // A mix of `count` requests over `fast` models and the forwarded kinds.
  void Mix(const std::vector<std::shared_ptr<Model>>& fast, int count, std::string* wire, std::vector<Expect>* expects) {
    for (int i = 0; i < count; ++i) {
      if (rng_() % 4 == 0)
        Forwarded(wire, expects);
      else
        Infer(*fast[rng_() % fast.size()], wire, expects);
    }
  }

 private:
  void Post(const std::string& target, const std::string& body, std::string* wire, bool close) {
    *wire += "POST " + target + " HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n";
    if (close) *wire += "connection: close\r\n";
    if (rng_() % 8 == 0) {
      // Chunked, in two chunks (with a chunk extension on the first).
      const size_t half = body.size() / 2;
      char size1[32], size2[32];
      std::snprintf(size1, sizeof(size1), "%zx;ext=1\r\n", half);
      std::snprintf(size2, sizeof(size2), "%zx\r\n", body.size() - half);
      *wire += "transfer-encoding: chunked\r\n\r\n";
      *wire += size1 + body.substr(0, half) + "\r\n" + size2 + body.substr(half) + "\r\n0\r\n\r\n";
    } else {
      if (rng_() % 16 == 0) *wire += "expect: 100-continue\r\n";
      *wire += "content-length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    }
  }

  std::vector<std::shared_ptr<Model>> models_;
  std::mt19937 rng_;
  std::string tag_;
  uint64_t serial_ = 0;
};

// Checks one response against its expectation; returns false if it was a refusal.
bool CheckResponse(const Response& r, const Expect& e, const std::string& where) {
  if (e.may_refuse && r.status == 503) return false;
  if (r.status != e.status || r.body != e.body)
    Fail(where + ": expected " + std::to_string(e.status) + " " + Clip(e.body) + "\n   got " +
         std::to_string(r.status) + " " + Clip(r.body));
  return true;
}

// Sends `wire` and reads `expects` in order. Returns the responses read; stops at EOF when
// `eof_ok` (draining), else an early EOF fails.
size_t Exchange(int fd, const std::string& wire, const std::vector<Expect>& expects, std::mt19937* rng,
                bool eof_ok, const std::string& where, bool* closed) {
  std::string buf;
  *closed = !SendAll(fd, wire, rng);
  Check(!*closed || eof_ok, where + ": the server closed the connection while we sent");
  size_t got = 0;
  for (const Expect& e : expects) {
    Response r;
    if (ReadResponse(fd, &buf, &r) == Read::kEof) {
      Check(eof_ok, where + ": connection closed with " + std::to_string(expects.size() - got) + " responses missing");
      *closed = true;
      return got;
    }
    ++got;
    CheckResponse(r, e, where);
    if (r.close) {
      ExpectEof(fd, &buf, where.c_str());
      *closed = true;
      Check(eof_ok || got == expects.size(), where + ": connection: close before the last response");
      return got;
    }
  }
  return got;
}

std::shared_ptr<Model> Inline(const std::string& name, int64_t max_batch, int64_t delay_us) {
  BatcherConfig c;
  c.max_batch_size = max_batch;
  c.max_queue_delay_us = delay_us;
  c.inline_execution = true;
  return MakeModel(name, c);
}

std::shared_ptr<Model> Threaded(const std::string& name, int executors, int64_t max_batch, int64_t delay_us,
                                int sleep_us = 0) {
  BatcherConfig c;
  c.max_batch_size = max_batch;
  c.max_queue_delay_us = delay_us;
  c.executors = executors;
  return MakeModel(name, c, sleep_us);
}

// -- phase 1: mixed traffic while routes and driven batchers change -------------------------------

struct Malformed {
  std::string wire;
  int status;
};

std::vector<Malformed> MalformedRequests() {
  std::vector<Malformed> bad;
  bad.push_back({"GARBAGE\r\n\r\n", 400});
  bad.push_back({"GET /x HTTP/2.0\r\n\r\n", 400});
  bad.push_back({"POST /x HTTP/1.1\r\ncontent-length: 100000\r\n\r\n", 413});
  bad.push_back({"POST /x HTTP/1.1\r\ncontent-length: 12abc\r\n\r\n", 400});
  bad.push_back({"POST /x HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd", 400});
  bad.push_back({"POST /x HTTP/1.1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", 400});
  bad.push_back({"POST /x HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", 400});
  bad.push_back({"POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400});
  bad.push_back({"POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n", 400});
  bad.push_back({"POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n20000\r\n", 413});  // one chunk too big
  bad.push_back({"POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n9c40\r\n" + std::string(40000, 'a') +
                     "\r\n9c40\r\n",
                 413});  // two chunks too big together
  bad.push_back({"GET /x HTTP/1.1\r\nno colon here\r\n\r\n", 400});
  bad.push_back({"GET /x HTTP/1.1\r\nbad name: v\r\n\r\n", 400});
  bad.push_back({"GET /x HTTP/1.1\r\nx-big: " + std::string(5000, 'a') + "\r\n\r\n", 431});
  bad.push_back({"GET /x HTTP/1.1\r\nx-big: " + std::string(6000, 'a'), 431});  // no end of headers
  std::string many = "GET /x HTTP/1.1\r\n";
  for (int i = 0; i < 40; ++i) many += "x-h" + std::to_string(i) + ": v\r\n";
  bad.push_back({many + "\r\n", 431});
  return bad;
}

void MalformedClient(const Server& server, std::map<int, uint64_t>* sent_errors) {
  Traffic traffic(server.models, 5, "bad");
  const auto bad = MalformedRequests();
  for (int round = 0; round < 3; ++round) {
    for (const Malformed& m : bad) {
      const int fd = Connect(server.port);
      Check(fd >= 0, "connect (malformed)");
      // Sometimes valid requests first (they are answered, in order), and always a valid
      // request after the bad one: nothing past the refusal may be answered.
      std::string wire;
      std::vector<Expect> expects;
      if (round > 0) traffic.Mix({server.models[0], server.models[2]}, 1 + round, &wire, &expects);
      wire += m.wire;
      std::string after;
      std::vector<Expect> ignored;
      traffic.Infer(*server.models[0], &after, &ignored);
      if (m.wire.find("\r\n\r\n") != std::string::npos) wire += after;
      std::string buf;
      if (!SendAll(fd, wire, &traffic.rng())) Fail("malformed: the server closed before the request was sent");
      for (const Expect& e : expects) {
        Response r;
        Check(ReadResponse(fd, &buf, &r) == Read::kOk, "malformed: a valid request before the bad one got no answer");
        CheckResponse(r, e, "malformed (valid prefix)");
      }
      Response r;
      Check(ReadResponse(fd, &buf, &r) == Read::kOk, "malformed: no error response for " + Clip(m.wire));
      if (r.status != m.status || !r.close || r.body.find("\"error\"") == std::string::npos)
        Fail("malformed: for " + Clip(m.wire) + " expected " + std::to_string(m.status) + " with connection: close, got " +
             std::to_string(r.status) + " " + Clip(r.body));
      ++(*sent_errors)[m.status];
      ExpectEof(fd, &buf, "malformed");
      close(fd);
    }
  }
}

void PipelineClient(const Server& server, int index, int rounds) {
  Traffic traffic(server.models, static_cast<unsigned>(100 + index), "p" + std::to_string(index));
  const std::vector<std::shared_ptr<Model>> fast = {server.models[0], server.models[1], server.models[2]};
  int fd = -1;
  for (int round = 0; round < rounds; ++round) {
    if (fd < 0) {
      fd = Connect(server.port);
      Check(fd >= 0, "connect (pipeline)");
    }
    std::string wire;
    std::vector<Expect> expects;
    traffic.Mix(fast, 1 + static_cast<int>(traffic.Roll(24)), &wire, &expects);
    const bool last_on_connection = traffic.Roll(8) == 0;
    if (last_on_connection && traffic.Roll(2)) {
      traffic.Infer(*fast[traffic.Roll(fast.size())], &wire, &expects, /*close=*/true);
    }
    bool closed = false;
    Exchange(fd, wire, expects, &traffic.rng(), false, "pipeline " + std::to_string(index), &closed);
    if (closed || last_on_connection) {
      close(fd);
      fd = -1;
    }
  }
  if (fd >= 0) close(fd);
}

// Clients that go away with requests queued: the front end must cancel them in the
// batcher (model "slow" waits 50 ms for a batch) and never answer a closed connection.
void CancelClient(const Server& server, int iterations) {
  Traffic traffic(server.models, 7, "c");
  const Model& slow = *server.models[3];
  for (int i = 0; i < iterations; ++i) {
    const int fd = Connect(server.port);
    Check(fd >= 0, "connect (cancel)");
    std::string wire;
    std::vector<Expect> expects;
    const int count = 1 + static_cast<int>(traffic.Roll(6));
    for (int k = 0; k < count; ++k) traffic.Infer(slow, &wire, &expects);
    traffic.Mix({server.models[1], server.models[2]}, 2, &wire, &expects);  // and some on other models
    SendAll(fd, wire, &traffic.rng());
    switch (i % 4) {
      case 0: {  // reset
        linger l{1, 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
        break;
      }
      case 1:  // half-close: the server reads EOF with the requests still queued
        shutdown(fd, SHUT_WR);
        break;
      case 2: {  // wait for the first (slow) answer, then leave
        std::string buf;
        Response r;
        Check(ReadResponse(fd, &buf, &r) == Read::kOk, "cancel: no first response");
        CheckResponse(r, expects[0], "cancel");
        break;
      }
      default:
        break;
    }
    close(fd);
  }
}

// Changes the fast routes and the driven batchers while traffic runs.
// A weighted rollout's route for model m: the same model as its own "canary" (so every
// answer stays what the clients expect), drawn per request at `percent`.
std::shared_ptr<const InferRoute> SplitRoute(const Model& m, uint32_t percent) {
  auto copy = [&m] {  // InferRoute's counters make it non-copyable: field by field
    auto route = std::make_shared<InferRoute>();
    route->batcher = m.batcher;
    route->codec = m.codec;
    route->model = m.name;
    route->version = "1";
    route->row_elements = kWidth;
    return route;
  };
  auto split = copy();
  split->canary = copy();
  split->canary_per_million = percent * 10000;
  return split;
}

void Chaos(HttpFrontend* frontend, const Server& server, Owner* owner, std::atomic<bool>* stop) {
  std::mt19937 rng(3);
  const auto& m = server.models;
  bool driving_switchable = true;
  uint64_t routed = 0;
  while (!stop->load()) {
    Routes routes = server.AllRoutes();
    const auto pick = rng() % 5;
    if (pick == 1) routes.erase(m[0]->target);  // forwarded: the owner runs them
    if (pick == 2) routes.erase(m[2]->target);
    if (pick == 3) routes.clear();
    if (pick == 4) routes[m[1]->target] = SplitRoute(*m[1], 50);  // routes replaced while counting
    frontend->SetRoutes(std::move(routes));
    for (const auto& counts : frontend->TakeRouted()) routed += counts.stable + counts.canary;
    const auto driven = rng() % 3;
    const bool drive_switchable = driven != 2;
    // Hand the switchable inline batcher over without a gap: whoever takes it over
    // starts before the other lets go (both running it meanwhile is allowed).
    if (!drive_switchable && driving_switchable) owner->drive_switchable = true;
    std::vector<std::shared_ptr<Batcher>> set;
    if (drive_switchable) set.push_back(m[0]->batcher);
    if (driven == 1) set.push_back(m[1]->batcher);  // also run by the owner: RunReady serialises
    frontend->SetDriven(set);
    if (drive_switchable && !driving_switchable) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // the front end kicks it when it applies the set
      owner->drive_switchable = false;
    }
    driving_switchable = drive_switchable;
    std::this_thread::sleep_for(std::chrono::milliseconds(3 + rng() % 10));
  }
  frontend->SetRoutes(server.AllRoutes());
  for (const auto& counts : frontend->TakeRouted()) routed += counts.stable + counts.canary;
  frontend->SetDriven({m[0]->batcher});
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  owner->drive_switchable = false;
  std::printf("mixed traffic: %llu requests answered through split routes\n", static_cast<unsigned long long>(routed));
}

// Python's shutdown order: stop accepting, drain, wait for what was accepted, shut the
// batchers down, stop driving, stop the front end; then the objects go.
void PythonShutdown(Server* server, Owner* owner, bool drain_batchers, double wait_s) {
  HttpFrontend& fe = *server->frontend;
  fe.StopAccepting();
  owner->refuse_infer = true;
  fe.SetRoutes({});
  fe.BeginDrain();
  Check(WaitFor(wait_s, [&] { return fe.InFlight() == 0; }),
        "drain: requests still unanswered after " + std::to_string(wait_s) + " s: " + std::to_string(fe.InFlight()));
  for (const auto& m : server->models) m->batcher->Shutdown(drain_batchers);
  owner->Join();
  fe.SetDriven({});
  fe.Stop();
}

void MixedTraffic() {
  current_phase = "mixed traffic";
  vivace::FrontendLimits limits;
  limits.max_body_bytes = 64 << 10;
  limits.max_header_bytes = 4 << 10;
  limits.max_headers = 32;
  Server server({Inline("driven", 8, 0), Inline("owned", 8, 300), Threaded("threads", 2, 8, 200, 50),
                 Threaded("slow", 1, 64, 50'000)},
                limits);
  HttpFrontend& fe = *server.frontend;
  fe.SetRoutes(server.AllRoutes());
  fe.SetDriven({server.models[0]->batcher});
  Owner owner(&fe, server.models, server.models[1]->batcher.get(), server.models[0]->batcher.get());
  std::atomic<bool> stop_chaos{false};
  std::thread chaos(Chaos, &fe, std::cref(server), &owner, &stop_chaos);
  std::map<int, uint64_t> sent_errors;
  std::vector<std::thread> clients;
  for (int i = 0; i < 3; ++i) clients.emplace_back(PipelineClient, std::cref(server), i, 800);
  clients.emplace_back(CancelClient, std::cref(server), 400);
  clients.emplace_back(MalformedClient, std::cref(server), &sent_errors);
  for (auto& t : clients) t.join();
  stop_chaos = true;
  chaos.join();

  // Every request read was answered or dropped with its connection; every connection is
  // gone (refused ones linger up to 2 s).
  Check(WaitFor(20, [&] { return fe.InFlight() == 0 && fe.Connections() == 0; }),
        "in flight " + std::to_string(fe.InFlight()) + ", connections " + std::to_string(fe.Connections()) +
            " after every client left");
  // Nothing of a departed client stays queued: the front end cancelled it.
  for (const auto& m : server.models)
    Check(WaitFor(5, [&] { return m->batcher->queued_requests() == 0; }),
          "model " + m->name + " still holds " + std::to_string(m->batcher->queued_requests()) +
              " queued requests after every client left");
  const auto errors = fe.HttpErrors();
  for (const auto& [status, count] : sent_errors)
    Check(errors.count(status) && errors.at(status) == count,
          "http error count for " + std::to_string(status) + " disagrees");
  Check(errors.size() == sent_errors.size(), "unexpected HTTP error statuses counted");
  for (const auto& [key, count] : fe.Failures())
    Fail("a natively answered request failed: " + std::get<0>(key) + " " + std::get<2>(key) + " x" +
         std::to_string(count));
  const auto& slow = server.models[3]->batcher->stats();
  const uint64_t cancelled = slow.failures[static_cast<size_t>(Status::kCancelled)].load();
  Check(cancelled > 0, "no queued request of a departed client was cancelled");
  std::printf("mixed: driven %llu, owned %llu, threads %llu, slow %llu ok; %llu cancelled; %zu http errors\n",
              static_cast<unsigned long long>(server.models[0]->batcher->stats().success.load()),
              static_cast<unsigned long long>(server.models[1]->batcher->stats().success.load()),
              static_cast<unsigned long long>(server.models[2]->batcher->stats().success.load()),
              static_cast<unsigned long long>(slow.success.load()), static_cast<unsigned long long>(cancelled),
              errors.size());

  PythonShutdown(&server, &owner, true, 10);
  // Python learns of each connection it saw, exactly once, when it closes.
  for (uint64_t conn : owner.seen) Check(owner.closed.count(conn) == 1, "no closed notice for a connection");
  std::printf("mixed: owner answered %lld forwarded requests on %zu connections\n",
              static_cast<long long>(owner.answered), owner.seen.size());
  server.frontend.reset();
}

// -- phase 2: drain while clients keep sending --------------------------------------------------

void DrainingClient(const Server& server, int index, std::atomic<int64_t>* answered) {
  Traffic traffic(server.models, static_cast<unsigned>(200 + index), "d" + std::to_string(index));
  const std::vector<std::shared_ptr<Model>> fast = {server.models[0], server.models[1], server.models[2]};
  for (;;) {
    const int fd = Connect(server.port);
    if (fd < 0) {
      Check(errno == ECONNREFUSED, std::string("connect (drain): ") + std::strerror(errno));
      return;  // no longer accepting
    }
    for (bool closed = false; !closed;) {
      std::string wire;
      std::vector<Expect> expects;
      traffic.Mix(fast, 1 + static_cast<int>(traffic.Roll(12)), &wire, &expects);
      for (Expect& e : expects) e.may_refuse = true;
      *answered += static_cast<int64_t>(
          Exchange(fd, wire, expects, &traffic.rng(), true, "drain " + std::to_string(index), &closed));
    }
    close(fd);
  }
}

void DrainUnderLoad() {
  current_phase = "drain";
  Server server({Inline("driven", 8, 0), Inline("owned", 8, 300), Threaded("threads", 2, 8, 200, 100)}, {});
  HttpFrontend& fe = *server.frontend;
  fe.SetRoutes(server.AllRoutes());
  fe.SetDriven({server.models[0]->batcher});
  Owner owner(&fe, server.models, server.models[1]->batcher.get(), nullptr);
  std::atomic<int64_t> answered{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < 3; ++i) clients.emplace_back(DrainingClient, std::cref(server), i, &answered);
  Check(WaitFor(20, [&] { return answered.load() > 2000; }), "drain: clients made no progress");
  PythonShutdown(&server, &owner, true, 20);
  for (auto& t : clients) t.join();  // each saw its connection close and a refused reconnect
  std::printf("drain: %lld responses before the server went\n", static_cast<long long>(answered.load()));
  server.frontend.reset();
}

// -- an answer that arrives as the drain begins -------------------------------------------------------

// The owner answers a connection's only request and begins the drain at once: the io
// thread may see both in one round. The answer must still be sent before the connection closes.
void DrainMeetsAnswer() {
  current_phase = "drain meets answer";
  int lost = 0;
  constexpr int kTrials = 30;
  for (int trial = 0; trial < kTrials; ++trial) {
    Server server({}, {});
    HttpFrontend& fe = *server.frontend;
    const int fd = Connect(server.port);
    Check(fd >= 0, "connect (drain meets answer)");
    std::mt19937 rng(static_cast<unsigned>(trial));
    Check(SendAll(fd, "GET /only HTTP/1.1\r\nhost: t\r\n\r\n", &rng), "send");
    std::vector<vivace::ForwardedRequest> taken;
    Check(WaitFor(10, [&] {
            for (auto& f : fe.Take()) taken.push_back(std::move(f));
            return !taken.empty();
          }),
          "the request was not forwarded");
    fe.Respond(taken[0].conn, taken[0].seq, HttpResponse(200, "only"));
    fe.BeginDrain();
    std::string buf;
    Response r;
    if (ReadResponse(fd, &buf, &r) == Read::kEof) {
      ++lost;
    } else {
      Check(r.status == 200 && r.body == "only", "drain meets answer: wrong response");
      ExpectEof(fd, &buf, "drain meets answer");
    }
    close(fd);
    fe.Stop();
  }
  Check(lost == 0, "drain meets answer: " + std::to_string(lost) + " of " + std::to_string(kTrials) +
                       " connections closed without their answer (ApplyDrain closes a connection whose answers"
                       " are queued but not yet sent)");
  std::printf("drain meets answer: %d trials\n", kTrials);
}

// -- phase 3: batchers shut down with requests queued, then Stop -----------------------------------

void ShutdownWithQueued() {
  current_phase = "shutdown with queued requests";
  // "parked" waits up to 10 s for a batch: its requests are queued when the batchers stop.
  Server server({Inline("driven", 8, 0), Inline("owned", 8, 300), Threaded("parked", 2, 1024, 10'000'000)}, {});
  HttpFrontend& fe = *server.frontend;
  fe.SetRoutes(server.AllRoutes());
  fe.SetDriven({server.models[0]->batcher});
  Owner owner(&fe, server.models, server.models[1]->batcher.get(), nullptr);
  constexpr int kClients = 4, kPerClient = 16;
  std::atomic<int> parked_sent{0}, sent{0};
  std::atomic<int> refused{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&, i] {
      Traffic traffic(server.models, static_cast<unsigned>(300 + i), "s" + std::to_string(i));
      const int fd = Connect(server.port);
      Check(fd >= 0, "connect (shutdown)");
      std::string wire;
      std::vector<Expect> expects;
      for (int k = 0; k < kPerClient; ++k) {
        if (k % 3 == 0) {
          traffic.Infer(*server.models[2], &wire, &expects);
          ++parked_sent;
        } else {
          traffic.Mix({server.models[0], server.models[1]}, 1, &wire, &expects);
        }
      }
      for (Expect& e : expects) e.may_refuse = true;
      std::string buf;
      Check(SendAll(fd, wire, &traffic.rng()), "shutdown: send");
      ++sent;
      for (size_t k = 0; k < expects.size(); ++k) {
        const Expect& e = expects[k];
        Response r;
        if (ReadResponse(fd, &buf, &r) != Read::kOk)
          Fail("shutdown: the connection closed with " + std::to_string(expects.size() - k) + " of " +
               std::to_string(expects.size()) + " requests unanswered");
        if (!CheckResponse(r, e, "shutdown")) ++refused;
      }
      ExpectEof(fd, &buf, "shutdown");
      close(fd);
    });
  }
  Batcher& parked = *server.models[2]->batcher;
  Check(WaitFor(20, [&] { return sent.load() == kClients && parked.queued_requests() == parked_sent.load(); }),
        "shutdown: the parked requests never queued");
  // Drain times out at once (the parked batch is not due): the batchers then fail what
  // they hold with kShutdown, and the front end answers it with 503 before it stops.
  fe.StopAccepting();
  owner.refuse_infer = true;
  fe.SetRoutes({});
  fe.BeginDrain();
  for (const auto& m : server.models) m->batcher->Shutdown(false);
  Check(WaitFor(10, [&] { return fe.InFlight() == 0; }), "shutdown: requests left unanswered");
  owner.Join();
  fe.SetDriven({});
  fe.Stop();
  for (auto& t : clients) t.join();
  Check(refused.load() >= parked_sent.load(), "shutdown: the parked requests were not refused");
  const auto failures = fe.Failures();
  const auto it = failures.find({"parked", "1", "shutdown"});
  Check(it != failures.end() && it->second == static_cast<uint64_t>(parked_sent.load()),
        "shutdown: failures counter disagrees");
  std::printf("shutdown: %d requests refused, %d parked\n", refused.load(), parked_sent.load());
  // Here the batchers go before the front end (the other phases destroy it first).
  server.models.clear();
  server.frontend.reset();
}

// -- phase 4: Stop() with requests still in batchers and executors running ----------------------------

void StopInFlight() {
  current_phase = "stop with requests in flight";
  Server server({Inline("driven", 8, 0), Threaded("threads", 2, 4, 0, 5000), Threaded("parked", 1, 1024, 10'000'000)},
                {});
  HttpFrontend& fe = *server.frontend;
  fe.SetRoutes(server.AllRoutes());
  fe.SetDriven({server.models[0]->batcher});
  std::atomic<bool> stopped{false};
  std::atomic<int64_t> answered{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < 3; ++i) {
    clients.emplace_back([&, i] {
      Traffic traffic(server.models, static_cast<unsigned>(400 + i), "x" + std::to_string(i));
      while (!stopped) {
        const int fd = Connect(server.port);
        if (fd < 0) return;
        for (bool closed = false; !closed;) {
          std::string wire;
          std::vector<Expect> expects;
          // Client 0 starts each round with a request that stays parked until Stop.
          for (int k = 0; k < 8; ++k)
            traffic.Infer(*server.models[i == 0 && k == 0 ? 2 : k % 2], &wire, &expects);
          answered += static_cast<int64_t>(
              Exchange(fd, wire, expects, &traffic.rng(), true, "stop " + std::to_string(i), &closed));
        }
        close(fd);
      }
    });
  }
  Check(WaitFor(20, [&] { return answered.load() > 100 && server.models[2]->batcher->queued_requests() > 0; }),
        "stop: no traffic");
  // No drain, batchers still running: Stop cancels what they hold and waits for it.
  fe.Stop();
  stopped = true;
  for (auto& t : clients) t.join();
  Check(server.models[2]->batcher->queued_requests() == 0, "stop: a parked request was not cancelled");
  server.frontend.reset();
  for (const auto& m : server.models) m->batcher->Shutdown(false);
  std::printf("stop: %lld responses before Stop\n", static_cast<long long>(answered.load()));
}

// -- phase: bearer tokens on the fast path ------------------------------------------------------

std::string Hex(const vivace::Sha256Digest& d) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (uint8_t byte : d) {
    out += kDigits[byte >> 4];
    out += kDigits[byte & 15];
  }
  return out;
}

void Sha256Vectors() {
  // FIPS 180-4's examples, and lengths around the block boundaries where the padding changes.
  const std::pair<std::string, const char*> vectors[] = {
      {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
      {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
       "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
      {std::string(55, 'a'), "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318"},
      {std::string(64, 'a'), "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"},
      {std::string(1000000, 'a'), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"},
  };
  for (const auto& [text, expected] : vectors)
    Check(Hex(vivace::Sha256(text.data(), text.size())) == expected,
          "sha256 of " + std::to_string(text.size()) + " bytes");
  const auto a = vivace::Sha256("a", 1), b = vivace::Sha256("b", 1);
  Check(vivace::DigestsEqual(a, a) && !vivace::DigestsEqual(a, b), "DigestsEqual");
}

void BearerTokens() {
  current_phase = "bearer tokens";
  Sha256Vectors();
  Server server({Threaded("guarded", 1, 8, 0)}, vivace::FrontendLimits{});
  HttpFrontend& fe = *server.frontend;
  fe.SetRoutes(server.AllRoutes());
  const std::string good = "vvc_good", expired = "vvc_expired", reader = "vvc_reader";
  fe.SetAuth(true,
             {{vivace::Sha256(good.data(), good.size()), 0.0, true, "good"},
              {vivace::Sha256(expired.data(), expired.size()), 1.0 /* 1970 */, true, "old"},
              {vivace::Sha256(reader.data(), reader.size()), 0.0, false, "reader"}},
             {"/v2/health/ready"});
  Owner owner(&fe, server.models, nullptr, nullptr);
  const Model& m = *server.models[0];
  // Natively answered: a granted token (any case of the scheme, spaces around it). Everything
  // else goes to Python, which answers 401/403 and audits (here the owner answers it).
  const std::pair<std::string, bool> cases[] = {
      {"authorization: Bearer vvc_good\r\n", true},
      {"Authorization: BEARER   vvc_good  \r\n", true},
      {"authorization: Bearer vvc_goo\r\n", false},
      {"authorization: Bearer vvc_goodx\r\n", false},
      {"authorization: Bearer vvc_expired\r\n", false},
      {"authorization: Bearer vvc_reader\r\n", false},  // valid, without the infer scope
      {"authorization: Basic dnZjX2dvb2Q=\r\n", false},
      {"authorization: Bearervvc_good\r\n", false},
      {"", false},
  };
  int64_t forwarded = 0, serial = 0;
  auto exchange_on = [&](int fd, const std::string& header) {
    const std::vector<int64_t> values = {serial, 1, 2, 3};
    const std::string id = "auth-" + std::to_string(serial++);
    const std::string body = "{\"id\":\"" + id + "\",\"inputs\":[{\"name\":\"x\",\"shape\":[1,4],\"datatype\":"
                             "\"INT64\",\"data\":[" + std::to_string(values[0]) + ",1,2,3]}]}";
    const std::string wire = "POST " + m.target + " HTTP/1.1\r\nhost: t\r\n" + header +
                             "content-length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    std::mt19937 rng(7);
    Check(SendAll(fd, wire, &rng), "auth: send");
    std::string buf;
    Response r;
    Check(ReadResponse(fd, &buf, &r) == Read::kOk && r.status == 200 && r.body == ExpectedBody(m, values, id),
          "auth: wrong answer to " + Clip(header));
  };
  auto exchange = [&](const std::string& header) {
    const int fd = Connect(server.port);
    exchange_on(fd, header);
    close(fd);
  };
  for (const auto& [header, native] : cases) {
    exchange(header);
    if (!native) ++forwarded;
  }
  // One keep-alive connection: the grant it caches holds for the same header only, and
  // only until the grants change (a revocation).
  const int keep = Connect(server.port);
  for (const auto& [header, native] : std::vector<std::pair<std::string, bool>>{
           {cases[0].first, true}, {"authorization: Bearer vvc_goo\r\n", false}, {cases[0].first, true}, {"", false}}) {
    exchange_on(keep, header);
    if (!native) ++forwarded;
  }
  fe.SetAuth(true, {{vivace::Sha256(reader.data(), reader.size()), 0.0, false, "reader"}}, {"/v2/health/ready"});
  exchange_on(keep, cases[0].first);  // vvc_good revoked: to Python now
  ++forwarded;
  close(keep);
  fe.SetAuth(true,
             {{vivace::Sha256(good.data(), good.size()), 0.0, true, "good"},
              {vivace::Sha256(expired.data(), expired.size()), 1.0, true, "old"},
              {vivace::Sha256(reader.data(), reader.size()), 0.0, false, "reader"}},
             {"/v2/health/ready"});
  // Expect: 100-continue: the body is let in only with a valid token; otherwise 401 at once.
  auto expect = [&](const std::string& header, const std::string& target) {
    const int fd = Connect(server.port);
    std::mt19937 rng(7);
    Check(SendAll(fd, "POST " + target + " HTTP/1.1\r\nhost: t\r\n" + header +
                          "content-length: 10\r\nexpect: 100-continue\r\n\r\n", &rng), "auth: send head");
    std::string buf;
    char chunk[4096];
    const ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
    close(fd);
    return n > 0 ? std::string(chunk, static_cast<size_t>(n)) : std::string();
  };
  Check(expect("authorization: Bearer vvc_reader\r\n", m.target).rfind("HTTP/1.1 100 Continue", 0) == 0,
        "auth: a valid token may send its body");
  Check(expect("", "/v2/health/ready").rfind("HTTP/1.1 100 Continue", 0) == 0, "auth: open paths need no token");
  for (const auto& [header, words] : std::vector<std::pair<std::string, std::string>>{
           {"", "missing bearer token"}, {"authorization: Basic x\r\n", "Bearer scheme"},
           {"authorization: Bearer vvc_nope\r\n", "invalid or revoked token"},
           {"authorization: Bearer vvc_expired\r\n", "token 'old' has expired"}}) {
    const std::string reply = expect(header, m.target);
    Check(reply.rfind("HTTP/1.1 401", 0) == 0 && reply.find("www-authenticate: Bearer") != std::string::npos &&
              reply.find(words) != std::string::npos,
          "auth: expect-continue refusal: " + Clip(reply));
  }
  fe.SetAuth(false, {}, {});
  exchange("");  // auth off: no header needed on the fast path
  PythonShutdown(&server, &owner, true, 10);
  Check(owner.answered == forwarded,
        "auth: " + std::to_string(owner.answered) + " requests forwarded, expected " + std::to_string(forwarded));
  std::printf("bearer tokens: %lld forwarded to the owner, the granted ones answered natively\n",
              static_cast<long long>(forwarded));
  server.frontend.reset();
}

}  // namespace

int main(int argc, char** argv) {
  // An argument runs only the phases whose names contain it (for reproducing one).
  const std::string only = argc > 1 ? argv[1] : "";
  auto wanted = [&](const char* name) { return std::string(name).find(only) != std::string::npos; };
  // A hang anywhere is a failure, not a stuck test run.
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::seconds(240));
    Fail("the test did not finish within 240 s");
  }).detach();
  if (wanted("answer")) DrainMeetsAnswer();
  if (wanted("bearer")) BearerTokens();
  if (wanted("mixed")) MixedTraffic();
  if (wanted("drain")) DrainUnderLoad();
  // The shutdown paths race with completions on other threads: run them a few times.
  for (int i = 0; i < 3; ++i) {
    if (wanted("shutdown")) ShutdownWithQueued();
    if (wanted("stop")) StopInFlight();
  }
  std::printf("frontend_test: all checks passed\n");
  return 0;
}

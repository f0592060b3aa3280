// Native HTTP/1.1 front end.
//
// One epoll thread owns the listening socket and every connection: it reads, frames
// requests (Content-Length or chunked), enforces the server's limits and timeouts, and
// writes responses in request order (pipelining). A JSON infer request for a model with a
// fast route is parsed straight into that model's batcher and answered from C++ when its
// batch completes (the batcher hands it back through CompletionSink); no Python runs per
// request. Every other request (metadata, binary tensors, parameters, errors to explain,
// admin routes) is handed to Python, which answers through Respond(). Python is woken
// through one descriptor per burst, not once per request.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "batcher/batcher.h"
#include "batcher/oip_json.h"
#include "frontend/http_parse.h"
#include "frontend/sha256.h"

namespace vivace {

struct FrontendLimits {
  int64_t max_connections = 10000;
  int64_t max_body_bytes = 64 << 20;
  int64_t max_header_bytes = 64 << 10;
  int64_t max_headers = 100;
  double header_timeout_s = 10.0;  // first byte of a request → end of its headers
  double body_timeout_s = 30.0;    // end of headers → end of body
  double idle_timeout_s = 75.0;    // keep-alive connection with nothing in flight
};

// POST target → the model whose batcher takes the request natively.
struct InferRoute {
  std::shared_ptr<Batcher> batcher;
  std::shared_ptr<const OipJsonCodec> codec;
  std::string model, version;
  int64_t row_elements = 1;  // elements per row over all inputs: bounds the rows a body can hold
  // A weighted rollout (engine/rollout.py Split, neither sticky nor shadowed): this share
  // of the requests, per million, is answered by `canary` instead, drawn per request.
  std::shared_ptr<const InferRoute> canary;
  uint32_t canary_per_million = 0;
  // Requests this split route answered natively, by itself and by its canary; Python
  // takes them (TakeRouted) into the rollout's counts.
  mutable std::atomic<uint64_t> routed{0}, routed_canary{0};
};

// A bearer token (engine/auth.py Authenticator.grants): the SHA-256 digest of the token,
// when it expires (Unix seconds; 0: never), whether it may call infer, and its name.
struct TokenGrant {
  Sha256Digest digest{};
  double expires_at = 0.0;
  bool infer = false;
  std::string name;
};

// A split route's natively answered requests since the last TakeRouted.
struct RoutedCounts {
  std::string target;
  uint64_t stable = 0, canary = 0;
};

// A request for Python, or (closed) the notice that a connection Python knows has gone.
struct ForwardedRequest {
  uint64_t conn = 0;
  uint64_t seq = 0;
  bool closed = false;
  std::string method, target, body, peer;
  std::string header_length, authorization;
  bool has_header_length = false, has_authorization = false;
  // W3C trace context as sent (Python parses and samples it); received_ns: when the
  // request's first byte was read (steady clock), set only while tracing is on.
  std::string traceparent, tracestate;
  bool has_traceparent = false, has_tracestate = false;
  int64_t received_ns = 0;
};

// A traced fast-path request, timed by the io thread and the batcher (steady clock ns,
// CLOCK_MONOTONIC); encoded as spans in bulk when Python takes them (otlp.h).
struct TraceRecord {
  std::array<uint8_t, 16> trace_id{};
  std::array<uint8_t, 8> parent_id{};
  bool has_parent = false;  // false: a root span (sampled by the ratio)
  std::string tracestate, target, model, version;
  int status = 200;
  int64_t rows = 0, batch_rows = 0;
  int64_t received_ns = 0, parsed_ns = 0, enqueued_ns = 0, batch_start_ns = 0, features_ns = 0, batch_end_ns = 0,
          answered_ns = 0;
};

class HttpFrontend final : public CompletionSink {
 public:
  // Serves `listen_fd` (a listening socket; it is duplicated, the caller keeps its own).
  HttpFrontend(int listen_fd, FrontendLimits limits);
  ~HttpFrontend() override;
  HttpFrontend(const HttpFrontend&) = delete;
  HttpFrontend& operator=(const HttpFrontend&) = delete;

  // Replaces the fast routes (exact request targets).
  void SetRoutes(std::unordered_map<std::string, std::shared_ptr<const InferRoute>> routes);
  // Bearer-token auth. With `required`, a fast-route request is answered here only when it
  // presents a grant with the infer scope; any other goes to Python, which answers it 401
  // or 403 and writes the refusal to the audit log. A request announcing its body with
  // `Expect: 100-continue` outside `open_paths` gets its 100 only with a valid token, and a
  // 401 (the words of engine/auth.py) otherwise. Replaces the previous grants.
  void SetAuth(bool required, std::vector<TokenGrant> grants, std::vector<std::string> open_paths);
  // Tracing: off (the default) costs one flag check per request. On, a request carrying a
  // valid traceparent is traced when its sampled flag is set, never otherwise; one
  // without is traced with probability `ratio`. Only traced requests are timed.
  void SetTracing(bool on, double ratio);
  // The traced fast-path requests answered since the last call (at most kMaxTraces wait;
  // beyond that new ones are dropped and counted).
  std::vector<TraceRecord> TakeTraces(uint64_t* dropped);
  static constexpr size_t kMaxTraces = 65536;
  // The split routes' counts since the last call (those of routes just replaced included).
  std::vector<RoutedCounts> TakeRouted();
  // Inline batchers whose batches this thread runs itself (native kernels: no GIL), right
  // after the requests it read: no thread hand-off per batch. The owner must not call
  // their RunReady meanwhile except to drain them (RunReady serialises anyway).
  void SetDriven(std::vector<std::shared_ptr<Batcher>> batchers);
  // Python's answer to forwarded request `seq` of connection `conn`: a whole HTTP response.
  void Respond(uint64_t conn, uint64_t seq, std::string response);
  // Forwarded requests and closed-connection notices since the last call; clears python_fd.
  std::vector<ForwardedRequest> Take();
  int python_fd() const { return python_fd_; }

  // Closes the listening socket: new connections are refused from here on.
  void StopAccepting();
  // Finish what was accepted on each connection (what its socket already holds included),
  // then close it; a request a connection is still sending is read and answered too.
  void BeginDrain();
  // Requests read and not yet answered, plus connections whose answers a slow reader has
  // not taken yet: a drain waits for both.
  // Requests read and not yet answered, answers not yet sent, and (while draining)
  // requests let through by the drain that are still arriving: what a drain waits for.
  int64_t InFlight() const { return unanswered_.load() + unsent_connections_.load() + drain_reads_.load(); }
  int64_t Connections() const { return open_connections_.load(); }
  // Stops the thread and closes every connection. Idempotent.
  void Stop();

  void Deliver(Batcher* batcher, std::vector<Request*>* done) override;

  std::map<int, uint64_t> HttpErrors() const;
  // (model, version, reason) → failures of natively answered requests.
  std::map<std::tuple<std::string, std::string, std::string>, uint64_t> Failures() const;

 private:
  struct Conn;
  struct Head;
  struct Pending {
    uint64_t conn;
    uint64_t seq;
    std::shared_ptr<const InferRoute> route;
    std::unique_ptr<TraceRecord> trace;  // sampled for tracing
  };
  struct Outgoing {
    uint64_t conn = 0, seq = 0;
    Request* request = nullptr;  // a completed fast-path request, or
    Batcher* batcher = nullptr;
    std::string response;        // Python's response
  };

  struct Driven {
    std::shared_ptr<Batcher> batcher;
    bool kick = false;  // rows were queued since its last run
    double due = 0;     // a batch waits for max_queue_delay or a deadline until then; 0: none
  };

  void Loop();
  void ApplyDriven();
  void RunDriven(double now);
  void SignalQueued();
  void ToPython(ForwardedRequest f);
  double NextDue() const;
  void Accept();
  void OnReadable(Conn* c);
  bool ParseOne(Conn* c);
  bool ParseHead(Conn* c, const char* p, size_t size);
  bool ReadChunked(Conn* c);
  void RejectParse(Conn* c, http::Error e);
  void Dispatch(Conn* c, const char* body, size_t body_size);
  void EndDrainRead(Conn* c);  // the request a drain let through has arrived, or the connection went
  bool SubmitNative(Conn* c, uint64_t seq, const std::shared_ptr<const InferRoute>& route, const char* body,
                    size_t body_size, bool traced);
  // Whether the request being dispatched is traced (tracing on; see SetTracing).
  uint64_t NextDraw();  // io thread: the next of draw_state_'s draws
  bool Sampled(const Head& h);
  void FinishTrace(std::unique_ptr<TraceRecord> trace, const Request& r, int status);
  void Refuse(Conn* c, uint64_t seq, const InferRoute& route, Status status);
  // The grant the request's Authorization header presents, or null with why not in
  // *refusal (routes_mu_ held).
  const TokenGrant* TokenLocked(const Head& h, std::string* refusal) const;
  // Whether the request may take the fast path: auth off, or a valid token with the infer
  // scope (routes_mu_ held; caches the grant on the connection).
  bool InferGrantedLocked(Conn* c, const Head& h) const;
  // Whether a request waiting for 100 Continue may send its body (routes_mu_ held).
  bool MayContinueLocked(const Head& h, std::string* refusal) const;
  void Reject(Conn* c, int status, const std::string& message, const char* extra_headers = "");
  void Answer(Conn* c, uint64_t seq, std::string response);
  void Flush(Conn* c);
  void Close(Conn* c);
  void ProcessOutbox();
  void Sweep(double now);
  void ApplyDrain();
  void WatchWrites(Conn* c, bool on);
  void CountHttpError(int status);
  void Wake();
  Conn* Find(uint64_t id);

  FrontendLimits limits_;
  http::Limits parse_limits_;
  int listen_fd_ = -1, epoll_fd_ = -1, wake_fd_ = -1, python_fd_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false}, stop_accepting_{false}, drain_{false};
  bool draining_ = false;  // io thread's view of drain_
  std::atomic<int64_t> unanswered_{0}, open_connections_{0}, unsent_connections_{0}, drain_reads_{0};

  // io thread only
  std::unordered_map<uint64_t, std::unique_ptr<Conn>> conns_;
  std::unordered_map<uint64_t, Pending> pending_;  // token → fast-path request in a batcher
  std::vector<Conn*> dirty_;                       // connections with output to send
  uint64_t next_conn_ = 1;
  uint64_t next_token_ = uint64_t{1} << 62;  // disjoint from the tokens Python assigns
  std::string read_buffer_;
  std::vector<Driven> driven_;
  std::vector<std::shared_ptr<Batcher>> queued_this_round_;  // inline, not driven: signal after the round
  std::thread::id io_thread_;
  bool outbox_filled_here_ = false;  // Deliver ran on the io thread since ProcessOutbox

  mutable std::mutex routes_mu_;
  std::unordered_map<std::string, std::shared_ptr<const InferRoute>> routes_;
  std::vector<RoutedCounts> replaced_routed_;  // guarded by routes_mu_: counts of routes SetRoutes dropped
  bool auth_required_ = false;                            // guarded by routes_mu_
  std::unordered_map<std::string, TokenGrant> grants_;  // guarded by routes_mu_: by digest bytes
  std::vector<std::string> open_paths_;                 // guarded by routes_mu_
  uint64_t grants_generation_ = 0;                      // guarded by routes_mu_: bumped by SetAuth
  uint64_t draw_state_ = 1;  // io thread only: xorshift64 draws for split routes (seeded per process)
  std::vector<std::shared_ptr<Batcher>> driven_next_;  // guarded by routes_mu_
  bool driven_changed_ = false;                        // guarded by routes_mu_

  std::atomic<bool> tracing_{false};
  std::atomic<uint64_t> trace_threshold_{0};  // a draw below this traces a request without traceparent
  std::mutex traces_mu_;
  std::vector<TraceRecord> traces_;  // guarded by traces_mu_
  uint64_t traces_dropped_ = 0;      // guarded by traces_mu_

  std::mutex outbox_mu_;
  std::vector<Outgoing> outbox_;

  std::mutex inbox_mu_;
  std::vector<ForwardedRequest> inbox_;

  mutable std::mutex counters_mu_;
  std::map<int, uint64_t> http_errors_;
  std::map<std::tuple<std::string, std::string, std::string>, uint64_t> failures_;
};

}  // namespace vivace

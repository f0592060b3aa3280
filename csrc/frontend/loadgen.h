// An HTTP/1.1 load generator for the benchmarks (vivace bench overload): one epoll thread
// sending one request body over keep-alive connections to 127.0.0.1, open loop (a fixed
// schedule, new connections opened as needed up to a limit) or closed loop (N clients).
//
// Why native: a Python generator sharing a core with its own bookkeeping falls hundreds of
// milliseconds behind its schedule at a few thousand requests per second of 30 KB bodies,
// and its lag then reads as the server's latency.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vivace {

struct LoadSpec {
  int port = 0;
  std::string request;       // the whole HTTP request, sent as is each time
  double rate = 0.0;         // > 0: open loop at this many requests per second
  int concurrency = 0;       // rate == 0: closed loop with this many clients
  double duration_s = 1.0;   // the schedule (open loop) or the measured window (closed loop)
  double warmup_s = 0.0;     // closed loop: sent before the window, not reported
  int max_connections = 512;
  double answer_timeout_s = 10.0;  // after the schedule: how long outstanding requests may take
  int cpu = -1;              // pin the generator's thread to this CPU (-1: no pinning)
};

enum class LoadError : uint8_t { kNone = 0, kRefused = 1, kLost = 2, kUnanswered = 3 };

// One request. Times are seconds of CLOCK_MONOTONIC (Python's time.monotonic()).
struct LoadOutcome {
  double scheduled = 0.0;
  double sent = 0.0;       // 0: it waited for a connection and never left
  double answered = 0.0;   // 0: not answered
  int status = 0;          // 0: no HTTP response
  bool retry_after = false;
  LoadError error = LoadError::kNone;
  std::string version;     // "model_version" of a 200 answer
  std::string body;        // the body of an answer other than 200 (the first 256 bytes)
};

// Runs the load on the calling thread and returns every request of the reported window, in
// schedule order. Throws std::runtime_error on a setup failure (no epoll, bad spec).
std::vector<LoadOutcome> RunLoad(const LoadSpec& spec);

}  // namespace vivace

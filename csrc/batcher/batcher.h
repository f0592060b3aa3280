// Dynamic batcher: per-model priority queues, executor threads, bulk completions.
//
// The caller (the HTTP event loop) copies each request's rows into a pooled request
// buffer and enqueues it; executor threads form batches under Triton's knobs, gather the
// rows into preallocated batch buffers, run the backend once per batch and scatter the
// outputs back. Completed requests are handed back in bulk: the executor signals one
// file descriptor (eventfd) per batch, and the loop drains every completion at once.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace vivace {

using Clock = std::chrono::steady_clock;

enum class Status : int {
  kOk = 0,
  kQueueFull = 1,   // max_queue_size reached: rejected at once
  kTimeout = 2,     // deadline passed before execution
  kCancelled = 3,   // client gone; dropped before execution
  kError = 4,       // the backend failed for this batch
  kShutdown = 5,    // the batcher stopped before the request ran
  kInvalid = 6,     // bad arguments (rows, priority)
  kOverloaded = 7,  // load shedding: the queue already holds more than shed_queue_wait_us of work
};

const char* StatusName(Status s);

struct BatcherConfig {
  std::string model_name;
  int64_t max_batch_size = 8;
  std::vector<int64_t> preferred_batch_sizes;
  int64_t max_queue_delay_us = 0;  // 0: batch whatever is queued when an executor is free
  int priority_levels = 1;         // levels 1..N; 1 is served first, as in Triton
  int default_priority = 1;
  int64_t default_timeout_us = 0;  // 0: no timeout
  bool allow_timeout_override = true;  // a request may lower (never raise) its timeout
  int64_t max_queue_size = 0;          // queued requests; 0: unbounded
  // Load shedding: refuse new requests at once (kOverloaded) when the queued work would
  // take longer than this to run (full batches of the queued rows x recent time per
  // batch), or the oldest request at least as urgent has already waited longer. Admitted requests then keep a
  // bounded latency, refusals are immediate, and queue memory stays bounded. 0: off.
  int64_t shed_queue_wait_us = 0;
  std::vector<int64_t> input_row_bytes;
  std::vector<int64_t> output_row_bytes;
  int executors = 1;
  // Inline mode: no executor threads. The owner calls RunReady() when ready_fd() fires
  // (the first queued row signals it) and runs the batch on its own thread: the Python
  // event loop, or the native HTTP front end's thread for kernels that need no GIL. For backends that need the GIL this batches everything the loop
  // read in one iteration and avoids handing the GIL between threads per batch.
  bool inline_execution = false;
};

class Batcher;
struct Request;

// Takes finished requests that were queued with a sink (the native HTTP front end)
// instead of leaving them for Drain(). Called on the thread that completed them, with no
// batcher lock held; the sink releases each request to `batcher` when it is done with it.
class CompletionSink {
 public:
  virtual ~CompletionSink() = default;
  virtual void Deliver(Batcher* batcher, std::vector<Request*>* done) = 0;
};

// Runs one batch. `inputs[i]`/`outputs[i]` point at the executor's batch buffers, each
// holding `rows` rows. Throws std::exception to fail every request in the batch.
using ExecuteFn = std::function<void(int executor, int64_t rows)>;

// Fixed-bucket histogram; executors update it with relaxed atomics.
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void Observe(double value);
  const std::vector<double>& bounds() const { return bounds_; }
  std::vector<uint64_t> Counts() const;  // one per bound, then +Inf; not cumulative
  double Sum() const;

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;
  std::atomic<uint64_t> sum_micro_{0};  // sum in millionths of the unit
};

struct Stats {
  explicit Stats(int64_t max_batch_size);
  std::atomic<uint64_t> success{0};
  std::array<std::atomic<uint64_t>, 8> failures{};  // indexed by Status
  std::atomic<uint64_t> inference_count{0};         // rows executed
  std::atomic<uint64_t> execution_count{0};         // batches executed
  std::atomic<uint64_t> queue_ns{0}, compute_input_ns{0}, compute_infer_ns{0},
      compute_output_ns{0};
  Histogram request_seconds, queue_seconds, compute_seconds, batch_size;
};

struct Request {
  uint64_t token = 0;
  int priority = 0;  // 0-based queue index
  int64_t rows = 0;
  int64_t next_row = 0;  // first row not yet taken into a batch (guarded by the queue lock)
  std::atomic<int64_t> rows_outstanding{0};
  std::atomic<bool> cancelled{false};
  std::atomic<bool> started{false};
  std::atomic<Status> status{Status::kOk};  // slices on several executors may set it
  std::string error;
  Clock::time_point enqueue_time{};
  Clock::time_point deadline = Clock::time_point::max();
  std::vector<uint8_t> input;   // input i at input_offset(i): rows * row_bytes[i]
  std::vector<uint8_t> output;  // output j at output_offset(j)
  // Requests that came through the JSON fast path: the response body is formatted
  // natively, echoing the request id.
  bool json_response = false;
  bool has_id = false;
  std::string id;
  CompletionSink* sink = nullptr;  // set: completion goes to the sink, not to Drain()
  // Sampled for tracing (the front end decided): the batch that ran it is timed here. A
  // request split over several batches keeps the first one's start and the last one's end.
  bool traced = false;
  Clock::time_point batch_start{}, features_done{}, batch_end{};
  int64_t batch_rows = 0;
  std::list<Request*>::iterator queue_pos;
  std::multimap<Clock::time_point, Request*>::iterator deadline_pos;
  bool queued = false;
};

class Batcher {
 public:
  Batcher(BatcherConfig config, ExecuteFn execute);
  ~Batcher();
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  // Takes a pooled request sized for `rows`; fill its input, then Enqueue or Release it.
  Request* Acquire(int64_t rows);
  void Release(Request* request);
  // priority 0 and timeout_us 0 mean the model's defaults. On kQueueFull, kShutdown or
  // kInvalid the request is not queued and still belongs to the caller.
  // defer_ready (inline mode): do not signal ready_fd() now; the caller enqueues more and
  // then calls SignalReady() once, so that the thread running batches wakes to all of them.
  Status Enqueue(Request* request, uint64_t token, int priority, int64_t timeout_us, bool defer_ready = false);
  void SignalReady() { Signal(ready_write_fd_); }
  // What Enqueue would answer now for a request of the most urgent priority: kOk, or the
  // refusal (kShutdown, kQueueFull, kOverloaded) that then awaits every request. The HTTP
  // front end asks before parsing a body it would only refuse.
  Status Admission() const;
  // Drops a request not yet executed; returns false when the token is unknown.
  bool Cancel(uint64_t token);

  // Completed requests since the last call; clears the notification descriptor.
  std::vector<Request*> Drain();
  // Inline mode: run the batches that are ready now on the calling thread, each answered
  // as soon as it ran; with slice_us >= 0, stop starting batches once that much time has
  // passed, so that the caller's own work (reading requests, refusing them) is not held
  // up behind a whole queue. Returns the microseconds until the next batch is due (0: one
  // is ready now), or -1 if none waits.
  int64_t RunReady(int64_t slice_us = -1);
  // The slice the servers run inline batches in (the native front end's thread, the
  // Python loop): a few batches of a small model, short against any queue-wait budget.
  static constexpr int64_t kServingSliceUs = 2000;
  // Answers queued requests whose deadline has passed. Executors do this whenever they
  // look for work; the owner calls it periodically so that a deadline is honoured
  // while every executor is busy with a long batch.
  void ExpireDue();
  // Readable when completed requests wait for Drain().
  int notify_fd() const { return notify_fd_; }
  // Inline mode: readable when rows are queued and RunReady() has not looked since; -1
  // with executor threads.
  int ready_fd() const { return ready_fd_; }

  // Called after the rows are gathered and before the backend runs, on the same thread
  // (features are looked up here for entity-id requests). Throwing fails the batch.
  void set_before_batch(ExecuteFn hook) { before_batch_ = std::move(hook); }

  // Called after every successful batch, with the executor's batch buffers still holding
  // its inputs and outputs (drift sketches count them here). Set before the first request.
  void set_after_batch(ExecuteFn hook) { after_batch_ = std::move(hook); }

  // Stop accepting; with drain, queued requests still run, otherwise they fail with
  // kShutdown. Joins the executors. Idempotent.
  void Shutdown(bool drain);

  uint8_t* input_buffer(int executor, size_t i) { return batch_inputs_[executor][i].data(); }
  uint8_t* output_buffer(int executor, size_t j) { return batch_outputs_[executor][j].data(); }
  size_t input_offset(size_t i, int64_t rows) const { return static_cast<size_t>(input_prefix_[i] * rows); }
  size_t output_offset(size_t j, int64_t rows) const { return static_cast<size_t>(output_prefix_[j] * rows); }

  const BatcherConfig& config() const { return config_; }
  const Stats& stats() const { return stats_; }
  int64_t queued_requests() const;
  int64_t queued_rows() const;

 private:
  struct Slice {
    Request* request;
    int64_t first_row;
    int64_t rows;
    int64_t batch_row;
  };

  void ExecutorLoop(int executor);
  void ExecuteBatch(int executor, std::vector<Slice>* slices, std::vector<Request*>* done);
  void FailAllLocked(Status status, std::vector<Request*>* done);
  Clock::time_point OldestEnqueueTimeLocked(int priority) const;
  Status AdmitLocked(Clock::time_point now, int priority) const;
  int64_t ReadyBatchSize(Clock::time_point now, Clock::time_point* wake_at) const;
  void TakeBatch(int64_t rows, std::vector<Slice>* slices);
  void ExpireLocked(Clock::time_point now, std::vector<Request*>* done);
  void Unqueue(Request* r);
  void FinishRows(Request* r, int64_t rows, std::vector<Request*>* done);
  void Complete(std::vector<Request*>* done);
  void Notify();
  static void MakeSignal(int* read_fd, int* write_fd);
  static void Signal(int write_fd);
  static void ClearSignal(int read_fd);

  BatcherConfig config_;
  ExecuteFn execute_;
  ExecuteFn before_batch_, after_batch_;
  std::vector<int64_t> input_prefix_, output_prefix_;  // byte offset per row count
  int64_t input_bytes_per_row_ = 0, output_bytes_per_row_ = 0;
  std::vector<std::vector<std::vector<uint8_t>>> batch_inputs_, batch_outputs_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::list<Request*>> queues_;  // one per priority level
  std::multimap<Clock::time_point, Request*> deadlines_;
  std::unordered_map<uint64_t, Request*> by_token_;
  int64_t queued_rows_ = 0, queued_requests_ = 0;
  bool stopping_ = false, drain_on_stop_ = true;

  std::mutex pool_mu_;
  std::vector<std::unique_ptr<Request>> owned_;  // every request ever made; reused
  std::vector<Request*> free_;

  std::mutex done_mu_;
  std::vector<Request*> completed_;
  int notify_fd_ = -1, notify_write_fd_ = -1;
  int ready_fd_ = -1, ready_write_fd_ = -1;  // inline mode only
  std::mutex run_mu_;                        // inline mode: one RunReady at a time
  std::vector<Clock::time_point> last_batch_end_;  // per executor, for batch_ns_

  std::mutex join_mu_;
  std::vector<std::thread> executors_;
  Stats stats_;  // declared after config_: built from its max_batch_size
  // Recent cost of a batch to the queue (exponential moving average), for shedding.
  std::atomic<int64_t> batch_ns_{0};
};

}  // namespace vivace

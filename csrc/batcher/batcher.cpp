#include "batcher/batcher.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <utility>
#ifdef __linux__
#include <sys/eventfd.h>
#endif

namespace vivace {

const char* StatusName(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kQueueFull: return "queue_full";
    case Status::kTimeout: return "timeout";
    case Status::kCancelled: return "cancelled";
    case Status::kError: return "backend_error";
    case Status::kShutdown: return "shutdown";
    case Status::kInvalid: return "invalid";
    case Status::kOverloaded: return "overloaded";
  }
  return "unknown";
}

namespace {

std::vector<double> LatencyBounds() {
  return {25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3,
          10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0};
}

std::vector<double> BatchBounds(int64_t max_batch) {
  std::vector<double> b;
  for (int64_t v = 1; v < max_batch; v *= 2) b.push_back(static_cast<double>(v));
  b.push_back(static_cast<double>(max_batch));
  return b;
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

uint64_t Nanos(Clock::duration d) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)),
      counts_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  for (size_t i = 0; i <= bounds_.size(); ++i) counts_[i].store(0);
}

void Histogram::Observe(double value) {
  size_t i = static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  sum_micro_.fetch_add(static_cast<uint64_t>(std::llround(value * 1e6)), std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::Counts() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  for (size_t i = 0; i < out.size(); ++i) out[i] = counts_[i].load(std::memory_order_relaxed);
  return out;
}

double Histogram::Sum() const { return static_cast<double>(sum_micro_.load()) / 1e6; }

Stats::Stats(int64_t max_batch_size)
    : request_seconds(LatencyBounds()),
      queue_seconds(LatencyBounds()),
      compute_seconds(LatencyBounds()),
      batch_size(BatchBounds(std::max<int64_t>(1, max_batch_size))) {}

Batcher::Batcher(BatcherConfig config, ExecuteFn execute)
    : config_(std::move(config)), execute_(std::move(execute)), stats_(config_.max_batch_size) {
  if (config_.max_batch_size < 1) throw std::invalid_argument("max_batch_size must be >= 1");
  if (config_.priority_levels < 1) throw std::invalid_argument("priority_levels must be >= 1");
  if (config_.default_priority < 1 || config_.default_priority > config_.priority_levels)
    throw std::invalid_argument("default_priority must be within 1..priority_levels");
  if (config_.executors < 1) throw std::invalid_argument("executors must be >= 1");
  if (config_.inline_execution) config_.executors = 1;  // the caller's thread is the executor
  if (config_.max_queue_delay_us < 0 || config_.default_timeout_us < 0 || config_.max_queue_size < 0 ||
      config_.shed_queue_wait_us < 0)
    throw std::invalid_argument("delays, timeouts and queue sizes must be >= 0");
  if (config_.input_row_bytes.empty()) throw std::invalid_argument("a model needs at least one input");
  for (int64_t p : config_.preferred_batch_sizes)
    if (p < 1 || p > config_.max_batch_size)
      throw std::invalid_argument("preferred_batch_size entries must be within 1..max_batch_size");
  std::sort(config_.preferred_batch_sizes.begin(), config_.preferred_batch_sizes.end());
  for (int64_t b : config_.input_row_bytes) {
    if (b < 0) throw std::invalid_argument("row sizes must be >= 0");
    input_prefix_.push_back(input_bytes_per_row_);
    input_bytes_per_row_ += b;
  }
  for (int64_t b : config_.output_row_bytes) {
    if (b < 0) throw std::invalid_argument("row sizes must be >= 0");
    output_prefix_.push_back(output_bytes_per_row_);
    output_bytes_per_row_ += b;
  }

  const auto batch = static_cast<size_t>(config_.max_batch_size);
  batch_inputs_.resize(static_cast<size_t>(config_.executors));
  last_batch_end_.resize(static_cast<size_t>(config_.executors));
  batch_outputs_.resize(static_cast<size_t>(config_.executors));
  for (int e = 0; e < config_.executors; ++e) {
    for (int64_t b : config_.input_row_bytes) batch_inputs_[e].emplace_back(batch * static_cast<size_t>(b));
    for (int64_t b : config_.output_row_bytes) batch_outputs_[e].emplace_back(batch * static_cast<size_t>(b));
  }
  queues_.resize(static_cast<size_t>(config_.priority_levels));

  MakeSignal(&notify_fd_, &notify_write_fd_);
  if (config_.inline_execution) MakeSignal(&ready_fd_, &ready_write_fd_);
  if (!config_.inline_execution)
    for (int e = 0; e < config_.executors; ++e) executors_.emplace_back([this, e] { ExecutorLoop(e); });
}

Batcher::~Batcher() {
  Shutdown(false);
  // Requests never drained by the caller are owned here and freed with owned_.
  for (const auto& [read_fd, write_fd] : {std::pair{notify_fd_, notify_write_fd_}, std::pair{ready_fd_, ready_write_fd_}}) {
    if (write_fd >= 0 && write_fd != read_fd) close(write_fd);
    if (read_fd >= 0) close(read_fd);
  }
}

void Batcher::MakeSignal(int* read_fd, int* write_fd) {
#ifdef __linux__
  *read_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (*read_fd < 0) throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
  *write_fd = *read_fd;
#else
  int fds[2];
  if (pipe(fds) != 0) throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
  for (int fd : fds) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  *read_fd = fds[0];
  *write_fd = fds[1];
#endif
}

void Batcher::Signal(int write_fd) {
  const uint64_t one = 1;
  // A full eventfd/pipe already signals readiness; nothing is lost on EAGAIN.
  ssize_t n = write(write_fd, &one, sizeof(one));
  (void)n;
}

void Batcher::ClearSignal(int read_fd) {
  uint64_t counter;
  while (read(read_fd, &counter, sizeof(counter)) > 0) {
  }
}

Request* Batcher::Acquire(int64_t rows) {
  Request* r;
  {
    std::lock_guard<std::mutex> lk(pool_mu_);
    if (free_.empty()) {
      owned_.push_back(std::make_unique<Request>());
      free_.push_back(owned_.back().get());
    }
    r = free_.back();
    free_.pop_back();
  }
  r->rows = rows > 0 ? rows : 0;
  r->input.resize(static_cast<size_t>(input_bytes_per_row_ * r->rows));
  r->output.resize(static_cast<size_t>(output_bytes_per_row_ * r->rows));
  return r;
}

void Batcher::Release(Request* r) {
  // Pooled requests keep their buffers for reuse, except unusually large ones: one big
  // request must not pin its memory for the life of the process.
  constexpr size_t kKeepBytes = 1 << 20;
  if (r->input.capacity() > kKeepBytes) std::vector<uint8_t>().swap(r->input);
  if (r->output.capacity() > kKeepBytes) std::vector<uint8_t>().swap(r->output);
  r->error.clear();
  r->json_response = false;
  r->has_id = false;
  r->sink = nullptr;
  r->traced = false;
  r->batch_start = Clock::time_point{};
  std::lock_guard<std::mutex> lk(pool_mu_);
  free_.push_back(r);
}

Status Batcher::AdmitLocked(Clock::time_point now, int priority) const {
  if (stopping_) return Status::kShutdown;
  if (config_.max_queue_size > 0 && queued_requests_ >= config_.max_queue_size) return Status::kQueueFull;
  if (config_.shed_queue_wait_us > 0 && queued_requests_ > 0) {
    // The queue drains in full batches: per-batch cost is not charged to every row.
    const int64_t batches = (queued_rows_ + config_.max_batch_size - 1) / config_.max_batch_size;
    const int64_t backlog_ns = batches * batch_ns_.load(std::memory_order_relaxed) / config_.executors;
    // Only requests at least as urgent as this one delay it.
    if (backlog_ns > config_.shed_queue_wait_us * 1000 ||
        now - OldestEnqueueTimeLocked(priority) > std::chrono::microseconds(config_.shed_queue_wait_us))
      return Status::kOverloaded;
  }
  return Status::kOk;
}

Status Batcher::Admission() const {
  const auto now = Clock::now();
  std::lock_guard<std::mutex> lk(mu_);
  return AdmitLocked(now, 0);
}

Status Batcher::Enqueue(Request* r, uint64_t token, int priority, int64_t timeout_us, bool defer_ready) {
  if (r->rows < 1 || priority < 0 || priority > config_.priority_levels || timeout_us < 0)
    return Status::kInvalid;
  const auto now = Clock::now();
  int64_t effective_timeout = config_.default_timeout_us;
  if (timeout_us > 0 && config_.allow_timeout_override &&
      (effective_timeout == 0 || timeout_us < effective_timeout))
    effective_timeout = timeout_us;
  r->token = token;
  r->priority = (priority == 0 ? config_.default_priority : priority) - 1;
  r->next_row = 0;
  r->rows_outstanding.store(r->rows, std::memory_order_relaxed);
  r->cancelled.store(false, std::memory_order_relaxed);
  r->started.store(false, std::memory_order_relaxed);
  r->status.store(Status::kOk, std::memory_order_relaxed);
  r->enqueue_time = now;
  r->deadline = effective_timeout > 0 ? now + std::chrono::microseconds(effective_timeout)
                                      : Clock::time_point::max();
  bool wake_loop = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    const Status admission = AdmitLocked(now, r->priority);
    if (admission != Status::kOk) return admission;
    auto& q = queues_[static_cast<size_t>(r->priority)];
    r->queue_pos = q.insert(q.end(), r);
    r->deadline_pos = r->deadline == Clock::time_point::max()
                          ? deadlines_.end()
                          : deadlines_.emplace(r->deadline, r);
    r->queued = true;
    by_token_[token] = r;
    wake_loop = config_.inline_execution && queued_rows_ == 0 && !defer_ready;
    queued_rows_ += r->rows;
    ++queued_requests_;
  }
  if (wake_loop)
    Signal(ready_write_fd_);
  else if (!config_.inline_execution)
    cv_.notify_one();
  return Status::kOk;
}

void Batcher::Unqueue(Request* r) {
  queues_[static_cast<size_t>(r->priority)].erase(r->queue_pos);
  if (r->deadline_pos != deadlines_.end()) deadlines_.erase(r->deadline_pos);
  r->deadline_pos = deadlines_.end();
  r->queued = false;
  queued_rows_ -= r->rows - r->next_row;
  --queued_requests_;
}

bool Batcher::Cancel(uint64_t token) {
  std::vector<Request*> done;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = by_token_.find(token);
    if (it == by_token_.end()) return false;
    Request* r = it->second;
    r->cancelled.store(true, std::memory_order_relaxed);
    if (r->queued) {
      const int64_t unscheduled = r->rows - r->next_row;
      Unqueue(r);
      r->status.store(Status::kCancelled);
      FinishRows(r, unscheduled, &done);
    }
  }
  Complete(&done);
  return true;
}

// Every row of a request either runs or is failed exactly once; the last one completes it.
void Batcher::FinishRows(Request* r, int64_t rows, std::vector<Request*>* done) {
  if (rows > 0 && r->rows_outstanding.fetch_sub(rows, std::memory_order_acq_rel) == rows)
    done->push_back(r);
}

void Batcher::ExpireLocked(Clock::time_point now, std::vector<Request*>* done) {
  while (!deadlines_.empty() && deadlines_.begin()->first <= now) {
    Request* r = deadlines_.begin()->second;
    const int64_t unscheduled = r->rows - r->next_row;
    Unqueue(r);
    r->status.store(Status::kTimeout);
    FinishRows(r, unscheduled, done);
  }
}

void Batcher::ExpireDue() {
  std::vector<Request*> done;
  {
    std::lock_guard<std::mutex> lk(mu_);
    ExpireLocked(Clock::now(), &done);
  }
  Complete(&done);
}

// Arrival time of the longest-waiting request queued at priority index <= `priority`
// (0 is the most urgent); max() when none is.
Clock::time_point Batcher::OldestEnqueueTimeLocked(int priority) const {
  Clock::time_point oldest = Clock::time_point::max();
  for (size_t p = 0; p < queues_.size() && static_cast<int>(p) <= priority; ++p)
    if (!queues_[p].empty()) oldest = std::min(oldest, queues_[p].front()->enqueue_time);
  return oldest;
}

// How many rows to batch now (0: wait until *wake_at or a new arrival).
int64_t Batcher::ReadyBatchSize(Clock::time_point now, Clock::time_point* wake_at) const {
  const int64_t avail = queued_rows_;
  if (avail == 0) return 0;
  if (avail >= config_.max_batch_size) return config_.max_batch_size;
  const auto& preferred = config_.preferred_batch_sizes;
  if (!preferred.empty() && avail >= preferred.back()) return preferred.back();
  if (config_.max_queue_delay_us == 0 || stopping_) return avail;  // a drain does not wait
  const auto due = OldestEnqueueTimeLocked(static_cast<int>(queues_.size())) +
                   std::chrono::microseconds(config_.max_queue_delay_us);
  if (now >= due) {
    // Delay spent: the largest preferred size that is queued, else everything queued.
    for (auto it = preferred.rbegin(); it != preferred.rend(); ++it)
      if (*it <= avail) return *it;
    return avail;
  }
  *wake_at = due;
  return 0;
}

void Batcher::TakeBatch(int64_t rows, std::vector<Slice>* slices) {
  int64_t batch_row = 0;
  for (auto& q : queues_) {
    while (batch_row < rows && !q.empty()) {
      Request* r = q.front();
      const int64_t take = std::min(rows - batch_row, r->rows - r->next_row);
      slices->push_back({r, r->next_row, take, batch_row});
      r->next_row += take;
      batch_row += take;
      queued_rows_ -= take;
      if (r->next_row == r->rows) {
        q.pop_front();
        if (r->deadline_pos != deadlines_.end()) deadlines_.erase(r->deadline_pos);
        r->deadline_pos = deadlines_.end();
        r->queued = false;
        --queued_requests_;
      }
    }
  }
}

void Batcher::FailAllLocked(Status status, std::vector<Request*>* done) {
  for (auto& q : queues_)
    while (!q.empty()) {
      Request* r = q.front();
      const int64_t unscheduled = r->rows - r->next_row;
      Unqueue(r);
      r->status.store(status);
      FinishRows(r, unscheduled, done);
    }
}

void Batcher::ExecutorLoop(int executor) {
  std::vector<Slice> slices;
  std::vector<Request*> done;
  for (;;) {
    slices.clear();
    done.clear();
    {
      std::unique_lock<std::mutex> lk(mu_);
      for (;;) {
        const auto now = Clock::now();
        ExpireLocked(now, &done);
        if (stopping_ && !drain_on_stop_) FailAllLocked(Status::kShutdown, &done);
        if (!done.empty()) break;  // answer expired requests before sleeping again
        Clock::time_point wake_at = Clock::time_point::max();
        const int64_t rows = ReadyBatchSize(now, &wake_at);
        if (rows > 0) {
          TakeBatch(rows, &slices);
          if (queued_rows_ > 0) cv_.notify_one();  // another executor may take the rest
          break;
        }
        if (stopping_ && queued_requests_ == 0) return;
        if (!deadlines_.empty()) wake_at = std::min(wake_at, deadlines_.begin()->first);
        if (wake_at == Clock::time_point::max())
          cv_.wait(lk);
        else
          cv_.wait_until(lk, wake_at);
      }
    }
    ExecuteBatch(executor, &slices, &done);
    Complete(&done);
  }
}

int64_t Batcher::RunReady(int64_t slice_us) {
  // One batch at a time on executor 0's buffers, whichever thread drives the batcher.
  std::lock_guard<std::mutex> run(run_mu_);
  const auto slice_end = slice_us < 0 ? Clock::time_point::max() : Clock::now() + std::chrono::microseconds(slice_us);
  // Clear "rows are queued" before looking at the queue: a row enqueued from another
  // thread after our last look signals it again, so none is stranded.
  if (ready_fd_ >= 0) ClearSignal(ready_fd_);
  std::vector<Slice> slices;
  std::vector<Request*> done;
  for (;;) {
    slices.clear();
    Clock::time_point wake_at = Clock::time_point::max();
    {
      std::lock_guard<std::mutex> lk(mu_);
      const auto now = Clock::now();
      ExpireLocked(now, &done);
      if (stopping_ && !drain_on_stop_) FailAllLocked(Status::kShutdown, &done);
      const int64_t rows = ReadyBatchSize(now, &wake_at);
      if (rows > 0) TakeBatch(rows, &slices);
      if (!deadlines_.empty() && queued_rows_ > 0) wake_at = std::min(wake_at, deadlines_.begin()->first);
    }
    if (slices.empty()) {
      Complete(&done);
      if (wake_at == Clock::time_point::max()) return -1;
      const auto wait = std::chrono::duration_cast<std::chrono::microseconds>(wake_at - Clock::now()).count();
      return std::max<int64_t>(wait, 0);
    }
    ExecuteBatch(0, &slices, &done);
    Complete(&done);  // answered now, not after the rest of the queue
    if (Clock::now() >= slice_end) {
      std::lock_guard<std::mutex> lk(mu_);
      if (queued_rows_ > 0) return 0;  // the rest is the next slice's (its signal stays cleared)
    }
  }
}

// Gathers the slices' rows into the executor's batch buffers, runs the backend once,
// and scatters the outputs back; finished requests are appended to *done.
void Batcher::ExecuteBatch(int executor, std::vector<Slice>* slices_in, std::vector<Request*>* done) {
  std::vector<Slice>& slices = *slices_in;
  auto& inputs = batch_inputs_[static_cast<size_t>(executor)];
  auto& outputs = batch_outputs_[static_cast<size_t>(executor)];
  const auto t_start = Clock::now();
  // Drop slices whose client went away; compact the rest to the front of the batch.
  int64_t batch_rows = 0;
  size_t kept = 0;
  for (const Slice& s : slices) {
    if (s.request->cancelled.load(std::memory_order_relaxed)) {
      s.request->status.store(Status::kCancelled);
      FinishRows(s.request, s.rows, done);
      continue;
    }
    Slice& k = slices[kept++];
    k = s;
    k.batch_row = batch_rows;
    batch_rows += s.rows;
  }
  slices.resize(kept);
  if (batch_rows == 0) return;
  auto oldest = t_start;
  for (const Slice& s : slices) {
    Request* r = s.request;
    oldest = std::min(oldest, r->enqueue_time);
    if (!r->started.exchange(true, std::memory_order_relaxed)) {
      stats_.queue_ns.fetch_add(Nanos(t_start - r->enqueue_time), std::memory_order_relaxed);
      stats_.queue_seconds.Observe(Seconds(t_start - r->enqueue_time));
    }
    for (size_t i = 0; i < inputs.size(); ++i) {
      const auto rb = static_cast<size_t>(config_.input_row_bytes[i]);
      std::memcpy(inputs[i].data() + static_cast<size_t>(s.batch_row) * rb,
                  r->input.data() + input_offset(i, r->rows) + static_cast<size_t>(s.first_row) * rb,
                  static_cast<size_t>(s.rows) * rb);
    }
  }
  const auto t_gathered = Clock::now();
  Clock::time_point t_features{};  // the entity-id feature lookup's end (none: zero)
  std::string error;
  try {
    if (before_batch_) {
      before_batch_(executor, batch_rows);
      t_features = Clock::now();
    }
    execute_(executor, batch_rows);
  } catch (const std::exception& e) {
    error = e.what();
    if (error.empty()) error = "backend error";
  } catch (...) {
    error = "backend raised an unknown exception";
  }
  if (error.empty() && after_batch_) {
    try {
      after_batch_(executor, batch_rows);
    } catch (...) {
      // Monitoring must never fail the requests it observes.
    }
  }
  const auto t_executed = Clock::now();
  for (const Slice& s : slices) {
    Request* r = s.request;
    if (!error.empty()) {
      std::lock_guard<std::mutex> lk(mu_);  // several slices of r may fail at once
      r->status.store(Status::kError);
      r->error = error;
    } else {
      for (size_t j = 0; j < outputs.size(); ++j) {
        const auto rb = static_cast<size_t>(config_.output_row_bytes[j]);
        std::memcpy(r->output.data() + output_offset(j, r->rows) + static_cast<size_t>(s.first_row) * rb,
                    outputs[j].data() + static_cast<size_t>(s.batch_row) * rb,
                    static_cast<size_t>(s.rows) * rb);
      }
    }
    if (r->traced) {  // sampled for tracing: one branch per request otherwise
      if (r->batch_start == Clock::time_point{}) r->batch_start = t_start;
      r->features_done = t_features;
      r->batch_end = t_executed;
      r->batch_rows = batch_rows;
    }
    FinishRows(r, s.rows, done);
  }
  const auto t_scattered = Clock::now();
  // What a batch costs the queue: when its rows already waited as this executor finished
  // its previous batch, the whole interval since then (on a shared core that includes the
  // front end parsing requests, the loop answering them); otherwise the batch alone. The
  // executor's time for the batch alone would promise a drain rate the machine does not have.
  auto& last_end = last_batch_end_[static_cast<size_t>(executor)];
  const auto cycle_start = oldest <= last_end ? last_end : t_start;
  last_end = t_scattered;
  // Racy read-modify-write between executors is fine: this is an estimate.
  const int64_t took = static_cast<int64_t>(Nanos(t_scattered - cycle_start));
  const int64_t average = batch_ns_.load(std::memory_order_relaxed);
  batch_ns_.store(average == 0 ? took : average + (took - average) / 8, std::memory_order_relaxed);
  stats_.execution_count.fetch_add(1, std::memory_order_relaxed);
  stats_.inference_count.fetch_add(static_cast<uint64_t>(batch_rows), std::memory_order_relaxed);
  stats_.compute_input_ns.fetch_add(Nanos(t_gathered - t_start), std::memory_order_relaxed);
  stats_.compute_infer_ns.fetch_add(Nanos(t_executed - t_gathered), std::memory_order_relaxed);
  stats_.compute_output_ns.fetch_add(Nanos(t_scattered - t_executed), std::memory_order_relaxed);
  stats_.compute_seconds.Observe(Seconds(t_scattered - t_start));
  stats_.batch_size.Observe(static_cast<double>(batch_rows));
}

void Batcher::Complete(std::vector<Request*>* done) {
  if (done->empty()) return;
  const auto now = Clock::now();
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (Request* r : *done) {
      by_token_.erase(r->token);
      if (r->cancelled.load(std::memory_order_relaxed) && r->status == Status::kOk)
        r->status.store(Status::kCancelled);
    }
  }
  for (Request* r : *done) {
    const Status status = r->status.load();
    if (status == Status::kOk) {
      stats_.success.fetch_add(1, std::memory_order_relaxed);
      stats_.request_seconds.Observe(Seconds(now - r->enqueue_time));
    } else {
      stats_.failures[static_cast<size_t>(status)].fetch_add(1, std::memory_order_relaxed);
    }
  }
  // Requests with a sink go to it (grouped per sink); the rest wait for Drain().
  auto routed = std::stable_partition(done->begin(), done->end(), [](Request* r) { return r->sink == nullptr; });
  while (routed != done->end()) {
    CompletionSink* sink = (*routed)->sink;
    auto others = std::stable_partition(routed, done->end(), [sink](Request* r) { return r->sink == sink; });
    std::vector<Request*> group(routed, others);
    done->erase(routed, others);
    sink->Deliver(this, &group);
    routed = std::find_if(done->begin(), done->end(), [](Request* r) { return r->sink != nullptr; });
  }
  if (done->empty()) return;
  bool was_empty;
  {
    std::lock_guard<std::mutex> lk(done_mu_);
    was_empty = completed_.empty();
    completed_.insert(completed_.end(), done->begin(), done->end());
  }
  done->clear();
  if (was_empty) Notify();
}

void Batcher::Notify() { Signal(notify_write_fd_); }

std::vector<Request*> Batcher::Drain() {
  std::vector<Request*> out;
  std::lock_guard<std::mutex> lk(done_mu_);
  ClearSignal(notify_fd_);
  out.swap(completed_);
  return out;
}

void Batcher::Shutdown(bool drain) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!stopping_) {
      stopping_ = true;
      drain_on_stop_ = drain;
    } else if (!drain) {
      drain_on_stop_ = false;
    }
  }
  cv_.notify_all();
  if (config_.inline_execution) {
    if (drain) {
      RunReady();
    } else {
      // After a batch another thread may be running (the HTTP front end's): the owner
      // may free what the backend uses once this returns.
      std::lock_guard<std::mutex> run(run_mu_);
      std::vector<Request*> done;
      {
        std::lock_guard<std::mutex> lk(mu_);
        FailAllLocked(Status::kShutdown, &done);
      }
      Complete(&done);
    }
    return;
  }
  std::lock_guard<std::mutex> lk(join_mu_);
  for (auto& t : executors_)
    if (t.joinable()) t.join();
}

int64_t Batcher::queued_requests() const {
  std::lock_guard<std::mutex> lk(mu_);
  return queued_requests_;
}

int64_t Batcher::queued_rows() const {
  std::lock_guard<std::mutex> lk(mu_);
  return queued_rows_;
}

}  // namespace vivace

// Stress test of the batcher for the sanitizer builds (ASan/UBSan, TSan): producers on
// several threads, several executors, cancellations, timeouts, a failing backend and a
// shutdown with requests in flight. Every request must complete exactly once, with the
// right output when it ran. Exits non-zero on the first violation.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <poll.h>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "batcher/batcher.h"
#include "batcher/oip_json.h"

using vivace::Batcher;
using vivace::BatcherConfig;
using vivace::Request;
using vivace::Status;

namespace {

int failures = 0;

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

constexpr int kFeatures = 4;

struct Run {
  explicit Run(BatcherConfig c) : batcher(Configure(std::move(c)), [this](int e, int64_t rows) { Execute(e, rows); }) {}

  static BatcherConfig Configure(BatcherConfig c) {
    c.input_row_bytes = {kFeatures * sizeof(float)};
    c.output_row_bytes = {sizeof(float)};
    return c;
  }

  void Execute(int executor, int64_t rows) {
    if (fail_every > 0 && batches.fetch_add(1) % fail_every == 0) throw std::runtime_error("injected failure");
    const auto* in = reinterpret_cast<const float*>(batcher.input_buffer(executor, 0));
    auto* out = reinterpret_cast<float*>(batcher.output_buffer(executor, 0));
    for (int64_t r = 0; r < rows; ++r) {
      float sum = 0;
      for (int f = 0; f < kFeatures; ++f) sum += in[r * kFeatures + f];
      out[r] = sum;
    }
  }

  // Submits `rows` rows whose features are all `value`.
  Status Submit(uint64_t token, int64_t rows, float value, int priority = 0, int64_t timeout_us = 0) {
    Request* r = batcher.Acquire(rows);
    auto* in = reinterpret_cast<float*>(r->input.data());
    for (int64_t i = 0; i < rows * kFeatures; ++i) in[i] = value;
    const Status s = batcher.Enqueue(r, token, priority, timeout_us);
    if (s != Status::kOk) batcher.Release(r);
    return s;
  }

  // Drains until `expected` completions arrived; checks each exactly once.
  void Collect(size_t expected, std::set<uint64_t>* seen, std::atomic<int>* ok_count) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (seen->size() < expected && std::chrono::steady_clock::now() < deadline) {
      pollfd p{batcher.notify_fd(), POLLIN, 0};
      poll(&p, 1, 10);
      for (Request* r : batcher.Drain()) {
        Check(seen->insert(r->token).second, "a request completed twice");
        if (r->status.load() == Status::kOk) {
          const float value = static_cast<float>(r->token % 97);
          const auto* out = reinterpret_cast<const float*>(r->output.data());
          for (int64_t i = 0; i < r->rows; ++i) Check(out[i] == value * kFeatures, "wrong output value");
          ++*ok_count;
        }
        batcher.Release(r);
      }
    }
    Check(seen->size() == expected, "not every request completed");
  }

  Batcher batcher;
  std::atomic<int> batches{0};
  int fail_every = 0;
};

void StressThreads() {
  BatcherConfig c;
  c.max_batch_size = 16;
  c.preferred_batch_sizes = {8};
  c.max_queue_delay_us = 200;
  c.priority_levels = 3;
  c.default_priority = 2;
  c.default_timeout_us = 50'000;
  c.executors = 3;
  Run run(c);
  run.fail_every = 17;
  constexpr int kProducers = 4, kPerProducer = 2000;
  std::atomic<int> accepted{0};
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      std::mt19937 rng(static_cast<unsigned>(p));
      for (int i = 0; i < kPerProducer; ++i) {
        const uint64_t token = static_cast<uint64_t>(p) * 1'000'000 + static_cast<uint64_t>(i) + 1;
        const int64_t rows = 1 + static_cast<int64_t>(rng() % 40);  // some exceed max_batch_size
        const Status s = run.Submit(token, rows, static_cast<float>(token % 97), static_cast<int>(rng() % 4),
                                    rng() % 5 == 0 ? 1000 : 0);
        Check(s == Status::kOk, "submit refused");
        ++accepted;
        if (rng() % 7 == 0) run.batcher.Cancel(token);
      }
    });
  }
  std::set<uint64_t> seen;
  std::atomic<int> ok{0};
  for (auto& t : producers) t.join();
  run.Collect(static_cast<size_t>(accepted.load()), &seen, &ok);
  const auto& st = run.batcher.stats();
  Check(st.success.load() == static_cast<uint64_t>(ok.load()), "success counter disagrees");
  Check(ok.load() > 0, "nothing succeeded");
  std::printf("threads: %d accepted, %d ok, %llu batches\n", accepted.load(), ok.load(),
              static_cast<unsigned long long>(st.execution_count.load()));
}

void ShutdownInFlight(bool drain) {
  BatcherConfig c;
  c.max_batch_size = 4;
  c.executors = 2;
  Run run(c);
  for (uint64_t t = 1; t <= 500; ++t) Check(run.Submit(t, 3, static_cast<float>(t % 97)) == Status::kOk, "submit");
  run.batcher.Shutdown(drain);
  Check(run.Submit(1000, 1, 1) == Status::kShutdown, "submit after shutdown must be refused");
  std::set<uint64_t> seen;
  std::atomic<int> ok{0};
  run.Collect(500, &seen, &ok);
  if (drain) Check(ok.load() == 500, "drain must run every queued request");
  std::printf("shutdown(drain=%d): %d of 500 ran\n", drain, ok.load());
}

void Inline() {
  BatcherConfig c;
  c.max_batch_size = 8;
  c.inline_execution = true;
  Run run(c);
  for (uint64_t t = 1; t <= 100; ++t) Check(run.Submit(t, 1 + static_cast<int64_t>(t % 11), static_cast<float>(t % 97)) == Status::kOk, "submit");
  Check(run.batcher.RunReady() == -1, "nothing should wait after RunReady");
  std::set<uint64_t> seen;
  std::atomic<int> ok{0};
  run.Collect(100, &seen, &ok);
  Check(ok.load() == 100, "inline requests must all succeed");
}

// Random mutations of a valid body through the JSON fast path: under the sanitizers any
// out-of-bounds read or overflow in the parser shows up here.
void JsonMutations() {
  using vivace::JsonTensor;
  using vivace::JsonType;
  vivace::OipJsonCodec codec("m", "1", {JsonTensor{"x", "FP32", JsonType::kF32, {3}, 3}},
                             {JsonTensor{"y", "FP32", JsonType::kF32, {1}, 1}});
  const std::string base =
      R"({"id":"q","inputs":[{"name":"x","shape":[2,3],"datatype":"FP32","data":[[1,2.5,-3e2],[4,5,6]]}]})";
  const std::string alphabet = "{}[],:\"0123456789.-eE+ \ntruefalsnul\\";
  std::mt19937 rng(7);
  std::vector<uint8_t> dest(64);
  int accepted = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string body = base;
    for (int k = 0, n = 1 + static_cast<int>(rng() % 4); k < n; ++k) {
      const size_t pos = rng() % (body.size() + 1);
      const char ch = alphabet[rng() % alphabet.size()];
      switch (rng() % 3) {
        case 0: if (!body.empty()) body.erase(std::min(pos, body.size() - 1), 1); break;
        case 1: body.insert(pos, 1, ch); break;
        default: if (!body.empty()) body[std::min(pos, body.size() - 1)] = ch;
      }
    }
    // Exact-size heap copy so that ASan catches any read past the end.
    std::vector<char> exact(body.begin(), body.end());
    std::vector<std::pair<const char*, const char*>> spans;
    std::string id;
    bool has_id = false;
    const int64_t rows = codec.Parse(exact.data(), exact.size(), &spans, &id, &has_id);
    if (rows <= 0) continue;
    dest.assign(static_cast<size_t>(rows) * 3 * sizeof(float), 0);
    if (codec.Fill(spans, rows, dest.data())) {
      ++accepted;
      std::vector<uint8_t> out(static_cast<size_t>(rows) * sizeof(float), 0);
      Check(!codec.Format(out.data(), rows, id, has_id).empty(), "empty response body");
    }
  }
  Check(accepted > 0, "no mutation survived: the base body itself must be accepted");
  std::printf("json mutations: %d of 20000 accepted\n", accepted);
}

}  // namespace

int main() {
  JsonMutations();
  StressThreads();
  ShutdownInFlight(true);
  ShutdownInFlight(false);
  Inline();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("batcher_test: all checks passed\n");
  return 0;
}

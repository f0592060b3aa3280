// Native stress test of the MLP kernels, meant to run under the sanitizers (ASan/UBSan,
// TSan): every level this CPU has against the portable level on odd shapes and batch
// sizes, fp32 and int8 (dynamic and static scales), NaN rows, several threads sharing
// models (with and without their thread pool), and forks while another thread runs a model.
// Exits 1 on any mismatch.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "kernels/mlp.h"

namespace {

using vivace::kernels::Activation;
using vivace::kernels::CpuLevel;
using vivace::kernels::LayerSpec;
using vivace::kernels::NativeMlp;
using vivace::kernels::Precision;

int failures = 0;

void Check(bool ok, const char* what, const char* level, int case_id) {
  if (ok) return;
  std::fprintf(stderr, "FAIL: %s (level %s, case %d)\n", what, level, case_id);
  ++failures;
}

std::vector<LayerSpec> RandomMlp(const std::vector<int>& dims, std::mt19937& rng, bool static_ranges) {
  std::normal_distribution<float> normal;
  std::vector<LayerSpec> specs(dims.size() - 1);
  for (size_t l = 0; l < specs.size(); ++l) {
    LayerSpec& s = specs[l];
    s.in_features = dims[l];
    s.out_features = dims[l + 1];
    s.activation = l + 2 < dims.size() ? Activation::kRelu : Activation::kSigmoid;
    s.weight.resize(static_cast<size_t>(dims[l]) * static_cast<size_t>(dims[l + 1]));
    for (float& w : s.weight) w = normal(rng) / std::sqrt(static_cast<float>(dims[l]));
    s.bias.resize(static_cast<size_t>(dims[l + 1]));
    for (float& b : s.bias) b = 0.1f * normal(rng);
    s.has_input_range = static_ranges;
    s.input_min = l == 0 ? -3.0f : 0.0f;
    s.input_max = 3.0f;
  }
  return specs;
}

void CompareLevels() {
  const std::vector<std::vector<int>> shapes = {{1, 1}, {7, 33, 3}, {33, 257, 5, 1}, {257, 64, 7}, {32, 256, 256, 1}};
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  int case_id = 0;
  for (const auto& dims : shapes) {
    for (int variant = 0; variant < 3; ++variant) {  // fp32, int8 dynamic, int8 static
      ++case_id;
      const Precision precision = variant == 0 ? Precision::kFp32 : Precision::kInt8;
      const auto specs = RandomMlp(dims, rng, variant == 2);
      const NativeMlp reference(specs, precision, CpuLevel::kPortable);
      for (CpuLevel level : vivace::kernels::SupportedLevels()) {
        const NativeMlp mlp(specs, precision, level);
        for (int64_t rows : {1, 5, 13, 300}) {
          std::vector<float> x(static_cast<size_t>(rows * dims.front()));
          for (float& v : x) v = normal(rng);
          if (rows > 3 && precision == Precision::kInt8) x[static_cast<size_t>(2 * dims.front())] = NAN;
          std::vector<float> want(static_cast<size_t>(rows * dims.back())), got(want.size());
          reference.Forward(x.data(), rows, want.data());
          mlp.Forward(x.data(), rows, got.data());
          const float tol = precision == Precision::kFp32 ? 1e-4f : 5e-3f;
          for (size_t i = 0; i < got.size(); ++i) {
            const bool both_nan = std::isnan(got[i]) && std::isnan(want[i]);
            Check(both_nan || std::fabs(got[i] - want[i]) <= tol, "level disagrees with portable",
                  vivace::kernels::LevelName(level), case_id);
          }
        }
      }
    }
  }
}

void SharedModels() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  const auto specs = RandomMlp({32, 256, 256, 1}, rng, false);
  const CpuLevel best = vivace::kernels::SupportedLevels().back();
  const NativeMlp pooled(specs, Precision::kInt8, best, 2);
  const NativeMlp single(specs, Precision::kFp32, best, 1);
  const int64_t rows = 300;
  std::vector<float> x(static_cast<size_t>(rows * 32));
  for (float& v : x) v = normal(rng);
  std::vector<float> want_pooled(rows), want_single(rows);
  pooled.Forward(x.data(), rows, want_pooled.data());
  single.Forward(x.data(), rows, want_single.data());
  std::vector<int> bad(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<float> out(rows);
      for (int it = 0; it < 40; ++it) {
        const bool use_pool = (t + it) % 2 == 0;
        const int64_t n = it % 3 == 0 ? 1 : it % 3 == 1 ? 24 : rows;  // 24: split by columns
        (use_pool ? pooled : single).Forward(x.data(), n, out.data());
        const auto& want = use_pool ? want_pooled : want_single;
        for (int64_t r = 0; r < n; ++r) bad[static_cast<size_t>(t)] += out[static_cast<size_t>(r)] != want[static_cast<size_t>(r)];
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int b : bad) Check(b == 0, "concurrent calls differ from a single call", "shared", 0);
}

// A fork can land while another thread (a native caller: no GIL in between) is inside
// Forward, taking or putting back its scratch slot: nothing it held may stay locked in the
// child. TSan does not support forking a process with other threads running.
void ForkWhileAnotherThreadRuns() {
#if !defined(__SANITIZE_THREAD__)
  std::mt19937 rng(9);
  const auto specs = RandomMlp({64, 256, 1}, rng, false);
  const NativeMlp mlp(specs, Precision::kInt8, vivace::kernels::SupportedLevels().back());
  const std::vector<float> x(64, 0.5f);
  float want = 0.0f;
  mlp.Forward(x.data(), 1, &want);
  std::atomic<bool> stop{false};
  std::thread caller([&] {
    float y = 0.0f;
    while (!stop.load(std::memory_order_relaxed)) mlp.Forward(x.data(), 1, &y);
  });
  int hung = 0, wrong = 0;
  for (int attempt = 0; attempt < 300 && hung == 0; ++attempt) {
    const pid_t pid = fork();
    if (pid == 0) {
      float y = 0.0f;
      mlp.Forward(x.data(), 1, &y);
      _exit(y == want ? 0 : 1);
    }
    int status = 0;
    bool exited = false;
    for (int ms = 0; ms < 5000 && !exited; ++ms) {
      exited = waitpid(pid, &status, WNOHANG) == pid;
      if (!exited) usleep(1000);
    }
    if (!exited) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      ++hung;
    } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      ++wrong;
    }
  }
  stop = true;
  caller.join();
  Check(hung == 0, "a child forked while another thread ran Forward hung", "fork", 0);
  Check(wrong == 0, "a child forked while another thread ran Forward computed a different result", "fork", 0);
#endif
}

}  // namespace

int main() {
  CompareLevels();
  SharedModels();
  ForkWhileAnotherThreadRuns();
  if (failures == 0) std::printf("kernels_test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}

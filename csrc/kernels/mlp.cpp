#include "kernels/mlp.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace vivace::kernels {
namespace {

constexpr int64_t kAlign = 64;
constexpr int kMaxPanel = 16;             // widest output panel of any level: pad per-output arrays to it
// Each part of a split batch gets at least this much work (~10 µs int8, ~40 µs fp32 on one
// AVX-512 core): below it, handing rows to a helper costs more than it saves.
constexpr int64_t kMinMacsPerThread = 2'000'000;
constexpr int kMaxThreads = 8;
// How long the pool's threads spin before sleeping (see ThreadPool).
constexpr std::chrono::microseconds kSpin{100};
// Layers with at most this many outputs run as fp32 dot products at every precision: the
// panel kernels would pad them to 8-16 outputs, and their weights are too few to matter.
constexpr int kDotMaxOutputs = 4;

int64_t RoundUp(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

template <typename T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(int64_t count) : size_(count) {
    const auto bytes = static_cast<size_t>(RoundUp(std::max<int64_t>(count, 1) * static_cast<int64_t>(sizeof(T)), kAlign));
    void* p = std::aligned_alloc(kAlign, bytes);
    if (p == nullptr) throw std::bad_alloc();
    std::memset(p, 0, bytes);
    data_.reset(static_cast<T*>(p));
  }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  int64_t size() const { return size_; }

 private:
  std::unique_ptr<T, AlignedFree> data_;
  int64_t size_ = 0;
};

const LevelOps& OpsFor(CpuLevel level) {
  switch (level) {
    case CpuLevel::kPortable: return PortableOps();
    case CpuLevel::kAvx2: return Avx2Ops();
    case CpuLevel::kAvx512: return Avx512Ops();
    case CpuLevel::kAmx: return AmxOps();
  }
  throw std::invalid_argument("unknown CPU level");
}

void ApplyActivation(Activation act, float* y, int64_t rows, int n, int64_t ldy) {
  if (act == Activation::kIdentity || act == Activation::kRelu) return;  // fused in the GEMM
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * ldy;
    switch (act) {
      case Activation::kGelu:
        for (int o = 0; o < n; ++o) yr[o] = 0.5f * yr[o] * (1.0f + std::erf(yr[o] * 0.70710678118654752f));
        break;
      case Activation::kSigmoid:
        for (int o = 0; o < n; ++o) yr[o] = 1.0f / (1.0f + std::exp(-yr[o]));
        break;
      case Activation::kTanh:
        for (int o = 0; o < n; ++o) yr[o] = std::tanh(yr[o]);
        break;
      default:
        break;
    }
  }
}

}  // namespace

Activation ParseActivation(const std::string& name) {
  for (Activation a : {Activation::kIdentity, Activation::kRelu, Activation::kGelu, Activation::kSigmoid,
                       Activation::kTanh})
    if (name == ActivationName(a)) return a;
  throw std::invalid_argument("unknown activation '" + name + "' (expected identity, relu, gelu, sigmoid or tanh)");
}

const char* ActivationName(Activation activation) {
  switch (activation) {
    case Activation::kIdentity: return "identity";
    case Activation::kRelu: return "relu";
    case Activation::kGelu: return "gelu";
    case Activation::kSigmoid: return "sigmoid";
    case Activation::kTanh: return "tanh";
  }
  return "unknown";
}

Precision ParsePrecision(const std::string& name) {
  if (name == "fp32") return Precision::kFp32;
  if (name == "int8") return Precision::kInt8;
  throw std::invalid_argument("unknown precision '" + name + "' (expected fp32 or int8)");
}

const char* PrecisionName(Precision precision) { return precision == Precision::kInt8 ? "int8" : "fp32"; }

struct NativeMlp::Layer {
  int in = 0;
  int out = 0;
  int k_pad = 0;  // int8: inputs padded to the level's step
  bool dot = false;  // few outputs: fp32 dot products on unpacked weights (w_fp32)
  Activation activation = Activation::kIdentity;
  AlignedBuffer<float> w_fp32;
  AlignedBuffer<int8_t> w_int8;
  AlignedBuffer<float> bias, w_scale, w_sum;  // padded to whole panels
  bool is_static = false;
  StaticRange range{};
};

struct NativeMlp::Scratch {
  AlignedBuffer<float> act[2];
  AlignedBuffer<uint8_t> q;
  AlignedBuffer<float> row_scale, row_min;
};

// A fixed set of helper threads running one job at a time. A caller that finds the pool
// busy (another executor thread is using it) runs its batch alone instead of waiting.
// Both sides spin briefly before sleeping: waking a sleeping thread costs tens of µs on
// virtual machines (the idle vCPU is halted), as much as a whole batch of a few hundred rows.
class NativeMlp::ThreadPool {
 public:
  explicit ThreadPool(int helpers) {
    for (int i = 0; i < helpers; ++i) threads_.emplace_back([this, i] { Loop(i + 1); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // Runs job(part) for part 0..parts-1 (part 0 on the caller); false when the pool is busy.
  template <typename Job>
  bool TryRun(int parts, const Job& job) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ctx_ = &job;
      job_fn_ = [](const void* ctx, int part) { (*static_cast<const Job*>(ctx))(part); };
      parts_ = parts;
      pending_.store(parts - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    job(0);
    if (SpinUntil([this] { return pending_.load(std::memory_order_acquire) == 0; })) return true;
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    return true;
  }

 private:
  template <typename Ready>
  static bool SpinUntil(const Ready& ready) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (;;) {
      for (int i = 0; i < 64; ++i) {
        if (ready()) return true;
        CpuRelax();
      }
      if (std::chrono::steady_clock::now() >= until) return ready();
    }
  }

  static void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  void Loop(int part) {
    uint64_t seen = 0;
    for (;;) {
      SpinUntil([&] { return generation_.load(std::memory_order_acquire) != seen; });
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || generation_.load(std::memory_order_relaxed) != seen; });
      if (stop_) return;
      seen = generation_.load(std::memory_order_relaxed);
      if (part >= parts_) continue;
      const void* ctx = job_ctx_;
      void (*fn)(const void*, int) = job_fn_;
      lock.unlock();
      fn(ctx, part);
      lock.lock();
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex busy_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  bool stop_ = false;
  std::atomic<uint64_t> generation_{0};
  int parts_ = 0;
  std::atomic<int> pending_{0};
  const void* job_ctx_ = nullptr;
  void (*job_fn_)(const void*, int) = nullptr;
};

NativeMlp::NativeMlp(const std::vector<LayerSpec>& specs, Precision precision, CpuLevel level, int num_threads)
    : ops_(&OpsFor(level)), level_(level), precision_(precision), num_threads_(num_threads) {
  if (!CpuSupports(level))
    throw std::invalid_argument(std::string("CPU level '") + LevelName(level) + "' is not supported by this CPU");
  if (specs.empty()) throw std::invalid_argument("an MLP needs at least one layer");
  if (num_threads < 1 || num_threads > kMaxThreads)
    throw std::invalid_argument("num_threads must be in 1.." + std::to_string(kMaxThreads));
  const LevelOps& ops = *ops_;
  int64_t widest = 0, widest_k = 0;
  layers_.reserve(specs.size());
  for (size_t li = 0; li < specs.size(); ++li) {
    const LayerSpec& s = specs[li];
    const std::string where = "layer " + std::to_string(li) + ": ";
    if (s.in_features < 1 || s.out_features < 1)
      throw std::invalid_argument(where + "in_features and out_features must be >= 1");
    if (li > 0 && s.in_features != specs[li - 1].out_features)
      throw std::invalid_argument(where + "in_features " + std::to_string(s.in_features) +
                                  " does not match the previous layer's out_features " +
                                  std::to_string(specs[li - 1].out_features));
    const int64_t k = s.in_features, n = s.out_features;
    if (static_cast<int64_t>(s.weight.size()) != k * n)
      throw std::invalid_argument(where + "weight has " + std::to_string(s.weight.size()) + " values, expected " +
                                  std::to_string(k * n));
    if (!s.bias.empty() && static_cast<int64_t>(s.bias.size()) != n)
      throw std::invalid_argument(where + "bias has " + std::to_string(s.bias.size()) + " values, expected " +
                                  std::to_string(n));
    for (float v : s.weight)
      if (!std::isfinite(v)) throw std::invalid_argument(where + "weight holds NaN or Inf");
    for (float v : s.bias)
      if (!std::isfinite(v)) throw std::invalid_argument(where + "bias holds NaN or Inf");

    Layer L;
    L.in = s.in_features;
    L.out = s.out_features;
    L.activation = s.activation;
    const int64_t n_pad = RoundUp(n, kMaxPanel);
    L.bias = AlignedBuffer<float>(n_pad);
    if (!s.bias.empty()) std::memcpy(L.bias.data(), s.bias.data(), static_cast<size_t>(n) * sizeof(float));

    if (n <= kDotMaxOutputs) {
      L.dot = true;
      L.w_fp32 = AlignedBuffer<float>(n * k);
      std::memcpy(L.w_fp32.data(), s.weight.data(), static_cast<size_t>(n * k) * sizeof(float));
    } else if (precision == Precision::kFp32) {
      const int P = ops.fp32_panel;
      L.w_fp32 = AlignedBuffer<float>(RoundUp(n, P) * k);
      float* packed = L.w_fp32.data();
      for (int64_t o = 0; o < n; ++o)
        for (int64_t i = 0; i < k; ++i) packed[((o / P) * k + i) * P + o % P] = s.weight[static_cast<size_t>(o * k + i)];
    } else {
      const int P = ops.i8_panel, S = ops.i8_step;
      L.k_pad = static_cast<int>(RoundUp(k, std::max(S, ops.i8_k_align)));
      L.w_int8 = AlignedBuffer<int8_t>(RoundUp(n, P) * L.k_pad);
      L.w_scale = AlignedBuffer<float>(n_pad);
      L.w_sum = AlignedBuffer<float>(n_pad);
      int8_t* packed = L.w_int8.data();
      for (int64_t o = 0; o < n; ++o) {
        const float* wo = s.weight.data() + o * k;
        float amax = 0.0f;
        for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(wo[i]));
        const float scale = amax / 127.0f;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int64_t qsum = 0;
        for (int64_t i = 0; i < k; ++i) {
          const float t = std::min(127.0f, std::max(-127.0f, std::nearbyint(wo[i] * inv)));
          const auto qv = static_cast<int8_t>(t);
          qsum += qv;
          packed[(((o / P) * (L.k_pad / S) + i / S) * P + o % P) * S + i % S] = qv;
        }
        L.w_scale.data()[o] = scale;
        L.w_sum.data()[o] = scale * static_cast<float>(qsum);
      }
      if (s.has_input_range) {
        if (!(std::isfinite(s.input_min) && std::isfinite(s.input_max) && s.input_min <= s.input_max))
          throw std::invalid_argument(where + "input range must be finite with min <= max");
        L.is_static = true;
        L.range.min = s.input_min;
        L.range.scale = (s.input_max - s.input_min) / 255.0f;
        L.range.inv_scale = s.input_max > s.input_min ? 255.0f / (s.input_max - s.input_min) : 0.0f;
      }
      widest_k = std::max<int64_t>(widest_k, L.k_pad);
    }
    if (li + 1 < specs.size()) widest = std::max(widest, n_pad);
    macs_per_row_ += k * n;
    layers_.push_back(std::move(L));
  }
  in_features_ = specs.front().in_features;
  out_features_ = specs.back().out_features;
  act_ld_ = std::max<int64_t>(widest, kMaxPanel);
  q_ld_ = widest_k;
  // Rows per pass through all layers: the hidden activations of a chunk stay near 1 MiB
  // (cache-resident), and each weight panel loaded is reused across the whole chunk.
  chunk_rows_ = std::clamp<int64_t>((int64_t{1} << 20) / (act_ld_ * 4), 16, 512);
  free_scratch_.reserve(64);
  if (num_threads > 1) pool_ = std::make_unique<ThreadPool>(num_threads - 1);
}

NativeMlp::~NativeMlp() = default;

size_t NativeMlp::num_layers() const { return layers_.size(); }

std::unique_ptr<NativeMlp::Scratch> NativeMlp::NewScratch() const {
  auto s = std::make_unique<Scratch>();
  for (auto& a : s->act) a = AlignedBuffer<float>(chunk_rows_ * act_ld_);
  if (precision_ == Precision::kInt8) {
    s->q = AlignedBuffer<uint8_t>(chunk_rows_ * q_ld_ * ops_->act_bytes);
    s->row_scale = AlignedBuffer<float>(chunk_rows_);
    s->row_min = AlignedBuffer<float>(chunk_rows_);
  }
  return s;
}

void NativeMlp::RunChunk(const float* x, int64_t rows, float* out, Scratch& s) const {
  const float* cur = x;
  int64_t ldx = in_features_;
  for (size_t li = 0; li < layers_.size(); ++li) {
    const Layer& L = layers_[li];
    const bool last = li + 1 == layers_.size();
    float* dst = last ? out : s.act[li % 2].data();
    const int64_t ldd = last ? L.out : act_ld_;
    const bool relu = L.activation == Activation::kRelu;
    if (L.dot) {
      ops_->dot_fp32(cur, ldx, rows, L.in, L.w_fp32.data(), L.out, L.bias.data(), relu, dst, ldd);
    } else if (precision_ == Precision::kFp32) {
      ops_->gemm_fp32(cur, ldx, rows, L.in, L.w_fp32.data(), L.out, L.bias.data(), relu, dst, ldd);
    } else {
      ops_->quantize(cur, ldx, rows, L.in, L.k_pad, L.is_static ? &L.range : nullptr, s.q.data(), q_ld_,
                     s.row_scale.data(), s.row_min.data());
      const Int8Epilogue e{s.row_scale.data(), s.row_min.data(), L.w_scale.data(), L.w_sum.data(), L.bias.data(), relu};
      ops_->gemm_int8(s.q.data(), q_ld_, rows, L.k_pad, L.w_int8.data(), L.out, e, dst, ldd);
    }
    ApplyActivation(L.activation, dst, rows, L.out, ldd);
    cur = dst;
    ldx = ldd;
  }
}

void NativeMlp::RunRows(const float* x, int64_t rows, float* out, Scratch& s) const {
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows_) {
    const int64_t n = std::min(chunk_rows_, rows - r0);
    RunChunk(x + r0 * in_features_, n, out + r0 * out_features_, s);
  }
}

void NativeMlp::Forward(const float* x, int64_t rows, float* out) const {
  if (rows <= 0) return;
  const int64_t min_rows = std::max<int64_t>(1, kMinMacsPerThread / macs_per_row_);
  const int parts = static_cast<int>(std::min<int64_t>(num_threads_, rows / min_rows));
  // Borrow one scratch slot per part; slots come back to the pool when this call ends.
  std::unique_ptr<Scratch> slots[kMaxThreads];
  const int used = std::max(1, parts);
  {
    std::lock_guard<std::mutex> lock(scratch_mu_);
    for (int i = 0; i < used; ++i) {
      if (!free_scratch_.empty()) {
        slots[i] = std::move(free_scratch_.back());
        free_scratch_.pop_back();
      }
    }
  }
  for (int i = 0; i < used; ++i)
    if (!slots[i]) slots[i] = NewScratch();
  const int64_t per_part = RoundUp((rows + used - 1) / used, 4);
  auto job = [&](int part) {
    const int64_t r0 = std::min(rows, part * per_part);
    const int64_t n = std::min(per_part, rows - r0);
    if (n > 0) RunRows(x + r0 * in_features_, n, out + r0 * out_features_, *slots[part]);
  };
  if (used == 1 || !pool_ || !pool_->TryRun(used, job)) RunRows(x, rows, out, *slots[0]);
  std::lock_guard<std::mutex> lock(scratch_mu_);
  for (int i = 0; i < used; ++i) free_scratch_.push_back(std::move(slots[i]));
}

}  // namespace vivace::kernels

extern "C" int vivace_native_mlp_forward(const void* model, const float* x, int64_t rows, float* out) {
  static_cast<const vivace::kernels::NativeMlp*>(model)->Forward(x, rows, out);
  return 0;
}

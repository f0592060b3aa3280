#include "kernels/mlp.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <system_error>
#include <thread>

#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace vivace::kernels {
namespace {

constexpr int64_t kAlign = 64;
constexpr int kMaxPanel = 16;             // widest output panel of any level: pad per-output arrays to it
// Each part of a split batch gets at least this much work (~4 µs int8 on one AVX-512
// core): below it, handing work to a helper costs more than it saves.
constexpr double kMinMacsPerThread = 750'000.0;
// Batches of fewer rows per part than this are split by output columns instead of rows.
constexpr int64_t kMinRowsPerPart = 16;
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

void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Polls `ready` until it holds or `spin` has passed. It yields every 64 polls: on a CPU
// shared with the thread it waits for (more threads than free cores), that thread runs.
template <typename Ready>
bool SpinUntil(const Ready& ready, std::chrono::microseconds spin) {
  const auto until = std::chrono::steady_clock::now() + spin;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (ready()) return true;
      CpuRelax();
    }
    if (std::chrono::steady_clock::now() >= until) return ready();
    std::this_thread::yield();
  }
}

// Quantises one output channel's weights w[0..k) into q (see mlp_kernels.h: |q| <= 127 and
// |q[2j]| + |q[2j+1]| <= kInt8PairLimit) and returns their scale. In double: a pair's float
// sum can overflow, and so can 1/scale. A channel whose scale is below the smallest normal
// float (weights under ~1e-36) counts as zero, as its float epilogue could not carry it.
double QuantizeChannel(const float* w, int64_t k, int8_t* q) {
  double amax = 0.0, pair_max = 0.0;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(static_cast<double>(w[i])));
  for (int64_t i = 0; i + 1 < k; i += 2)
    pair_max = std::max(pair_max, std::fabs(static_cast<double>(w[i])) + std::fabs(static_cast<double>(w[i + 1])));
  double scale = std::max(amax / 127.0, pair_max / kInt8PairLimit);
  if (static_cast<float>(scale) < std::numeric_limits<float>::min()) scale = 0.0;
  const double inv = scale > 0.0 ? 1.0 / scale : 0.0;
  for (int64_t i = 0; i < k; ++i)
    q[i] = static_cast<int8_t>(std::clamp(std::nearbyint(static_cast<double>(w[i]) * inv), -127.0, 127.0));
  // Both of a pair may round up past the bound (further under another rounding mode): the
  // larger gives way until it holds.
  for (int64_t i = 0; i + 1 < k; i += 2) {
    int8_t& a = q[i];
    int8_t& b = q[i + 1];
    while (std::abs(a) + std::abs(b) > kInt8PairLimit) {
      int8_t& big = std::abs(a) >= std::abs(b) ? a : b;
      big = static_cast<int8_t>(big > 0 ? big - 1 : big + 1);
    }
  }
  return scale;
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
  // int8 layers whose outputs go straight into the next layer's static quantisation
  // (LevelOps::gemm_int8_requantize), unless the batch is split by columns.
  bool requantizes = false;
};

struct NativeMlp::Scratch {
  AlignedBuffer<float> act[2];
  AlignedBuffer<uint8_t> q;
  AlignedBuffer<float> row_scale, row_min;
  // The next layer's input while a layer requantises its outputs (swapped with the above).
  AlignedBuffer<uint8_t> q_next;
  AlignedBuffer<float> row_scale_next, row_min_next;
  // A batch split by columns: `claimed` then `done` per step, used from the caller's slot.
  std::unique_ptr<std::atomic<int>[]> column_counters;
};

// Shared work of a batch split by output columns: each layer of each chunk (a step) is cut
// into `units` column ranges, claimed by whichever threads are in the job; a step starts
// when every unit of the one before it is done, since it reads all of that step's columns.
struct NativeMlp::ColumnWork {
  int units;
  std::atomic<int>* claimed;  // per step
  std::atomic<int>* done;     // per step
  float* act[2];  // the hidden activations all threads write and read (each quantises into its own scratch)
};

// A fixed set of helper threads running one job at a time: the caller and the helpers all
// run the same job, which shares its work out through its own counters. A caller that finds
// the pool busy (another executor thread is using it) runs its batch alone instead.
// Both sides spin briefly before sleeping: waking a sleeping thread costs tens of µs on
// virtual machines (the idle vCPU is halted), as much as a whole batch of a few hundred rows.
// A helper that wakes after the caller has finished stays out of the job, so the caller
// never waits for a thread that did not get a CPU. In a forked child (which has no helper
// threads) the pool is never used and its destructor does not wait for them.
class NativeMlp::ThreadPool {
 public:
  explicit ThreadPool(int helpers) : helpers_(helpers), wake_(new std::condition_variable[helpers]) {
    try {
      for (int i = 0; i < helpers; ++i) threads_.emplace_back([this, i] { Loop(i); });
    } catch (...) {  // e.g. the OS refused a thread: stop the ones started, then report
      Stop();
      throw;
    }
  }
  ~ThreadPool() {
    if (getpid() != owner_) {
      // The parent's sleeping helpers are still counted as waiters on wake_, and a mutex may
      // have been held at the fork: destroying those would block forever. Fresh ones are
      // constructed over them (the old state is only memory). The thread handles are
      // forgotten the same way, not detached: the child may have reused their ids for its
      // own threads.
      new (&busy_) std::mutex();
      new (&mu_) std::mutex();
      for (int i = 0; i < helpers_; ++i) new (&wake_[i]) std::condition_variable();
      new (&done_) std::condition_variable();
      for (auto& t : threads_) new (&t) std::thread();
      return;
    }
    Stop();
  }

  // Runs job() on the caller and on up to `helpers` helper threads; false when the pool is busy.
  template <typename Job>
  bool TryRun(int helpers, const Job& job) {
    if (getpid() != owner_) return false;
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mu_);
#if defined(__x86_64__) || defined(__i386__)
      csr_ = _mm_getcsr();  // helpers compute with the caller's flush-to-zero and rounding
#endif
      job_ctx_ = &job;
      job_fn_ = [](const void* ctx) { (*static_cast<const Job*>(ctx))(); };
      wanted_ = helpers;
      open_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    for (int i = 0; i < helpers; ++i) wake_[i].notify_one();  // only the helpers wanted
    job();
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = false;
    }
    if (SpinUntil([this] { return active_.load(std::memory_order_acquire) == 0; }, kSpin)) return true;
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return active_.load(std::memory_order_acquire) == 0; });
    return true;
  }

 private:
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    for (int i = 0; i < helpers_; ++i) wake_[i].notify_one();
    for (auto& t : threads_) t.join();
  }

  void Loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      SpinUntil([&] { return generation_.load(std::memory_order_acquire) != seen; }, kSpin);
      std::unique_lock<std::mutex> lock(mu_);
      wake_[index].wait(lock, [&] { return stop_ || generation_.load(std::memory_order_relaxed) != seen; });
      if (stop_) return;
      seen = generation_.load(std::memory_order_relaxed);
      if (!open_ || index >= wanted_) continue;
      active_.fetch_add(1, std::memory_order_relaxed);
      const void* ctx = job_ctx_;
      void (*fn)(const void*) = job_fn_;
#if defined(__x86_64__) || defined(__i386__)
      const unsigned own_csr = _mm_getcsr();
      _mm_setcsr(csr_);
#endif
      lock.unlock();
      fn(ctx);
#if defined(__x86_64__) || defined(__i386__)
      _mm_setcsr(own_csr);
#endif
      lock.lock();
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) done_.notify_one();
    }
  }

  const pid_t owner_ = getpid();
  const int helpers_;
  std::vector<std::thread> threads_;
  std::mutex busy_;
  std::mutex mu_;
  std::unique_ptr<std::condition_variable[]> wake_;  // one per helper
  std::condition_variable done_;
  bool stop_ = false;
  bool open_ = false;  // the current job still takes helpers
  int wanted_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> active_{0};  // helpers inside the current job
  const void* job_ctx_ = nullptr;
  void (*job_fn_)(const void*) = nullptr;
  unsigned csr_ = 0;  // the caller's MXCSR (x86)
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
      std::vector<int8_t> qo(static_cast<size_t>(k));  // one output's quantised weights
      for (int64_t o = 0; o < n; ++o) {
        const float* wo = s.weight.data() + o * k;
        const double scale = QuantizeChannel(wo, k, qo.data());
        int64_t qsum = 0;
        for (int64_t i = 0; i < k; ++i) {
          qsum += qo[static_cast<size_t>(i)];
          packed[(((o / P) * (L.k_pad / S) + i / S) * P + o % P) * S + i % S] = qo[static_cast<size_t>(i)];
        }
        L.w_scale.data()[o] = static_cast<float>(scale);
        L.w_sum.data()[o] = static_cast<float>(scale * static_cast<double>(qsum));
        if (!std::isfinite(L.w_sum.data()[o]))
          throw std::invalid_argument(where + "output " + std::to_string(o) +
                                      ": weights too large for int8 (their sum overflows float32)");
      }
      if (s.has_input_range) {
        if (!(std::isfinite(s.input_min) && std::isfinite(s.input_max) && s.input_min <= s.input_max))
          throw std::invalid_argument(where + "input range must be finite with min <= max");
        // Its width and 255 / width must be finite too: an infinite scale would turn every
        // output into Inf or NaN, and 0 * Inf steps into NaN bytes.
        const float width = s.input_max - s.input_min;
        if (!std::isfinite(width) || (width > 0.0f && !std::isfinite(255.0f / width))) {
          char range[80];
          std::snprintf(range, sizeof range, "[%g, %g]", static_cast<double>(s.input_min),
                        static_cast<double>(s.input_max));
          throw std::invalid_argument(where + "input range " + range + " is too wide or too narrow for float32");
        }
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
  if (ops.gemm_int8_requantize != nullptr && precision == Precision::kInt8)
    for (size_t li = 0; li + 1 < layers_.size(); ++li) {
      Layer& L = layers_[li];
      const Layer& next = layers_[li + 1];
      L.requantizes = !L.dot && L.is_static && !next.dot && next.is_static &&
                      (L.activation == Activation::kRelu || L.activation == Activation::kIdentity);
      requantizes_ = requantizes_ || L.requantizes;
    }
  in_features_ = specs.front().in_features;
  out_features_ = specs.back().out_features;
  act_ld_ = std::max<int64_t>(widest, kMaxPanel);
  q_ld_ = widest_k;
  // Rows per pass through all layers: the hidden activations of a chunk stay near 1 MiB
  // (cache-resident), and each weight panel loaded is reused across the whole chunk.
  chunk_rows_ = std::clamp<int64_t>((int64_t{1} << 20) / (act_ld_ * 4), 16, 512);
  if (num_threads > 1) {
    // Split by columns only below num_threads * kMinRowsPerPart rows (see Forward).
    column_steps_ = ((num_threads * kMinRowsPerPart - 1) / chunk_rows_ + 1) * static_cast<int64_t>(layers_.size());
    try {
      pool_ = std::make_unique<ThreadPool>(num_threads - 1);
    } catch (const std::system_error& e) {
      throw std::runtime_error("num_threads=" + std::to_string(num_threads) + ": could not start the helper threads (" +
                               e.what() + ")");
    }
  }
}

NativeMlp::~NativeMlp() {
  for (auto& place : free_scratch_) delete place.load(std::memory_order_acquire);
}

size_t NativeMlp::num_layers() const { return layers_.size(); }

std::unique_ptr<NativeMlp::Scratch> NativeMlp::NewScratch() const {
  auto s = std::make_unique<Scratch>();
  for (auto& a : s->act) a = AlignedBuffer<float>(chunk_rows_ * act_ld_);
  if (precision_ == Precision::kInt8) {
    s->q = AlignedBuffer<uint8_t>(chunk_rows_ * q_ld_ * ops_->act_bytes);
    s->row_scale = AlignedBuffer<float>(chunk_rows_);
    s->row_min = AlignedBuffer<float>(chunk_rows_);
    if (requantizes_) {
      s->q_next = AlignedBuffer<uint8_t>(chunk_rows_ * q_ld_);
      s->row_scale_next = AlignedBuffer<float>(chunk_rows_);
      s->row_min_next = AlignedBuffer<float>(chunk_rows_);
    }
  }
  if (column_steps_ > 0) s->column_counters = std::make_unique<std::atomic<int>[]>(2 * column_steps_);
  return s;
}

std::unique_ptr<NativeMlp::Scratch> NativeMlp::BorrowScratch() const {
  for (auto& place : free_scratch_)
    if (place.load(std::memory_order_relaxed) != nullptr)
      if (Scratch* s = place.exchange(nullptr, std::memory_order_acquire)) return std::unique_ptr<Scratch>(s);
  return NewScratch();
}

void NativeMlp::ReturnScratch(std::unique_ptr<Scratch> scratch) const {
  for (auto& place : free_scratch_) {
    Scratch* empty = nullptr;
    if (place.load(std::memory_order_relaxed) == nullptr &&
        place.compare_exchange_strong(empty, scratch.get(), std::memory_order_release, std::memory_order_relaxed)) {
      scratch.release();
      return;
    }
  }
}

void NativeMlp::QuantizeInput(const Layer& L, const float* x, int64_t ldx, int64_t rows, Scratch& s) const {
  if (L.dot || precision_ == Precision::kFp32) return;
  ops_->quantize(x, ldx, rows, L.in, L.k_pad, L.is_static ? &L.range : nullptr, s.q.data(), q_ld_,
                 s.row_scale.data(), s.row_min.data());
}

void NativeMlp::RunLayer(const Layer& L, const float* x, int64_t ldx, int64_t rows, float* y, int64_t ldy,
                         const Columns& cols, const Scratch& s) const {
  const int c0 = cols.begin, n = cols.end - cols.begin;
  if (n <= 0) return;
  // c0 is a whole number of panels, so c0 * k is where its panel starts in the packed weights.
  const bool relu = L.activation == Activation::kRelu;
  if (L.dot) {
    ops_->dot_fp32(x, ldx, rows, L.in, L.w_fp32.data() + int64_t{c0} * L.in, n, L.bias.data() + c0, relu, y + c0, ldy);
  } else if (precision_ == Precision::kFp32) {
    ops_->gemm_fp32(x, ldx, rows, L.in, L.w_fp32.data() + int64_t{c0} * L.in, n, L.bias.data() + c0, relu, y + c0,
                    ldy);
  } else {
    const Int8Epilogue e{s.row_scale.data(), s.row_min.data(), L.w_scale.data() + c0, L.w_sum.data() + c0,
                         L.bias.data() + c0, relu, L.is_static ? &L.range : nullptr};
    ops_->gemm_int8(s.q.data(), q_ld_, rows, L.k_pad, L.w_int8.data() + int64_t{c0} * L.k_pad, n, e, y + c0, ldy);
    if (L.is_static)  // the rows the uniform epilogue did not poison (Int8Epilogue::uniform)
      for (int64_t r = 0; r < rows; ++r)
        if (std::isnan(s.row_scale.data()[r])) std::fill_n(y + r * ldy + c0, n, std::numeric_limits<float>::quiet_NaN());
  }
  ApplyActivation(L.activation, y + c0, rows, n, ldy);
}

void NativeMlp::RequantizeLayer(const Layer& L, const Layer& next, int64_t rows, Scratch& s) const {
  std::fill_n(s.row_scale_next.data(), rows, next.range.scale);  // NaN for rows the layer poisons
  std::fill_n(s.row_min_next.data(), rows, next.range.min);
  const Int8Epilogue e{s.row_scale.data(), s.row_min.data(), L.w_scale.data(), L.w_sum.data(), L.bias.data(),
                       L.activation == Activation::kRelu, &L.range};  // requantizes: L is static
  const Requantize out{&next.range, next.k_pad, s.q_next.data(), q_ld_, s.row_scale_next.data()};
  ops_->gemm_int8_requantize(s.q.data(), q_ld_, rows, L.k_pad, L.w_int8.data(), L.out, e, out);
  for (int64_t r = 0; r < rows; ++r)
    if (std::isnan(s.row_scale_next.data()[r]) || std::isnan(s.row_scale.data()[r])) {  // as Quantize leaves it
      s.row_scale_next.data()[r] = std::numeric_limits<float>::quiet_NaN();
      s.row_min_next.data()[r] = 0.0f;
      std::memset(s.q_next.data() + r * q_ld_, 0, static_cast<size_t>(next.k_pad));
    }
  std::swap(s.q, s.q_next);
  std::swap(s.row_scale, s.row_scale_next);
  std::swap(s.row_min, s.row_min_next);
}

NativeMlp::Columns NativeMlp::UnitColumns(const Layer& L, int unit, int units) const {
  const int width = L.dot ? 1 : precision_ == Precision::kFp32 ? ops_->fp32_panel : ops_->i8_panel;
  const int panels = (L.out + width - 1) / width;
  return {std::min(L.out, panels * unit / units * width), std::min(L.out, panels * (unit + 1) / units * width)};
}

void NativeMlp::RunRows(const float* x, int64_t rows, float* out, Scratch& s, ColumnWork* shared) const {
  float* act[2] = {shared ? shared->act[0] : s.act[0].data(), shared ? shared->act[1] : s.act[1].data()};
  int step = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows_) {
    const int64_t n = std::min(chunk_rows_, rows - r0);
    const float* cur = x + r0 * in_features_;
    int64_t ldx = in_features_;
    bool input_ready = false;  // s.q already holds this layer's input (requantised by the one before)
    for (size_t li = 0; li < layers_.size(); ++li, ++step) {
      const Layer& L = layers_[li];
      const bool last = li + 1 == layers_.size();
      float* dst = last ? out + r0 * out_features_ : act[li % 2];
      const int64_t ldd = last ? L.out : act_ld_;
      if (shared == nullptr) {
        if (!input_ready) QuantizeInput(L, cur, ldx, n, s);
        input_ready = L.requantizes;
        if (L.requantizes) {
          RequantizeLayer(L, layers_[li + 1], n, s);
          continue;  // cur stays stale: the next layer is int8 and not a dot, so it reads only s.q
        }
        RunLayer(L, cur, ldx, n, dst, ldd, Columns{0, L.out}, s);
      } else {
        bool quantized = false;
        for (int u; (u = shared->claimed[step].fetch_add(1, std::memory_order_relaxed)) < shared->units;) {
          if (!quantized) QuantizeInput(L, cur, ldx, n, s);  // the same bits in every thread
          quantized = true;
          RunLayer(L, cur, ldx, n, dst, ldd, UnitColumns(L, u, shared->units), s);
          shared->done[step].fetch_add(1, std::memory_order_release);
        }
        const std::atomic<int>& done = shared->done[step];
        while (!SpinUntil([&] { return done.load(std::memory_order_acquire) == shared->units; }, kSpin)) {
        }
      }
      cur = dst;
      ldx = ldd;
    }
  }
}

void NativeMlp::Forward(const float* x, int64_t rows, float* out) const {
  if (rows <= 0) return;
  const double work = static_cast<double>(rows) * static_cast<double>(macs_per_row_);
  const int parts = static_cast<int>(std::min<double>(num_threads_, work / kMinMacsPerThread));
  // Borrow one scratch slot per part; slots come back to the pool when this call ends.
  std::unique_ptr<Scratch> slots[kMaxThreads];
  const int used = std::max(1, parts);
  for (int i = 0; i < used; ++i) slots[i] = BorrowScratch();
  bool ran = false;  // by the pool; otherwise (one part, or the pool busy) by this thread alone
  std::atomic<int> next{0};  // the next part (row split) or seat (column split) to take
  if (used > 1 && pool_ && rows < used * kMinRowsPerPart) {
    // Few rows: the threads share out each layer's outputs for all the rows, so each streams
    // only its share of the weights (which then fit its own core's cache).
    const int64_t steps = (rows + chunk_rows_ - 1) / chunk_rows_ * static_cast<int64_t>(layers_.size());
    std::atomic<int>* counters = slots[0]->column_counters.get();
    for (int64_t i = 0; i < 2 * steps; ++i) counters[i].store(0, std::memory_order_relaxed);  // published by TryRun
    ColumnWork shared{2 * used, counters, counters + steps, {slots[0]->act[0].data(), slots[0]->act[1].data()}};
    auto job = [&] { RunRows(x, rows, out, *slots[next.fetch_add(1, std::memory_order_relaxed)], &shared); };
    ran = pool_->TryRun(used - 1, job);
  } else if (used > 1 && pool_) {
    const int64_t per_part = RoundUp((rows + used - 1) / used, 4);
    auto job = [&] {
      for (int part; (part = next.fetch_add(1, std::memory_order_relaxed)) < used;) {
        const int64_t r0 = std::min(rows, part * per_part);
        const int64_t n = std::min(per_part, rows - r0);
        if (n > 0) RunRows(x + r0 * in_features_, n, out + r0 * out_features_, *slots[part], nullptr);
      }
    };
    ran = pool_->TryRun(used - 1, job);
  }
  if (!ran) RunRows(x, rows, out, *slots[0], nullptr);
  for (int i = 0; i < used; ++i) ReturnScratch(std::move(slots[i]));
}

std::optional<double> Int8PeakMacsPerSecond(CpuLevel level) {
  const auto loop = OpsFor(level).int8_peak_loop;
  if (loop == nullptr) return std::nullopt;
  using Clock = std::chrono::steady_clock;
  const auto seconds = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
  int64_t iterations = 1000;
  for (;;) {  // grow a window to ~20 ms (the first also warms the vector units up)
    const auto start = Clock::now();
    loop(iterations);
    if (seconds(Clock::now() - start) >= 0.02) break;
    iterations *= 2;
  }
  double best = 0.0;
  for (int window = 0; window < 5; ++window) {
    const auto start = Clock::now();
    const int64_t macs = loop(iterations);
    best = std::max(best, static_cast<double>(macs) / seconds(Clock::now() - start));
  }
  return best;
}

}  // namespace vivace::kernels

extern "C" int vivace_native_mlp_forward(const void* model, const float* x, int64_t rows, float* out) {
  static_cast<const vivace::kernels::NativeMlp*>(model)->Forward(x, rows, out);
  return 0;
}

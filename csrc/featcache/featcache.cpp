#include "featcache/featcache.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <sstream>

#include <unistd.h>

namespace vivace {
namespace featcache {
namespace {

// Address space reserved for the read-only map. The writer grows the file as it fills;
// reserving far more than any store needs means readers never see MDB_MAP_RESIZED. Where
// the address space is smaller (an RLIMIT_AS, a sanitizer's layout), the reservation is
// halved until it fits, down to kMinReaderMapSize (LMDB itself maps at least the file).
constexpr size_t kReaderMapSize = size_t{1} << 40;
constexpr size_t kMinReaderMapSize = size_t{1} << 30;
constexpr unsigned kMaxDbs = 4096;
constexpr const char* kViewRecordFormat = "vivace-online-view/1";
constexpr size_t kSortedReadMin = 16;

std::string LmdbError(const std::string& what, int rc) { return what + ": " + mdb_strerror(rc); }

MDB_val Val(const std::string& s) { return MDB_val{s.size(), const_cast<char*>(s.data())}; }

int64_t NowMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Returns a pooled read transaction to its cache when the batch ends, even on error.
class TxnGuard {
 public:
  explicit TxnGuard(FeatureCache& cache) : cache_(cache), txn_(cache.AcquireTxn()) {}
  ~TxnGuard() { cache_.ReleaseTxn(txn_); }
  TxnGuard(const TxnGuard&) = delete;
  TxnGuard& operator=(const TxnGuard&) = delete;
  MDB_txn* get() const { return txn_; }

 private:
  FeatureCache& cache_;
  MDB_txn* txn_;
};

}  // namespace

std::shared_ptr<FeatureCache> FeatureCache::Open(const std::string& path, size_t cache_capacity) {
  // One environment per store per process, kept for the process's lifetime: LMDB's
  // locks are per process, and closing any handle on a store drops them for all.
  static std::mutex registry_mutex;
  static std::unordered_map<std::string, std::shared_ptr<FeatureCache>> registry;
  std::lock_guard<std::mutex> lock(registry_mutex);
  if (auto existing = registry[path]) return existing;
  std::shared_ptr<FeatureCache> cache(new FeatureCache(path, cache_capacity));
  registry[path] = cache;
  return cache;
}

FeatureCache::FeatureCache(std::string path, size_t cache_capacity)
    : path_(std::move(path)), cache_capacity_(cache_capacity) {
  int rc = ENOMEM;
  for (size_t map_size = kReaderMapSize; rc == ENOMEM && map_size >= kMinReaderMapSize; map_size /= 2) {
    if (env_ != nullptr) mdb_env_close(env_);  // a failed open leaves the environment unusable
    env_ = nullptr;
    rc = mdb_env_create(&env_);
    if (rc != 0) throw FeatureCacheError(LmdbError("mdb_env_create", rc));
    mdb_env_set_maxdbs(env_, kMaxDbs);
    mdb_env_set_mapsize(env_, map_size);
    // NOTLS: pooled read transactions are not tied to the thread that began them.
    rc = mdb_env_open(env_, path_.c_str(), MDB_RDONLY | MDB_NOTLS | MDB_NORDAHEAD, 0644);
  }
  if (rc != 0) {
    mdb_env_close(env_);
    env_ = nullptr;
    if (rc == ENOENT)
      throw FeatureCacheError("no online store at " + path_ + ": run `vivace features materialize`");
    throw FeatureCacheError(LmdbError("cannot open the online store at " + path_, rc));
  }
  MDB_txn* txn = nullptr;
  rc = mdb_txn_begin(env_, nullptr, MDB_RDONLY, &txn);
  if (rc == 0) rc = mdb_dbi_open(txn, "meta", 0, &meta_dbi_);
  std::string version;
  if (rc == 0) {
    const std::string version_key = "schema_version";
    MDB_val key = Val(version_key), value;
    if (mdb_get(txn, meta_dbi_, &key, &value) == 0)
      version.assign(static_cast<const char*>(value.mv_data), value.mv_size);
    rc = mdb_txn_commit(txn);  // a committed read txn keeps the meta DB handle for the env
    txn = nullptr;
  }
  if (txn != nullptr) mdb_txn_abort(txn);
  std::string problem;
  if (rc == MDB_NOTFOUND)
    problem = "the online store at " + path_ + " holds no Vivace metadata: run `vivace features materialize`";
  else if (rc != 0)
    problem = LmdbError("cannot read the online store at " + path_, rc);
  else if (version != kSchemaVersion)
    problem = "the online store at " + path_ + " has schema version '" + version + "', this Vivace reads version " +
              kSchemaVersion + ": run `vivace features materialize --rebuild`";
  if (!problem.empty()) {
    mdb_env_close(env_);
    env_ = nullptr;
    throw FeatureCacheError(problem);
  }
}

FeatureCache::~FeatureCache() {
  {
    std::lock_guard<std::mutex> lock(index_mutex_);
    index_stopping_ = true;
  }
  index_wake_.notify_all();
  if (index_thread_.joinable()) {
    if (index_thread_pid_ == getpid())
      index_thread_.join();
    else
      index_thread_.detach();  // the parent's thread, absent from this forked child
  }
  for (MDB_txn* txn : pool_) mdb_txn_abort(txn);
  if (env_ != nullptr) mdb_env_close(env_);
}

MDB_txn* FeatureCache::AcquireTxn() {
  MDB_txn* txn = nullptr;
  {
    std::lock_guard<std::mutex> lock(pool_mutex_);
    if (!pool_.empty()) {
      txn = pool_.back();
      pool_.pop_back();
    }
  }
  int rc;
  if (txn != nullptr) {
    rc = mdb_txn_renew(txn);
    if (rc != 0) mdb_txn_abort(txn);
  } else {
    rc = mdb_txn_begin(env_, nullptr, MDB_RDONLY, &txn);
  }
  if (rc != 0) throw FeatureCacheError(LmdbError("cannot begin a read transaction on " + path_, rc));
  return txn;
}

void FeatureCache::ReleaseTxn(MDB_txn* txn) {
  mdb_txn_reset(txn);
  std::lock_guard<std::mutex> lock(pool_mutex_);
  pool_.push_back(txn);
}

uint64_t FeatureCache::ReadGeneration(MDB_txn* txn, MDB_dbi meta) {
  MDB_val key{10, const_cast<char*>("generation")}, value;
  if (mdb_get(txn, meta, &key, &value) != 0 || value.mv_size != 8) return 0;
  uint64_t generation;  // little-endian on disk; every platform Vivace builds for is too
  std::memcpy(&generation, value.mv_data, 8);
  return generation;
}

uint64_t FeatureCache::Generation() {
  TxnGuard txn(*this);
  return ReadGeneration(txn.get(), meta_dbi_);
}

MDB_dbi FeatureCache::OpenDbi(const std::string& name, unsigned flags) {
  std::lock_guard<std::mutex> lock(dbi_mutex_);
  auto it = dbis_.find(name);
  if (it != dbis_.end()) return it->second;
  MDB_txn* txn = nullptr;
  int rc = mdb_txn_begin(env_, nullptr, MDB_RDONLY, &txn);
  if (rc != 0) throw FeatureCacheError(LmdbError("cannot begin a read transaction on " + path_, rc));
  MDB_dbi dbi = 0;
  rc = mdb_dbi_open(txn, name.c_str(), flags, &dbi);
  if (rc != 0) {
    mdb_txn_abort(txn);
    throw FeatureCacheError(LmdbError("cannot open " + name + " in the online store at " + path_, rc));
  }
  rc = mdb_txn_commit(txn);
  if (rc != 0) throw FeatureCacheError(LmdbError("cannot open " + name + " in " + path_, rc));
  dbis_.emplace(name, dbi);
  return dbi;
}

ViewLayout FeatureCache::ReadLayout(MDB_txn* txn, const std::string& view) {
  const std::string record_key = "view:" + view;
  MDB_val key = Val(record_key), value;
  if (mdb_get(txn, meta_dbi_, &key, &value) != 0)
    throw FeatureCacheError("feature view '" + view + "' is not in the online store at " + path_ +
                            ": run `vivace features materialize`");
  std::istringstream in(std::string(static_cast<const char*>(value.mv_data), value.mv_size));
  std::string format, word;
  ViewLayout layout;
  layout.name = view;
  size_t count = 0;
  if (!std::getline(in, format) || format != kViewRecordFormat || !(in >> word >> layout.ttl_us) ||
      word != "ttl_us" || !(in >> word >> count) || word != "features")
    throw FeatureCacheError("corrupt layout record for view '" + view + "' in " + path_);
  in.ignore(1);
  for (size_t i = 0; i < count; ++i) {
    std::string feature;
    if (!std::getline(in, feature)) throw FeatureCacheError("truncated layout record for view '" + view + "'");
    layout.features.push_back(feature);
  }
  const size_t bitmap = (count + 7) / 8;
  layout.values_offset = 8 + (bitmap + 3) / 4 * 4;
  layout.row_size = layout.values_offset + 4 * count;
  layout.dbi = OpenDbi("v:" + view, MDB_INTEGERKEY);
  return layout;
}

bool FeatureCache::CacheGet(uint64_t generation, MDB_dbi dbi, int64_t key, uint8_t* row, size_t row_size) {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (generation != cache_generation_) return false;
  auto it = cache_index_.find(CacheKey{dbi, key});
  if (it == cache_index_.end()) return false;
  std::memcpy(row, cache_arena_.data() + it->second, row_size);
  return true;
}

void FeatureCache::CachePut(uint64_t generation, MDB_dbi dbi, int64_t key, const uint8_t* row, size_t row_size) {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (generation < cache_generation_) return;  // a batch still reading an older snapshot
  if (generation > cache_generation_ || cache_index_.size() >= cache_capacity_) {
    // A new materialization landed (or the cache is full): start over.
    cache_index_.clear();
    cache_arena_.clear();
    cache_generation_ = generation;
  }
  if (cache_index_.emplace(CacheKey{dbi, key}, cache_arena_.size()).second)
    cache_arena_.insert(cache_arena_.end(), row, row + row_size);
}

std::shared_ptr<const RowIndex> FeatureCache::RowIndexFor(MDB_txn* txn, const ViewLayout& layout) {
  const size_t txn_id = mdb_txn_id(txn);
  std::lock_guard<std::mutex> lock(index_mutex_);
  IndexState& state = indexes_[layout.dbi];
  if (state.index && state.index->txn_id == txn_id) return state.index;
  if (state.seen_txn != txn_id) {
    state.seen_txn = txn_id;
    state.seen_batches = 0;
    state.index.reset();  // of an older snapshot: no batch from now on can use it
  }
  if (++state.seen_batches < kIndexAfterBatches || state.building || index_stopping_) return nullptr;
  state.building = true;
  index_jobs_.emplace_back(layout, txn_id);
  if (!index_thread_.joinable() || index_thread_pid_ != getpid()) {
    if (index_thread_.joinable()) index_thread_.detach();  // forked: the parent's thread is not here
    index_thread_pid_ = getpid();
    index_thread_ = std::thread(&FeatureCache::IndexBuilder, this);
  }
  index_wake_.notify_one();
  return nullptr;
}

void FeatureCache::IndexBuilder() {
  std::unique_lock<std::mutex> lock(index_mutex_);
  for (;;) {
    index_wake_.wait(lock, [this] { return index_stopping_ || !index_jobs_.empty(); });
    if (index_stopping_) return;
    auto [layout, txn_id] = std::move(index_jobs_.front());
    index_jobs_.pop_front();
    lock.unlock();
    // Built in a snapshot of its own, kept only when it is the one the batches read.
    std::shared_ptr<const RowIndex> index;
    bool failed = false;
    try {
      TxnGuard txn(*this);
      if (mdb_txn_id(txn.get()) == txn_id) index = BuildRowIndex(txn.get(), layout);
      failed = index == nullptr && mdb_txn_id(txn.get()) == txn_id;
    } catch (const std::exception&) {
      failed = true;  // the batches' cursors report what is wrong, key by key
    }
    lock.lock();
    IndexState& state = indexes_[layout.dbi];
    state.building = false;
    if (state.seen_txn != txn_id) continue;  // a newer snapshot meanwhile: indexed once it settles
    if (failed)
      state.seen_batches = std::numeric_limits<int>::min();  // too large or odd: not for this snapshot
    else if (index != nullptr)
      state.index = std::move(index);
    else
      state.seen_batches = 0;  // the store moved on before the build began
  }
}

size_t FeatureCache::IndexedRows(const std::string& view) {
  MDB_dbi dbi;
  {
    std::lock_guard<std::mutex> lock(dbi_mutex_);
    auto it = dbis_.find("v:" + view);
    if (it == dbis_.end()) return 0;
    dbi = it->second;
  }
  std::lock_guard<std::mutex> lock(index_mutex_);
  auto it = indexes_.find(dbi);
  return it == indexes_.end() || !it->second.index ? 0 : it->second.index->rows;
}

std::shared_ptr<const RowIndex> FeatureCache::BuildRowIndex(MDB_txn* txn, const ViewLayout& layout) const {
  MDB_stat stat;
  int rc = mdb_stat(txn, layout.dbi, &stat);
  if (rc != 0) throw FeatureCacheError(LmdbError("cannot read the size of view '" + layout.name + "'", rc));
  if (stat.ms_entries > kMaxIndexedRows) return nullptr;
  auto index = std::make_shared<RowIndex>();
  index->txn_id = mdb_txn_id(txn);
  size_t slots = 16;
  index->shift = 60;
  while (slots < stat.ms_entries + stat.ms_entries / 2) {  // load factor at most 2/3
    slots *= 2;
    --index->shift;
  }
  index->slots.assign(slots, {0, nullptr});
  MDB_cursor* cursor = nullptr;
  rc = mdb_cursor_open(txn, layout.dbi, &cursor);
  if (rc != 0) throw FeatureCacheError(LmdbError("cannot open a cursor on view '" + layout.name + "'", rc));
  std::unique_ptr<MDB_cursor, void (*)(MDB_cursor*)> cursor_guard(cursor, mdb_cursor_close);
  MDB_val key, value;
  size_t rows = 0;
  for (rc = mdb_cursor_get(cursor, &key, &value, MDB_FIRST); rc == 0;
       rc = mdb_cursor_get(cursor, &key, &value, MDB_NEXT)) {
    // A key or row of another size is reported by the cursor path, key by key.
    if (key.mv_size != sizeof(int64_t) || value.mv_size != layout.row_size || ++rows > stat.ms_entries)
      return nullptr;
    int64_t k;
    std::memcpy(&k, key.mv_data, sizeof k);
    const size_t mask = slots - 1;
    size_t slot = index->Home(k);
    while (index->slots[slot].second != nullptr) slot = (slot + 1) & mask;
    index->slots[slot] = {k, static_cast<const uint8_t*>(value.mv_data)};
  }
  index->rows = rows;
  if (rc != MDB_NOTFOUND) throw FeatureCacheError(LmdbError("read of view '" + layout.name + "' failed", rc));
  return index;
}

FeatureLookup::FeatureLookup(std::shared_ptr<FeatureCache> cache,
                             std::vector<std::pair<std::string, std::string>> columns)
    : cache_(std::move(cache)), columns_(std::move(columns)) {
  if (columns_.empty()) throw FeatureCacheError("no features requested");
  TxnGuard txn(*cache_);
  plan_generation_ = FeatureCache::ReadGeneration(txn.get(), cache_->meta_dbi());
  plan_ = std::make_shared<const std::vector<ViewPlan>>(Resolve(txn.get()));
}

std::vector<FeatureLookup::ViewPlan> FeatureLookup::Resolve(MDB_txn* txn) const {
  std::vector<ViewPlan> plans;
  for (size_t out_col = 0; out_col < columns_.size(); ++out_col) {
    const auto& [view, feature] = columns_[out_col];
    ViewPlan* plan = nullptr;
    for (auto& p : plans)
      if (p.layout.name == view) plan = &p;
    if (plan == nullptr) {
      plans.push_back(ViewPlan{cache_->ReadLayout(txn, view), {}});
      plan = &plans.back();
    }
    const auto& names = plan->layout.features;
    size_t stored = 0;
    while (stored < names.size() && names[stored] != feature) ++stored;
    if (stored == names.size()) {
      std::string known;
      for (const auto& n : names) known += (known.empty() ? "" : ", ") + n;
      throw FeatureCacheError("unknown feature '" + feature + "' in online view '" + view +
                              "' (online features: " + known + ")");
    }
    plan->picks.emplace_back(stored, out_col);
  }
  return plans;
}

void FeatureLookup::LookupInto(const int64_t* keys, size_t n, float* out, uint8_t* found, int64_t now_us) {
  const int64_t now = now_us == kNowFromClock ? NowMicros() : now_us;
  const size_t width = columns_.size();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  TxnGuard txn(*cache_);
  const uint64_t generation = FeatureCache::ReadGeneration(txn.get(), cache_->meta_dbi());

  // The plan (layouts, column picks) must match this snapshot's generation.
  std::shared_ptr<const std::vector<ViewPlan>> plan;
  {
    std::lock_guard<std::mutex> lock(plan_mutex_);
    if (generation == plan_generation_) plan = plan_;
  }
  if (!plan) {
    plan = std::make_shared<const std::vector<ViewPlan>>(Resolve(txn.get()));
    std::lock_guard<std::mutex> lock(plan_mutex_);
    if (generation > plan_generation_) {
      plan_ = plan;
      plan_generation_ = generation;
    }
  }

  const bool use_cache = cache_->cache_capacity() > 0;
  std::vector<uint8_t> row_copy;
  std::memset(found, 1, n);
  std::vector<std::pair<uint64_t, size_t>> by_key;
  for (const ViewPlan& view : *plan) {
    const ViewLayout& layout = view.layout;
    // Row i's values (or NaN when it is missing or stale) into the output.
    auto emit = [&](size_t i, const uint8_t* row) {
      float* out_row = out + i * width;
      int64_t event_us = 0;
      if (row != nullptr) std::memcpy(&event_us, row, 8);
      if (row == nullptr || (layout.ttl_us > 0 && event_us < now - layout.ttl_us)) {
        found[i] = 0;
        for (const auto& pick : view.picks) out_row[pick.second] = nan;
        return;
      }
      const uint8_t* nulls = row + 8;
      const uint8_t* values = row + layout.values_offset;
      for (const auto& [stored, out_col] : view.picks) {
        float v;
        std::memcpy(&v, values + 4 * stored, 4);
        out_row[out_col] = (nulls[stored / 8] >> (stored % 8)) & 1u ? nan : v;
      }
    };

    if (const std::shared_ptr<const RowIndex> index = cache_->RowIndexFor(txn.get(), layout)) {
      // In chunks: first every key's slot is prefetched, then every row, then the rows are
      // copied, so that the cache misses of a chunk overlap instead of queueing.
      constexpr size_t kChunk = 32;
      size_t home[kChunk];
      const uint8_t* rows[kChunk];
      for (size_t base = 0; base < n; base += kChunk) {
        const size_t m = std::min(kChunk, n - base);
        for (size_t j = 0; j < m; ++j) {
          home[j] = index->Home(keys[base + j]);
          __builtin_prefetch(&index->slots[home[j]]);
        }
        for (size_t j = 0; j < m; ++j) {
          rows[j] = index->Find(keys[base + j], home[j]);
          if (rows[j] != nullptr) {
            __builtin_prefetch(rows[j]);
            __builtin_prefetch(rows[j] + layout.row_size - 1);
          }
        }
        for (size_t j = 0; j < m; ++j) emit(base + j, rows[j]);
      }
      continue;
    }

    // Through a cursor. Larger batches are read in key order (LMDB's integer-key order:
    // unsigned), so that neighbouring keys hit the cursor's current leaf page instead of
    // descending the tree.
    if (n >= kSortedReadMin && by_key.empty()) {
      by_key.reserve(n);
      for (size_t i = 0; i < n; ++i) by_key.emplace_back(static_cast<uint64_t>(keys[i]), i);
      std::sort(by_key.begin(), by_key.end());
    }
    row_copy.resize(layout.row_size);
    // One cursor per view and batch: a cursor lookup skips the per-call cursor setup of
    // mdb_get, and starts from the current leaf page when the next key lies on it.
    MDB_cursor* cursor = nullptr;
    int rc_open = mdb_cursor_open(txn.get(), layout.dbi, &cursor);
    if (rc_open != 0) throw FeatureCacheError(LmdbError("cannot open a cursor on view '" + layout.name + "'", rc_open));
    std::unique_ptr<MDB_cursor, void (*)(MDB_cursor*)> cursor_guard(cursor, mdb_cursor_close);
    for (size_t j = 0; j < n; ++j) {
      const size_t i = by_key.empty() ? j : by_key[j].second;
      int64_t key_value = keys[i];
      const uint8_t* row = nullptr;
      if (use_cache && cache_->CacheGet(generation, layout.dbi, key_value, row_copy.data(), layout.row_size)) {
        row = row_copy.data();
      } else {
        MDB_val key{sizeof(key_value), &key_value}, value;
        const int rc = mdb_cursor_get(cursor, &key, &value, MDB_SET);
        if (rc == 0) {
          if (value.mv_size != layout.row_size)
            throw FeatureCacheError("corrupt row for key " + std::to_string(key_value) + " in view '" +
                                    layout.name + "': " + std::to_string(value.mv_size) + " bytes, expected " +
                                    std::to_string(layout.row_size));
          row = static_cast<const uint8_t*>(value.mv_data);
          if (use_cache) cache_->CachePut(generation, layout.dbi, key_value, row, layout.row_size);
        } else if (rc != MDB_NOTFOUND) {
          throw FeatureCacheError(LmdbError("read of view '" + layout.name + "' failed", rc));
        }
      }
      emit(i, row);
    }
  }
}

}  // namespace featcache
}  // namespace vivace

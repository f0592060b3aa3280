// The online feature cache: C++ reader of the LMDB online store that `vivace features
// materialize` writes (layout in features/online.py, schema version 1).
//
// One FeatureCache per store path per process (FeatureCache::Open) holds the read-only
// LMDB environment and a pool of read transactions that are reset and renewed, never
// re-created. A FeatureLookup binds a list of (view, feature) columns once; LookupInto
// then turns a batch of int64 entity keys into a dense row-major [n, F] float32 block and
// a found mask, without Python and safe to call from several threads at once.
//
// Each batch reads the store's generation number in its own snapshot: when a new
// materialization has landed, the optional in-process row cache is dropped and the view
// layouts are re-read, so a batch never mixes two materializations. A view whose snapshot
// stays the same is read through a RowIndex of it.
#pragma once

#include <lmdb.h>

#include <sys/types.h>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace vivace {
namespace featcache {

// Raised for a missing store, another schema version, unknown views/features, corrupt rows.
class FeatureCacheError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr int64_t kNowFromClock = std::numeric_limits<int64_t>::min();
inline constexpr const char* kSchemaVersion = "1";

// How one view's rows are laid out, parsed from its "view:<name>" meta record.
struct ViewLayout {
  std::string name;
  MDB_dbi dbi = 0;
  int64_t ttl_us = 0;  // 0: never stale
  std::vector<std::string> features;
  size_t values_offset = 0;  // 8 (event time) + null bitmap padded to 4 bytes
  size_t row_size = 0;
};

// Every row of one view in one LMDB snapshot, by key: an open-addressing table of (key,
// address of the row in the map). A batch then costs one probe and one row access per
// key, both prefetched across the batch, instead of a B-tree descent per key whose leaf
// pages miss the CPU caches. Valid only for batches that read the same snapshot (same
// transaction id): LMDB keeps a snapshot's pages while a reader holds it, and any write
// makes a new snapshot.
struct RowIndex {
  size_t txn_id = 0;
  size_t rows = 0;
  int shift = 64;  // a key's home slot: (key * golden ratio) >> shift
  std::vector<std::pair<int64_t, const uint8_t*>> slots;  // row nullptr: an empty slot

  size_t Home(int64_t key) const {
    return static_cast<size_t>((static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull) >> shift);
  }
  // The row of `key` (nullptr: not in the view), probing from its home slot.
  const uint8_t* Find(int64_t key, size_t slot) const {
    const size_t mask = slots.size() - 1;
    for (;; slot = (slot + 1) & mask) {
      const auto& [k, row] = slots[slot];
      if (row == nullptr || k == key) return row;
    }
  }
};

class FeatureCache {
 public:
  // The process-wide cache of the store at `path` (the folder holding data.mdb).
  // `cache_capacity` > 0 keeps up to that many rows in memory (set by the first opener).
  static std::shared_ptr<FeatureCache> Open(const std::string& path, size_t cache_capacity = 0);
  ~FeatureCache();
  FeatureCache(const FeatureCache&) = delete;
  FeatureCache& operator=(const FeatureCache&) = delete;

  const std::string& path() const { return path_; }
  size_t cache_capacity() const { return cache_capacity_; }
  uint64_t Generation();  // of the latest committed materialization
  // Layout of a view in the snapshot `txn` sees (opens its DB handle on first use).
  ViewLayout ReadLayout(MDB_txn* txn, const std::string& view);

  // Row cache (used by FeatureLookup): copies a row out, or stores one. `generation`
  // is the snapshot's; a new generation empties the cache first.
  bool CacheGet(uint64_t generation, MDB_dbi dbi, int64_t key, uint8_t* row, size_t row_size);
  void CachePut(uint64_t generation, MDB_dbi dbi, int64_t key, const uint8_t* row, size_t row_size);

  // The row index of a view for the snapshot `txn` reads, or null (read through a cursor)
  // while there is none. A snapshot that batches have read kIndexAfterBatches times is
  // indexed by a background thread (a million rows take ~0.1 s, which no batch should
  // wait for); a store written all the time is read through cursors, and so is a view of
  // more than kMaxIndexedRows rows.
  std::shared_ptr<const RowIndex> RowIndexFor(MDB_txn* txn, const ViewLayout& layout);
  static constexpr int kIndexAfterBatches = 4;
  // How many rows of a view the current row index holds (0: none); for tests and stats.
  size_t IndexedRows(const std::string& view);
  static constexpr size_t kMaxIndexedRows = size_t{2} << 20;  // 32 bytes each at most

  MDB_txn* AcquireTxn();
  void ReleaseTxn(MDB_txn* txn);
  static uint64_t ReadGeneration(MDB_txn* txn, MDB_dbi meta);
  MDB_dbi meta_dbi() const { return meta_dbi_; }

 private:
  FeatureCache(std::string path, size_t cache_capacity);
  MDB_dbi OpenDbi(const std::string& name, unsigned flags);

  std::string path_;
  size_t cache_capacity_;
  MDB_env* env_ = nullptr;
  MDB_dbi meta_dbi_ = 0;
  std::mutex dbi_mutex_;  // mdb_dbi_open must not run concurrently
  std::unordered_map<std::string, MDB_dbi> dbis_;
  std::mutex pool_mutex_;
  std::vector<MDB_txn*> pool_;

  struct CacheKey {
    MDB_dbi dbi;
    int64_t key;
    bool operator==(const CacheKey& o) const { return dbi == o.dbi && key == o.key; }
  };
  struct CacheKeyHash {
    size_t operator()(const CacheKey& k) const {
      return std::hash<int64_t>()(k.key) ^ (static_cast<size_t>(k.dbi) << 48);
    }
  };
  struct IndexState {
    std::shared_ptr<const RowIndex> index;
    size_t seen_txn = 0;  // the snapshot batches read last, and how many times in a row
    int seen_batches = 0;
    bool building = false;
  };
  std::shared_ptr<const RowIndex> BuildRowIndex(MDB_txn* txn, const ViewLayout& layout) const;
  void IndexBuilder();  // the background thread: builds the queued views' indexes
  std::mutex index_mutex_;
  std::unordered_map<MDB_dbi, IndexState> indexes_;
  std::deque<std::pair<ViewLayout, size_t>> index_jobs_;  // (view, snapshot txn id)
  std::condition_variable index_wake_;
  std::thread index_thread_;  // started by the first job
  pid_t index_thread_pid_ = 0;  // a forked child has no such thread
  bool index_stopping_ = false;

  std::mutex cache_mutex_;
  uint64_t cache_generation_ = 0;
  std::unordered_map<CacheKey, size_t, CacheKeyHash> cache_index_;  // -> offset in arena
  std::vector<uint8_t> cache_arena_;
};

class FeatureLookup {
 public:
  // `columns`: (view, feature) pairs, in output column order.
  FeatureLookup(std::shared_ptr<FeatureCache> cache,
                std::vector<std::pair<std::string, std::string>> columns);

  size_t num_features() const { return columns_.size(); }
  const std::vector<std::pair<std::string, std::string>>& columns() const { return columns_; }

  // The serving batch path: keys[n] -> out[n * num_features()] (row-major float32) and
  // found[n] (1 when the entity has a fresh row in every view, else 0). Missing, stale or
  // null values are NaN. now_us: wall clock in µs since the epoch for the TTL check
  // (kNowFromClock = read the system clock). Thread-safe; touches no Python object.
  void LookupInto(const int64_t* keys, size_t n, float* out, uint8_t* found,
                  int64_t now_us = kNowFromClock);

 private:
  struct ViewPlan {
    ViewLayout layout;
    std::vector<std::pair<size_t, size_t>> picks;  // (stored column, output column)
  };
  std::vector<ViewPlan> Resolve(MDB_txn* txn) const;

  std::shared_ptr<FeatureCache> cache_;
  std::vector<std::pair<std::string, std::string>> columns_;
  std::mutex plan_mutex_;
  uint64_t plan_generation_ = 0;
  std::shared_ptr<const std::vector<ViewPlan>> plan_;
};

}  // namespace featcache
}  // namespace vivace

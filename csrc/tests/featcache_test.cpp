// Stress test of the online feature cache reader (csrc/featcache) for the sanitizer builds
// (ASan/UBSan, TSan), run by tests/test_native_sanitizers.py.
//
// A writer process (forked before any thread starts: LMDB allows one environment per store
// per process, and a second one in the same process would re-initialize the lock file under
// the first) writes an online store of 20,000 rows in the layout of features/online.py, then
// rewrites every row three times, one write transaction (and one generation) each. Meanwhile
// three reader threads share one FeatureLookup and check every answer of every batch: the
// found mask, the values and NaNs, that a batch reflects exactly one materialization, that a
// thread never goes back to an older one, and that a batch begun after a commit sees it. The
// row index (FeatureCache::RowIndexFor) is built for each snapshot the readers settle on and
// must never serve another snapshot. Exits non-zero on any wrong answer.
#include <dirent.h>
#include <lmdb.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "featcache/featcache.h"

using vivace::featcache::FeatureCache;
using vivace::featcache::FeatureCacheError;
using vivace::featcache::FeatureLookup;

namespace {

std::atomic<int> failures{0};

void Fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void Fail(const char* fmt, ...) {
  if (failures.fetch_add(1) >= 40) return;  // the first ones tell the story
  char message[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(message, sizeof message, fmt, args);
  va_end(args);
  std::fprintf(stderr, "featcache_test: %s\n", message);
}

void Expect(bool ok, const char* what, int line) {
  if (!ok) Fail("line %d: %s", line, what);
}
#define EXPECT(x) Expect((x), #x, __LINE__)

// ---- The store: layout of features/online.py, schema version 1 ----------------------------

constexpr int64_t kRows = 20000;  // keys 0 .. kRows-1
constexpr size_t kFeatures = 3;
constexpr size_t kValuesOffset = 12;  // int64 event time, 1-byte null bitmap padded to 4
constexpr size_t kRowSize = kValuesOffset + 4 * kFeatures;
constexpr int kOffsets[] = {1000, 2000, 3000};  // the rewrites, after offset 0
constexpr double kWaitSeconds = 30;  // bound of every wait for the readers or the index

// f1 of these keys is null: the reader must answer NaN whatever the stored value.
bool NullF1(int64_t key) { return key % 101 == 50; }

float Expected(int64_t key, size_t feature, int offset) {
  return static_cast<float>(static_cast<double>(key) + static_cast<double>(feature) / 10.0 + offset);
}

const char kViewRecord[] = "vivace-online-view/1\nttl_us 0\nfeatures 3\nf0\nf1\nf2\n";

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void SleepMs(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

// Polls `done` until it holds or `seconds` pass.
template <typename Pred>
bool WaitFor(Pred done, double seconds = kWaitSeconds) {
  const double deadline = Now() + seconds;
  while (!done()) {
    if (Now() > deadline) return false;
    SleepMs(1);
  }
  return true;
}

// ---- The writer process -----------------------------------------------------------------

int Put(MDB_txn* txn, MDB_dbi dbi, const void* key, size_t key_size, const void* value, size_t value_size) {
  MDB_val k{key_size, const_cast<void*>(key)};
  MDB_val v{value_size, const_cast<void*>(value)};
  return mdb_put(txn, dbi, &k, &v, 0);
}

// One materialization: every row with `offset`, and the generation, in one transaction.
int WriteGeneration(MDB_env* env, int offset, uint64_t generation) {
  MDB_txn* txn = nullptr;
  int rc = mdb_txn_begin(env, nullptr, 0, &txn);
  if (rc != 0) return rc;
  MDB_dbi meta = 0, rows = 0;
  rc = mdb_dbi_open(txn, "meta", MDB_CREATE, &meta);
  if (rc == 0) rc = mdb_dbi_open(txn, "v:stats", MDB_CREATE | MDB_INTEGERKEY, &rows);
  if (rc == 0) rc = Put(txn, meta, "schema_version", 14, "1", 1);
  if (rc == 0) rc = Put(txn, meta, "view:stats", 10, kViewRecord, sizeof kViewRecord - 1);
  uint8_t row[kRowSize];
  for (int64_t key = 0; rc == 0 && key < kRows; ++key) {
    std::memset(row, 0, sizeof row);
    const int64_t event_us = 1700000000000000 + key;
    std::memcpy(row, &event_us, 8);
    for (size_t j = 0; j < kFeatures; ++j) {
      float v = Expected(key, j, offset);
      if (j == 1 && NullF1(key)) {
        row[8] = static_cast<uint8_t>(row[8] | 2u);  // null bit of f1
        v = -7.0f;  // not NaN: the bitmap alone must make it null
      }
      std::memcpy(row + kValuesOffset + 4 * j, &v, 4);
    }
    rc = Put(txn, rows, &key, sizeof key, row, sizeof row);
  }
  uint8_t gen[8];
  for (int i = 0; i < 8; ++i) gen[i] = static_cast<uint8_t>(generation >> (8 * i));  // little-endian
  if (rc == 0) rc = Put(txn, meta, "generation", 10, gen, sizeof gen);
  if (rc != 0) {
    mdb_txn_abort(txn);
    return rc;
  }
  return mdb_txn_commit(txn);
}

// The child: one write environment of its own. Commands on `cmd`, one byte each: 'I' writes
// the store (offset 0, generation 1), '1'..'3' rewrite it with kOffsets[i] (generation i+2);
// each is answered on `ack` once committed ('+', or '-' on an error). EOF or 'Q' ends it.
int WriterMain(const std::string& path, int cmd, int ack) {
  MDB_env* env = nullptr;
  int rc = mdb_env_create(&env);
  if (rc == 0) rc = mdb_env_set_maxdbs(env, 16);
  if (rc == 0) rc = mdb_env_set_mapsize(env, size_t{256} << 20);
  if (rc == 0) rc = mdb_env_open(env, path.c_str(), 0, 0644);
  if (rc != 0) {
    std::fprintf(stderr, "featcache_test: writer cannot open %s: %s\n", path.c_str(), mdb_strerror(rc));
    return 1;
  }
  int status = 0;
  for (;;) {
    char c = 0;
    const ssize_t got = read(cmd, &c, 1);
    if (got < 0 && errno == EINTR) continue;
    if (got != 1 || c == 'Q') break;
    if (c == 'I')
      rc = WriteGeneration(env, 0, 1);
    else if (c >= '1' && c <= '3')
      rc = WriteGeneration(env, kOffsets[c - '1'], static_cast<uint64_t>(c - '1') + 2);
    else
      rc = EINVAL;
    if (rc != 0) {
      std::fprintf(stderr, "featcache_test: writer command '%c': %s\n", c, mdb_strerror(rc));
      status = 1;
    }
    const char answer = rc == 0 ? '+' : '-';
    if (write(ack, &answer, 1) != 1) break;
  }
  mdb_env_close(env);
  return status;
}

struct Writer {
  pid_t pid = -1;
  int cmd = -1;  // to the child
  int ack = -1;  // from the child

  // Sends one command and waits (bounded) for the child's commit.
  bool Run(char c) {
    if (write(cmd, &c, 1) != 1) {
      Fail("cannot send command '%c' to the writer: %s", c, std::strerror(errno));
      return false;
    }
    pollfd p{ack, POLLIN, 0};
    int ready;
    do ready = poll(&p, 1, static_cast<int>(kWaitSeconds * 1000));
    while (ready < 0 && errno == EINTR);
    char answer = 0;
    if (ready != 1 || read(ack, &answer, 1) != 1 || answer != '+') {
      Fail("writer command '%c' failed (%s)", c, ready == 1 ? "error or exit" : "timeout");
      return false;
    }
    return true;
  }

  void Finish() {
    if (pid <= 0) return;
    const char quit = 'Q';
    if (write(cmd, &quit, 1) != 1) Fail("cannot stop the writer");
    close(cmd);
    close(ack);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) Fail("writer process ended with status %d", status);
    pid = -1;
  }
};

// ---- Batches and their answers -----------------------------------------------------------

// Keys that the store never holds.
int64_t MissingKey(std::mt19937_64& rng) {
  static const int64_t fixed[] = {-1,
                                  kRows,
                                  kRows + 1,
                                  std::numeric_limits<int64_t>::min(),
                                  std::numeric_limits<int64_t>::max(),
                                  std::numeric_limits<int64_t>::min() + 1,
                                  int64_t{1} << 32,
                                  -(int64_t{1} << 40)};
  const size_t pick = rng() % (std::size(fixed) + 1);
  if (pick < std::size(fixed)) return fixed[pick];
  for (;;) {
    const int64_t k = static_cast<int64_t>(rng());
    if (k < 0 || k >= kRows) return k;
  }
}

std::vector<int64_t> RandomBatch(std::mt19937_64& rng, size_t n) {
  std::vector<int64_t> keys(n);
  for (auto& k : keys) k = rng() % 20 == 0 ? MissingKey(rng) : static_cast<int64_t>(rng() % kRows);
  return keys;
}

bool IsNan(float v) { return std::isnan(v); }

// Checks the answers of one batch of the (f0, f1, f2) lookup. Returns the offset that all
// its rows show, -1 when it holds no stored key, or -2 after a failure.
int CheckBatch(const std::vector<int64_t>& keys, const float* out, const uint8_t* found, const char* where) {
  int batch_offset = -1;
  for (size_t i = 0; i < keys.size(); ++i) {
    const int64_t key = keys[i];
    const float* row = out + i * kFeatures;
    if (key < 0 || key >= kRows) {
      if (found[i] != 0 || !IsNan(row[0]) || !IsNan(row[1]) || !IsNan(row[2])) {
        Fail("%s: missing key %lld: found=%d values %g %g %g, expected not found and NaN", where,
             static_cast<long long>(key), found[i], static_cast<double>(row[0]), static_cast<double>(row[1]),
             static_cast<double>(row[2]));
        return -2;
      }
      continue;
    }
    if (found[i] != 1) {
      Fail("%s: key %lld (batch of %zu, position %zu) not found", where, static_cast<long long>(key), keys.size(), i);
      return -2;
    }
    const double from_f0 = static_cast<double>(row[0]) - static_cast<double>(key);
    const int offset = static_cast<int>(std::lround(from_f0 / 1000.0)) * 1000;
    if (offset < 0 || offset > kOffsets[std::size(kOffsets) - 1] || std::fabs(from_f0 - offset) > 1e-3) {
      Fail("%s: key %lld: f0 = %.4f is no materialization's value", where, static_cast<long long>(key),
           static_cast<double>(row[0]));
      return -2;
    }
    if (batch_offset >= 0 && offset != batch_offset) {
      Fail("%s: batch of %zu mixes materializations: offset %d and, at key %lld (position %zu), offset %d", where,
           keys.size(), batch_offset, static_cast<long long>(key), i, offset);
      return -2;
    }
    batch_offset = offset;
    for (size_t j = 0; j < kFeatures; ++j) {
      const bool null = j == 1 && NullF1(key);
      const float want = Expected(key, j, offset);
      if (null ? !IsNan(row[j]) : row[j] != want) {
        Fail("%s: key %lld f%zu = %.4f, expected %.4f", where, static_cast<long long>(key), j,
             static_cast<double>(row[j]), null ? std::nan("") : static_cast<double>(want));
        return -2;
      }
    }
  }
  return batch_offset;
}

// Runs one batch through `lookup` into exactly sized buffers (ASan sees any overrun).
int LookupAndCheck(FeatureLookup& lookup, const std::vector<int64_t>& keys, const char* where) {
  std::unique_ptr<float[]> out(new float[keys.size() * kFeatures + 1]);
  std::unique_ptr<uint8_t[]> found(new uint8_t[keys.size() + 1]);
  out[keys.size() * kFeatures] = 12345.0f;  // canaries: nothing past n rows is written
  found[keys.size()] = 77;
  lookup.LookupInto(keys.data(), keys.size(), out.get(), found.get());
  if (out[keys.size() * kFeatures] != 12345.0f || found[keys.size()] != 77) {
    Fail("%s: LookupInto wrote past the batch of %zu", where, keys.size());
    return -2;
  }
  return CheckBatch(keys, out.get(), found.get(), where);
}

std::vector<int64_t> AllKeysAndMissing(std::mt19937_64& rng) {
  std::vector<int64_t> keys;
  for (int64_t k = 0; k < kRows; ++k) keys.push_back(k);
  for (int i = 0; i < 64; ++i) keys.push_back(MissingKey(rng));
  std::shuffle(keys.begin(), keys.end(), rng);
  return keys;
}

// ---- The readers ------------------------------------------------------------------------

constexpr int kReaders = 3;
constexpr size_t kBatchSizes[] = {1, 7, 100, 1000};

struct Shared {
  FeatureLookup* lookup = nullptr;
  FeatureCache* cache = nullptr;
  std::atomic<bool> stop{false};
  std::atomic<int> committed{0};  // offset of the latest commit the writer has acknowledged
  std::atomic<int> requested{0};  // offset of the latest commit asked for (maybe not yet done)
  std::atomic<int> last_offset[kReaders];
  std::atomic<long> batches[kReaders];
  std::atomic<long> indexed_seen{0};  // IndexedRows == kRows, as seen by the readers
};

void Reader(Shared& s, int id) {
  std::mt19937_64 rng(0x5eedf00dULL + static_cast<uint64_t>(id));
  int previous = 0;
  char where[64];
  std::snprintf(where, sizeof where, "reader %d", id);
  try {
    while (!s.stop.load()) {
      const size_t n = kBatchSizes[rng() % std::size(kBatchSizes)];
      const std::vector<int64_t> keys = RandomBatch(rng, n);
      const int at_least = s.committed.load();
      const int offset = LookupAndCheck(*s.lookup, keys, where);
      const int at_most = s.requested.load();
      if (offset == -2) break;
      if (offset >= 0) {
        if (offset < at_least || offset > at_most) {
          Fail("%s: batch shows offset %d, but %d was committed before it began and %d is the newest asked for",
               where, offset, at_least, at_most);
          break;
        }
        if (offset < previous) {
          Fail("%s: went back from offset %d to %d", where, previous, offset);
          break;
        }
        previous = offset;
        s.last_offset[id].store(offset);
      }
      if (s.batches[id].fetch_add(1) % 16 == 0 && s.cache->IndexedRows("stats") == static_cast<size_t>(kRows))
        s.indexed_seen.fetch_add(1);
    }
  } catch (const std::exception& e) {
    Fail("%s: %s", where, e.what());
  }
}

void RemoveTree(const std::string& dir) {
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") unlink((dir + "/" + name).c_str());
    }
    closedir(d);
  }
  rmdir(dir.c_str());
}

// Step 2: one thread, generation 1. Returns false when nothing further can be checked.
bool SingleThreaded(const std::string& path, FeatureLookup& lookup, FeatureCache& cache) {
  std::mt19937_64 rng(42);
  EXPECT(FeatureCache::Open(path).get() == &cache);  // one cache per store and process
  EXPECT(cache.Generation() == 1);
  EXPECT(cache.IndexedRows("stats") == 0);
  EXPECT(cache.IndexedRows("nope") == 0);

  // The first batches read through cursors: key by key (small), in key order (large).
  EXPECT(LookupAndCheck(lookup, {0}, "cursor, one key") == 0);
  EXPECT(LookupAndCheck(lookup, {-1, kRows, 5, std::numeric_limits<int64_t>::min(), kRows - 1,
                                 std::numeric_limits<int64_t>::max(), 150},
                        "cursor, seven keys") == 0);
  EXPECT(LookupAndCheck(lookup, AllKeysAndMissing(rng), "cursor, every key") == 0);
  {
    const int64_t key = 3;
    float out = 1.0f;
    uint8_t found = 9;
    lookup.LookupInto(&key, 0, &out, &found);  // an empty batch writes nothing
    EXPECT(out == 1.0f && found == 9);
  }
  if (failures.load() != 0) return false;

  // Batches of the same snapshot: the row index is built in the background.
  const double start = Now();
  long batches = 0;
  const bool indexed = WaitFor([&] {
    const size_t n = kBatchSizes[rng() % std::size(kBatchSizes)];
    ++batches;
    return LookupAndCheck(lookup, RandomBatch(rng, n), "until indexed") == -2 ||
           cache.IndexedRows("stats") == static_cast<size_t>(kRows);
  });
  if (!indexed) Fail("no row index of 'stats' after %.1f s and %ld batches", Now() - start, batches);
  if (failures.load() != 0) return false;
  std::printf("featcache_test: row index built after %ld batches, %.3f s\n", batches, Now() - start);

  // Through the index: every key, each batch size, missing keys.
  EXPECT(LookupAndCheck(lookup, AllKeysAndMissing(rng), "index, every key") == 0);
  for (const size_t n : kBatchSizes) EXPECT(LookupAndCheck(lookup, RandomBatch(rng, n), "index, random") != -2);
  EXPECT(LookupAndCheck(lookup, {-1, kRows, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()},
                        "index, missing keys") == -1);
  EXPECT(cache.IndexedRows("stats") == static_cast<size_t>(kRows));

  // Another lookup of the same view: some columns, another order.
  FeatureLookup two(FeatureCache::Open(path), {{"stats", "f2"}, {"stats", "f0"}});
  EXPECT(two.num_features() == 2);
  const std::vector<int64_t> keys = {7, -1, 50, kRows - 1};
  float out[8];
  uint8_t found[4];
  two.LookupInto(keys.data(), keys.size(), out, found);
  EXPECT(found[0] == 1 && found[1] == 0 && found[2] == 1 && found[3] == 1);
  EXPECT(out[0] == Expected(7, 2, 0) && out[1] == Expected(7, 0, 0));
  EXPECT(IsNan(out[2]) && IsNan(out[3]));
  EXPECT(out[4] == Expected(50, 2, 0) && out[5] == Expected(50, 0, 0));
  EXPECT(out[6] == Expected(kRows - 1, 2, 0) && out[7] == Expected(kRows - 1, 0, 0));

  // What does not exist is an error.
  auto throws = [](auto&& f) {
    try {
      f();
    } catch (const FeatureCacheError&) {
      return true;
    }
    return false;
  };
  EXPECT(throws([&] { FeatureLookup bad(FeatureCache::Open(path), {{"stats", "f9"}}); }));
  EXPECT(throws([&] { FeatureLookup bad(FeatureCache::Open(path), {{"nope", "f0"}}); }));
  EXPECT(throws([&] { FeatureLookup bad(FeatureCache::Open(path), {}); }));
  EXPECT(throws([&] { FeatureCache::Open(path + "/missing"); }));
  return failures.load() == 0;
}

// Step 3: three readers while the writer rewrites the store three times.
void Stress(Writer& writer, FeatureLookup& lookup, FeatureCache& cache) {
  Shared s;
  s.lookup = &lookup;
  s.cache = &cache;
  for (int i = 0; i < kReaders; ++i) {
    s.last_offset[i].store(-1);
    s.batches[i].store(0);
  }
  std::vector<std::thread> readers;
  for (int i = 0; i < kReaders; ++i) readers.emplace_back(Reader, std::ref(s), i);
  const double start = Now();

  auto all_saw = [&](int offset) {
    return WaitFor([&] {
      if (failures.load() != 0) return true;
      for (int i = 0; i < kReaders; ++i)
        if (s.last_offset[i].load() != offset) return false;
      return true;
    });
  };
  auto indexed = [&] {
    return WaitFor([&] { return failures.load() != 0 || cache.IndexedRows("stats") == static_cast<size_t>(kRows); });
  };
  // Readers keep reading the current (indexed) snapshot for a while: at least 0.8 s and
  // 10 batches each, however slow the build.
  auto dwell = [&] {
    long until[kReaders];
    for (int i = 0; i < kReaders; ++i) until[i] = s.batches[i].load() + 10;
    const double not_before = Now() + 0.8;
    WaitFor([&] {
      if (failures.load() != 0) return true;
      for (int i = 0; i < kReaders; ++i)
        if (s.batches[i].load() < until[i]) return false;
      return Now() >= not_before;
    });
  };

  int current = 0;
  bool ok = true;
  for (size_t round = 0; ok && round <= std::size(kOffsets); ++round) {
    if (!all_saw(current)) {
      Fail("not every reader saw offset %d within %.0f s", current, kWaitSeconds);
      break;
    }
    // Before the second rewrite the writer does not wait for the index: it lands while the
    // index of the snapshot before is (likely) being built.
    const bool wait_for_index = round != 1;
    if (wait_for_index) {
      if (!indexed()) {
        Fail("no row index of the snapshot with offset %d within %.0f s", current, kWaitSeconds);
        break;
      }
      dwell();
    }
    if (failures.load() != 0 || round == std::size(kOffsets)) break;
    const int next = kOffsets[round];
    s.requested.store(next);
    ok = writer.Run(static_cast<char>('1' + round));
    if (ok) s.committed.store(next);
    current = next;
    std::printf("featcache_test: offset %d committed at %.3f s\n", next, Now() - start);
  }

  s.stop.store(true);
  for (auto& t : readers) t.join();
  long total = 0;
  for (int i = 0; i < kReaders; ++i) total += s.batches[i].load();
  std::printf("featcache_test: %d readers, %ld batches in %.3f s (index seen %ld times)\n", kReaders, total,
              Now() - start, s.indexed_seen.load());
  if (failures.load() == 0)
    for (int i = 0; i < kReaders; ++i) EXPECT(s.last_offset[i].load() == kOffsets[std::size(kOffsets) - 1]);
}

// Step 4: the final state, one thread.
void Final(FeatureLookup& lookup, FeatureCache& cache) {
  std::mt19937_64 rng(7);
  EXPECT(cache.Generation() == 1 + std::size(kOffsets));
  EXPECT(cache.IndexedRows("stats") == static_cast<size_t>(kRows));
  const int last = kOffsets[std::size(kOffsets) - 1];
  EXPECT(LookupAndCheck(lookup, AllKeysAndMissing(rng), "final, every key") == last);
  for (const size_t n : kBatchSizes) {
    const int offset = LookupAndCheck(lookup, RandomBatch(rng, n), "final, random");
    EXPECT(offset == last || offset == -1);
  }
  EXPECT(cache.IndexedRows("stats") == static_cast<size_t>(kRows));
}

}  // namespace

int main() {
  const double start = Now();
  char dir_template[] = "/tmp/featcache_test.XXXXXX";
  if (mkdtemp(dir_template) == nullptr) {
    std::fprintf(stderr, "featcache_test: mkdtemp: %s\n", std::strerror(errno));
    return 1;
  }
  const std::string path = dir_template;

  // The writer is forked first, while this process has one thread.
  int to_child[2], from_child[2];
  if (pipe(to_child) != 0 || pipe(from_child) != 0) {
    std::fprintf(stderr, "featcache_test: pipe: %s\n", std::strerror(errno));
    RemoveTree(path);
    return 1;
  }
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = fork();
  if (pid < 0) {
    std::fprintf(stderr, "featcache_test: fork: %s\n", std::strerror(errno));
    RemoveTree(path);
    return 1;
  }
  if (pid == 0) {
    close(to_child[1]);
    close(from_child[0]);
    _exit(WriterMain(path, to_child[0], from_child[1]));
  }
  close(to_child[0]);
  close(from_child[1]);
  Writer writer;
  writer.pid = pid;
  writer.cmd = to_child[1];
  writer.ack = from_child[0];

  try {
    if (writer.Run('I')) {
      std::shared_ptr<FeatureCache> cache = FeatureCache::Open(path);
      FeatureLookup lookup(cache, {{"stats", "f0"}, {"stats", "f1"}, {"stats", "f2"}});
      EXPECT(lookup.num_features() == kFeatures);
      if (SingleThreaded(path, lookup, *cache)) {
        Stress(writer, lookup, *cache);
        if (failures.load() == 0) Final(lookup, *cache);
      }
    }
  } catch (const std::exception& e) {
    Fail("unexpected exception: %s", e.what());
  }
  writer.Finish();
  RemoveTree(path);  // the cache keeps its (unlinked) map until the process ends

  if (failures.load() != 0) {
    std::fprintf(stderr, "featcache_test: %d checks failed\n", failures.load());
    return 1;
  }
  std::printf("featcache_test: all checks passed (%.2f s)\n", Now() - start);
  return 0;
}

// Row-wise top-k of float32 scores as an XLA FFI custom call for the CPU, the same result as
// jax.lax.top_k there (values descending in float total order: NaN above +inf, +0 above -0,
// -NaN below -inf; equal values keep the lower index first), spread over XLA's intra-op pool.
//
// Why: XLA:CPU runs lax.top_k row by row on one thread at ~1.3-1.7 us per row of 128-256 chunk
// scores; LongHeads ranks one row per (query, head, layer), which made top_k the part of the
// prefill that grew fastest with the context (see README, "why 32k costs more than twice 16k").
//
// Each row is scanned once, first to last, keeping the k best (key, index) pairs sorted in a
// small buffer; an element enters only when it beats the buffer's smallest, so most cost one
// comparison. First to last because LongHeads masks the chunks a query may not pick with -inf,
// and those ties then lose to the earlier -inf at once (scanning backwards, measured 2x slower on
// such rows, every one of them would enter the buffer). Rows of k > 64 use a partial sort.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Float bits -> an integer key whose order is the float total order (sign-magnitude to
// two's complement), then joined with the inverted index so that every key in a row is unique
// and a larger key means "earlier in top_k's output".
inline uint64_t RankKey(float v, uint32_t idx) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint64_t>(~idx);
}

void TopKRow(const float* x, int64_t n, int64_t k, float* out_v, int32_t* out_i, uint64_t* buf) {
  int64_t filled = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t key = RankKey(x[j], static_cast<uint32_t>(j));
    if (filled == k) {
      if (key <= buf[k - 1]) continue;
      --filled;  // the smallest drops out
    }
    int64_t pos = filled;
    while (pos > 0 && buf[pos - 1] < key) {
      buf[pos] = buf[pos - 1];
      --pos;
    }
    buf[pos] = key;
    ++filled;
  }
  for (int64_t s = 0; s < k; ++s) {
    const uint32_t idx = ~static_cast<uint32_t>(buf[s] & 0xffffffffu);
    out_i[s] = static_cast<int32_t>(idx);
    out_v[s] = x[idx];
  }
}

// Large k: the insertion buffer would cost O(n k); a partial sort of the keys is O(n log k).
void TopKRowLarge(const float* x, int64_t n, int64_t k, float* out_v, int32_t* out_i,
                  std::vector<uint64_t>& keys) {
  keys.resize(n);
  for (int64_t j = 0; j < n; ++j) keys[j] = RankKey(x[j], static_cast<uint32_t>(j));
  std::partial_sort(keys.begin(), keys.begin() + k, keys.end(), std::greater<uint64_t>());
  for (int64_t s = 0; s < k; ++s) {
    const uint32_t idx = ~static_cast<uint32_t>(keys[s] & 0xffffffffu);
    out_i[s] = static_cast<int32_t>(idx);
    out_v[s] = x[idx];
  }
}

constexpr int64_t kSmallK = 64;

// The picks of a top-k row as LongHeads uses them: the indices whose value is > -inf (NaN is not),
// ascending, then n for the rest.
void PicksRow(int64_t n, int64_t k, const float* v, const int32_t* idx, int32_t* out) {
  int64_t m = 0;
  for (int64_t s = 0; s < k; ++s) {
    if (v[s] > -std::numeric_limits<float>::infinity()) out[m++] = idx[s];
  }
  std::sort(out, out + m);
  for (int64_t s = m; s < k; ++s) out[s] = static_cast<int32_t>(n);
}

struct Job {
  const float* x;
  float* v;
  int32_t* i;
  int32_t* picks = nullptr;  // set: also write PicksRow of each row
  int64_t n, k, rows, rows_per_block, blocks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void RunBlocks() {
    std::vector<uint64_t> scratch(k <= kSmallK ? k : n);
    for (;;) {
      const int64_t b = next.fetch_add(1);
      if (b >= blocks) return;
      const int64_t r0 = b * rows_per_block, r1 = std::min(rows, r0 + rows_per_block);
      for (int64_t r = r0; r < r1; ++r) {
        if (k <= kSmallK) {
          TopKRow(x + r * n, n, k, v + r * k, i + r * k, scratch.data());
        } else {
          TopKRowLarge(x + r * n, n, k, v + r * k, i + r * k, scratch);
        }
        if (picks) PicksRow(n, k, v + r * k, i + r * k, picks + r * k);
      }
      if (done.fetch_add(1) + 1 == blocks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

ffi::Error TopKRun(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                   ffi::ResultBuffer<ffi::S32> indices, int32_t* picks) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("lh_jax top_k: the operand must have rank >= 1");
  const int64_t n = dims.back();
  const auto out_dims = values->dimensions();
  const int64_t k = out_dims.size() ? out_dims.back() : 0;
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("lh_jax top_k: need 1 <= k <= the last dimension");
  if (n > INT32_MAX) return ffi::Error::InvalidArgument("lh_jax top_k: the last dimension exceeds int32");
  const int64_t rows = static_cast<int64_t>(x.element_count()) / n;
  if (rows == 0) return ffi::Error::Success();

  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->v = values->typed_data();
  job->i = indices->typed_data();
  job->n = n;
  job->k = k;
  job->rows = rows;
  job->picks = picks;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // about four blocks per thread for balance, and each block worth tens of microseconds
  const int64_t min_rows = std::max<int64_t>(16, 16384 / n);
  job->rows_per_block = std::max<int64_t>(min_rows, (rows + 4 * threads - 1) / (4 * threads));
  job->blocks = (rows + job->rows_per_block - 1) / job->rows_per_block;

  // Helpers may start late (or, without a pool, run inline); the caller works through the blocks
  // too and waits only for blocks some thread has claimed. A helper that starts after the last
  // block was claimed returns at once; the shared_ptr keeps the job alive for it.
  const int64_t helpers = std::min<int64_t>(threads, job->blocks) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job] { job->RunBlocks(); });
  job->RunBlocks();
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == job->blocks; });
  return ffi::Error::Success();
}

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                    ffi::ResultBuffer<ffi::S32> indices) {
  return TopKRun(pool, x, values, indices, nullptr);
}

ffi::Error TopKPicksImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                         ffi::ResultBuffer<ffi::S32> indices, ffi::ResultBuffer<ffi::S32> picks) {
  return TopKRun(pool, x, values, indices, picks->typed_data());
}

// Chunk counts of LongHeads' dispatch kernel, per group of l queries (one query block and head):
// sel [..., l, N] holds each query's chunk picks (values outside [0, W) are not picks). For every
// pick, within = how many earlier queries of the group picked the same chunk; cnt [..., W] = how
// many queries of the group picked each chunk. A query that lists a chunk twice counts once, as a
// set. The same as building the [l, W] membership matrix and taking its column cumsums, in O(l N + W)
// instead of O(l W) per group.
ffi::Error ChunkCountsImpl(ffi::Buffer<ffi::S32> sel, ffi::ResultBuffer<ffi::S32> within,
                           ffi::ResultBuffer<ffi::S32> cnt) {
  const auto dims = sel.dimensions();
  const auto cdims = cnt->dimensions();
  if (dims.size() < 2 || cdims.size() < 1)
    return ffi::Error::InvalidArgument("lh_jax chunk_counts: sel must have rank >= 2");
  const int64_t l = dims[dims.size() - 2], n = dims.back(), w = cdims.back();
  const int64_t groups = l * n ? static_cast<int64_t>(sel.element_count()) / (l * n) : 0;
  if (groups * w != static_cast<int64_t>(cnt->element_count()))
    return ffi::Error::InvalidArgument("lh_jax chunk_counts: cnt must be [..., W] for sel [..., l, N]");
  const int32_t* s = sel.typed_data();
  int32_t* out_w = within->typed_data();
  int32_t* out_c = cnt->typed_data();
  std::vector<int64_t> stamp(w);
  for (int64_t g = 0; g < groups; ++g) {
    int32_t* count = out_c + g * w;
    std::fill(count, count + w, 0);
    std::fill(stamp.begin(), stamp.end(), -1);
    for (int64_t t = 0; t < l; ++t) {
      const int32_t* row = s + (g * l + t) * n;
      int32_t* wrow = out_w + (g * l + t) * n;
      for (int64_t j = 0; j < n; ++j) {
        const int32_t c = row[j];
        wrow[j] = (c >= 0 && c < w) ? (stamp[c] == t ? count[c] - 1 : count[c]) : 0;
        if (c >= 0 && c < w && stamp[c] != t) {
          stamp[c] = t;
          ++count[c];
        }
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LhJaxChunkCounts, ChunkCountsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LhJaxTopKPicksF32, TopKPicksImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LhJaxTopKF32, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// RazorAttention CPU kernels for the two KV pools (layout and semantics: razor_vllm/ops/__init__.py
// and the kernel contract; razor_vllm/ops/reference.py is the readable definition).
//
//   paged_attention    causal attention of retrieval heads over the full paged cache
//   write_block_tails  the fp32 sums over [S, b*B) into the page tail of every local block b started
//                      this step (written once, never changed: a block is as cacheable as its tokens)
//   local_attention    local heads: exact causal attention for prompt queries (exact prefill), else
//                      sinks + window + one count-weighted compensation key/value from block tails
//   store_kv           this step's keys and values into their slots of a pool (the layer's KV heads,
//                      converted to the cache dtype); padding slots (-1) are skipped
//   retrieval_step     one layer's step in a pool, in one call: store_kv, (local_step: write_block_tails),
//   local_step         then attention read from and written to the layer's own query and output heads
//
// Work is split into tasks of (request, KV head, tile of queries): every key row read from the
// cache is scored against all queries * g query rows of the tile (GQA), with an online softmax over
// runs of keys. Caches are read through their strides (kv_cache[..., :D] and [..., D:] are views).
// A compressed local query at t reads only sink positions, block c = (t-W+1)/B from its start on and
// tail(c), so freed window blocks may hold any id. Sums and softmax run in fp32.
#include "cpu_vec.h"  // first: selects the at::vec ISA

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

namespace razor {
namespace {

constexpr int64_t kTileRows = 4 * at::vec::Vectorized<float>::size();  // query rows (queries x g) per task
constexpr int64_t kLaneMinRows = 8;  // fewer rows than this (decode): one row at a time
constexpr int64_t kKeyRun = 32;     // keys per online-softmax update (one row at a time)
constexpr int64_t kLaneRun = 64;    // keys per online-softmax update (rows in lanes)
constexpr int64_t kParallelMinCost = 1 << 14;  // row x key pairs (~20 us of work) worth waking threads for
constexpr int64_t kParallelMinCopy = 1 << 18;  // elements store_kv copies per thread (~1 MiB of fp32, ~50 us)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One half (key or value) of a pool cache: rows [block, head, slot] of D contiguous elements.
template <typename T>
struct PagedRows {
  const T* data;
  int64_t block_stride, head_stride, slot_stride;

  explicit PagedRows(const at::Tensor& cache)
      : data(cache.data_ptr<T>()),
        block_stride(cache.stride(0)),
        head_stride(cache.stride(1)),
        slot_stride(cache.stride(2)) {}

  const T* row(int64_t block, int64_t head, int64_t slot) const {
    return data + block * block_stride + head * head_stride + slot * slot_stride;
  }
};

// The queries of one request in this step: flattened rows [q_start, q_start + q_len), positions from p0.
// Local heads: the request's window, and its first compressed query (q_len when every query is a
// prompt query under exact prefill, 0 in compressed mode).
struct Span {
  int64_t req, q_start, q_len, p0, window, split;
  int64_t p1() const { return p0 + q_len - 1; }
};

// An int32 or int64 CPU vector read in place (vLLM's metadata are int32, slot mappings int64): no
// converted copy per layer and op. Other dtypes are converted once. Empty when absent.
class IntRead {
 public:
  IntRead() = default;
  IntRead(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got ", t.sizes());
    keep_ = t.scalar_type() == at::kInt || t.scalar_type() == at::kLong ? t : t.to(at::kLong);
    wide_ = keep_.scalar_type() == at::kLong;
    data_ = keep_.data_ptr();
    stride_ = keep_.stride(0);
    size_ = keep_.numel();
  }
  int64_t operator[](int64_t i) const {
    return wide_ ? static_cast<const int64_t*>(data_)[i * stride_] : static_cast<const int32_t*>(data_)[i * stride_];
  }
  bool defined() const { return data_ != nullptr; }
  int64_t size() const { return size_; }

 private:
  at::Tensor keep_;
  const void* data_ = nullptr;
  bool wide_ = false;
  int64_t stride_ = 0, size_ = 0;
};

// A per-request vector of at least num_reqs entries; empty when absent.
IntRead per_request(const std::optional<at::Tensor>& t, int64_t num_reqs, const char* name) {
  if (!t.has_value()) return IntRead();
  IntRead read(*t, name);
  TORCH_CHECK(read.size() >= num_reqs, name, " must be [num_reqs], got ", t->sizes());
  return read;
}

// Consecutive positions [pos, pos + n) stored in one physical block from `slot` on.
struct Run {
  int64_t block, pos, slot, n;
};

// Per-step bookkeeping shared by all kernels: spans and the block table.
struct Batch {
  std::vector<Span> spans;
  at::Tensor table;  // int32, keeps the storage alive
  const int32_t* block_table;
  int64_t table_stride, block_size;

  // window: the rule's window, overridden per request by `windows`; with `prompt_lens` (exact prefill)
  // queries before the prompt length are prompt queries.
  Batch(const at::Tensor& block_table_in, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
        int64_t block_size_, int64_t window = 1, const std::optional<at::Tensor>& prompt_lens = std::nullopt,
        const std::optional<at::Tensor>& windows = std::nullopt)
      : block_size(block_size_) {
    TORCH_CHECK(block_table_in.dim() == 2, "block_table must be [num_reqs, max_blocks]");
    TORCH_CHECK(block_table_in.device().is_cpu() && seq_lens.device().is_cpu() && query_start_loc.device().is_cpu(),
                "block_table, seq_lens and query_start_loc must be CPU tensors");
    table = block_table_in.scalar_type() == at::kInt ? block_table_in : block_table_in.to(at::kInt);
    if (table.stride(1) != 1) table = table.contiguous();
    block_table = table.data_ptr<int32_t>();
    table_stride = table.stride(0);

    const IntRead len(seq_lens, "seq_lens"), start(query_start_loc, "query_start_loc");
    const int64_t num_reqs = len.size();
    TORCH_CHECK(start.size() == num_reqs + 1, "query_start_loc must have num_reqs + 1 entries, got ", start.size(),
                " for ", num_reqs, " requests");
    TORCH_CHECK(table.size(0) >= num_reqs, "block_table has fewer rows than seq_lens");
    const IntRead prompts = per_request(prompt_lens, num_reqs, "prompt_lens");
    const IntRead wins = per_request(windows, num_reqs, "windows");
    for (int64_t r = 0; r < num_reqs; ++r) {
      const int64_t q_len = start[r + 1] - start[r];
      if (q_len <= 0) continue;
      TORCH_CHECK(len[r] >= q_len, "request ", r, ": seq_len ", len[r], " < query count ", q_len);
      TORCH_CHECK((len[r] + block_size - 1) / block_size <= table.size(1), "request ", r, ": seq_len ", len[r],
                  " needs more blocks than block_table has columns");
      const int64_t p0 = len[r] - q_len;
      const int64_t w = wins.defined() ? wins[r] : window;
      TORCH_CHECK(w >= 1, "request ", r, ": window ", w, " < 1");
      const int64_t split =
          prompts.defined() ? std::clamp<int64_t>(prompts[r] - p0, 0, q_len) : 0;
      spans.push_back({r, start[r], q_len, p0, w, split});
    }
  }

  int64_t block(int64_t req, int64_t pos) const { return block_table[req * table_stride + pos / block_size]; }

  int64_t num_queries() const { return spans.empty() ? 0 : spans.back().q_start + spans.back().q_len; }

  // Runs of [lo, hi) that stay inside one block, at most kKeyRun long. fn(run, next) also gets the
  // following run (n == 0 after the last) so that its rows can be prefetched while this one is used.
  template <typename Fn>
  void for_each_run(int64_t req, int64_t lo, int64_t hi, Fn&& fn) const {
    for (Run run = run_at(req, lo, hi); run.n > 0;) {
      const Run next = run_at(req, run.pos + run.n, hi);
      fn(run, next);
      run = next;
    }
  }

  Run run_at(int64_t req, int64_t pos, int64_t hi) const {
    if (pos >= hi) return {0, pos, 0, 0};
    const int64_t slot = pos % block_size;
    return {block(req, pos), pos, slot, std::min({hi - pos, block_size - slot, kKeyRun})};
  }
};

struct Task {
  int64_t span, head, q_begin, q_end, cost;
  bool exact = false;  // local heads: a tile of prompt queries (plain causal attention)
};

// n consecutive cache rows as float rows: the cache itself for float, a converted copy otherwise.
struct FloatRows {
  const float* base;
  int64_t stride;
  const float* operator[](int64_t j) const { return base + j * stride; }
};

template <typename T>
FloatRows load_rows(const PagedRows<T>& cache, int64_t block, int64_t head, int64_t slot, int64_t n, int64_t D,
                    float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return {cache.row(block, head, slot), cache.slot_stride};
  } else {
    for (int64_t j = 0; j < n; ++j) to_float(cache.row(block, head, slot + j), buffer + j * D, D);
    return {buffer, D};
  }
}

// Up to kLaneRun key (or value) rows of consecutive positions, across block boundaries: row j at
// row[j]. The lane kernel's online-softmax bookkeeping is per run of keys, so a run that stopped at
// each block's end (66-token retrieval blocks: runs of 32, 32 and 2) cost up to 1.5x as many.
struct RowPointers {
  const float* row[kLaneRun];
  const float* operator[](int64_t j) const { return row[j]; }
};

// Rows of positions [pos, pos + n), n <= kLaneRun, of one request and head: the cache rows themselves
// for float, converted copies in `buffer` otherwise.
template <typename T>
void gather_rows(const PagedRows<T>& cache, const Batch& batch, int64_t req, int64_t head, int64_t pos, int64_t n,
                 int64_t D, float* buffer, RowPointers& out) {
  for (int64_t j = 0; j < n;) {
    const Run run = batch.run_at(req, pos + j, pos + n);
    for (int64_t i = 0; i < run.n; ++i, ++j) {
      if constexpr (std::is_same_v<T, float>) {
        out.row[j] = cache.row(run.block, head, run.slot + i);
      } else {
        to_float(cache.row(run.block, head, run.slot + i), buffer + j * D, D);
        out.row[j] = buffer + j * D;
      }
    }
  }
}

// Per-thread buffers, sized for the largest tile. Every kernel writes what it reads, so a thread
// keeps its buffers from call to call (thread_scratch): a decode step calls the kernels once per
// layer and pool, each with little work, and allocating ~60 KB each time was a visible share.
struct Scratch {
  int64_t padded_rows, D;
  std::vector<float> m, l, acc, logits, keys, values, key_sum, value_sum, value_mean, out_row, query_t, lo, hi;
  Scratch(int64_t rows, int64_t D_)
      : padded_rows((rows + fVec::size() - 1) / fVec::size() * fVec::size()), D(D_),
        m(padded_rows), l(padded_rows), acc(padded_rows * D), logits(kLaneRun * padded_rows), keys(kLaneRun * D),
        values(kLaneRun * D), key_sum(D), value_sum(D), value_mean(D), out_row(D), query_t(padded_rows * D),
        lo(padded_rows), hi(padded_rows) {}
};

// This thread's buffers, large enough for `rows` x `D` tiles.
Scratch& thread_scratch(int64_t rows, int64_t D) {
  thread_local std::unique_ptr<Scratch> scratch;
  if (!scratch || scratch->padded_rows < rows || scratch->D != D) scratch = std::make_unique<Scratch>(rows, D);
  return *scratch;
}

// Where a tile's output rows go: row r (query r / g, query head r % g of the tile's KV head) at
// base + (r / g) * row_stride + (r % g) * head_stride elements, converted from fp32 to the output's
// dtype (one rounding, as torch's .to).
struct OutRows {
  void* base;
  at::ScalarType dtype;
  int64_t row_stride, head_stride, g;

  void store(int64_t r, const float* src, int64_t D) const {
    const int64_t offset = (r / g) * row_stride + (r % g) * head_stride;
    switch (dtype) {
      case at::kFloat: std::copy(src, src + D, static_cast<float*>(base) + offset); break;
      case at::kBFloat16: convert(src, static_cast<c10::BFloat16*>(base) + offset, D); break;
      case at::kHalf: convert(src, static_cast<c10::Half*>(base) + offset, D); break;
      default: TORCH_CHECK(false, "razor_vllm kernels write float32, bfloat16 or float16 outputs, got ", dtype);
    }
  }

  template <typename T>
  static void convert(const float* src, T* dst, int64_t D) {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
  }
};

// Runs tasks on the ATen thread pool, largest first, each thread pulling the next one (tiles of a
// long prefill and single decode queries differ in cost by orders of magnitude). Task cost is in
// (query row x cache row) pairs; a call with less work than kParallelMinCost stays on the calling
// thread, where waking the pool would cost more than the work.
template <typename Fn>
void run_tasks(std::vector<Task>& tasks, int64_t rows, int64_t D, Fn&& fn) {
  int64_t total = 0;
  for (const Task& t : tasks) total += t.cost;
  const int64_t n = static_cast<int64_t>(tasks.size());
  if (total < kParallelMinCost || n < 2 || at::get_num_threads() < 2 || at::in_parallel_region()) {
    Scratch& scratch = thread_scratch(rows, D);
    for (const Task& t : tasks) fn(t, scratch);
    return;
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    Scratch& scratch = thread_scratch(rows, D);
    for (int64_t w = begin; w < end; ++w)
      for (int64_t i; (i = next.fetch_add(1)) < n;) fn(tasks[i], scratch);
  });
}

// What a tile attends with: rows r = (query i) * g + j, query i at position first_pos + i, reading
// KV head pool_head. Query rows are float, row r at query + (r / g) * query_stride + (r % g) * D.
template <typename T>
struct TileInputs {
  const PagedRows<T>& keys;
  const PagedRows<T>& values;
  const Batch& batch;
  int64_t req, pool_head, D, g, rows, first_pos;
  float scale;
  const float* query;
  int64_t query_stride;

  int64_t position(int64_t r) const { return first_pos + r / g; }
  const float* query_row(int64_t r) const { return query + (r / g) * query_stride + (r % g) * D; }

  // Decode streams the cache once, so it waits on memory; ask for the next run's rows early.
  void prefetch(const Run& run) const {
    for (int64_t j = 0; j < run.n; ++j) {
      const char* k = reinterpret_cast<const char*>(keys.row(run.block, pool_head, run.slot + j));
      const char* v = reinterpret_cast<const char*>(values.row(run.block, pool_head, run.slot + j));
      for (int64_t byte = 0; byte < D * static_cast<int64_t>(sizeof(T)); byte += 64) {
        __builtin_prefetch(k + byte);
        __builtin_prefetch(v + byte);
      }
    }
  }

  FloatRows key_rows(const Run& run, float* buffer) const {
    return load_rows(keys, run.block, pool_head, run.slot, run.n, D, buffer);
  }
  FloatRows value_rows(const Run& run, float* buffer) const {
    return load_rows(values, run.block, pool_head, run.slot, run.n, D, buffer);
  }
};

// Both tile kernels keep, per row, an online-softmax state (running max m, denominator l and
// unnormalised output acc) and offer the same four steps: set_row (start a row from a given
// state, e.g. the compensation key), attend (a range of key positions), finish (write acc / l).
//
// RowTile: one row at a time, dot products along D. For few rows (decode), where putting rows in
// SIMD lanes would leave most lanes empty.
template <typename T>
struct RowTile {
  const TileInputs<T>& in;
  Scratch& s;

  void set_row(int64_t r, float m, float l, const float* value) {
    s.m[r] = m;
    s.l[r] = l;
    float* acc = s.acc.data() + r * in.D;
    if (value) std::copy(value, value + in.D, acc); else std::fill(acc, acc + in.D, 0.f);
  }

  // Keys of [lo, hi); a row at position t sees those in [t - window + 1, t] (window > 0) or [0, t].
  void attend(int64_t lo, int64_t hi, int64_t window) {
    const int64_t D = in.D;
    in.batch.for_each_run(in.req, lo, hi, [&](const Run& run, const Run& next) {
      in.prefetch(next);
      const int64_t pos0 = run.pos, n = run.n;
      const FloatRows k = in.key_rows(run, s.keys.data());
      const FloatRows v = in.value_rows(run, s.values.data());
      for (int64_t r = 0; r < in.rows; ++r) {
        const int64_t t = in.position(r);
        const int64_t ja = std::max<int64_t>(0, window > 0 ? t - window + 1 - pos0 : 0);
        const int64_t jb = std::min<int64_t>(n, t - pos0 + 1);
        if (ja >= jb) continue;
        float* logit = s.logits.data();
        const float* q = in.query_row(r);
        for (int64_t j = ja; j < jb; ++j) logit[j - ja] = in.scale * dot(q, k[j], D);
        const int64_t count = jb - ja;
        const float m_new = std::max(s.m[r], max_of(logit, count));
        const float alpha = std::exp(s.m[r] - m_new);  // 0 on the first keys of the row
        s.l[r] = s.l[r] * alpha + exp_shift_sum(logit, m_new, count);
        s.m[r] = m_new;
        mix(s.acc.data() + r * D, alpha, logit, v, ja, jb);
      }
    });
  }

  // acc = acc * alpha + sum_{j in [ja, jb)} p[j - ja] * v[j], accumulating 4 vectors of acc in registers.
  void mix(float* acc, float alpha, const float* p, const FloatRows& v, int64_t ja, int64_t jb) const {
    constexpr int64_t V = fVec::size();
    const fVec va(alpha);
    int64_t d = 0;
    for (; d + 4 * V <= in.D; d += 4 * V) {
      fVec a0 = fVec::loadu(acc + d) * va, a1 = fVec::loadu(acc + d + V) * va;
      fVec a2 = fVec::loadu(acc + d + 2 * V) * va, a3 = fVec::loadu(acc + d + 3 * V) * va;
      for (int64_t j = ja; j < jb; ++j) {
        const fVec pj(p[j - ja]);
        const float* vj = v[j] + d;
        a0 = at::vec::fmadd(fVec::loadu(vj), pj, a0);
        a1 = at::vec::fmadd(fVec::loadu(vj + V), pj, a1);
        a2 = at::vec::fmadd(fVec::loadu(vj + 2 * V), pj, a2);
        a3 = at::vec::fmadd(fVec::loadu(vj + 3 * V), pj, a3);
      }
      a0.store(acc + d), a1.store(acc + d + V), a2.store(acc + d + 2 * V), a3.store(acc + d + 3 * V);
    }
    for (; d < in.D; d += V) {  // remaining vectors, the last one partial
      const int64_t width = std::min<int64_t>(V, in.D - d);
      fVec a = fVec::loadu(acc + d, width) * va;
      for (int64_t j = ja; j < jb; ++j) a = at::vec::fmadd(fVec::loadu(v[j] + d, width), fVec(p[j - ja]), a);
      a.store(acc + d, width);
    }
  }

  void finish(const OutRows& out) const {
    float* row = s.out_row.data();
    for (int64_t r = 0; r < in.rows; ++r) {
      const float inv = 1.f / s.l[r];
      const float* a = s.acc.data() + r * in.D;
      for (int64_t d = 0; d < in.D; ++d) row[d] = a[d] * inv;
      out.store(r, row, in.D);
    }
  }
};

// Keeps v in a register from here on: without it gcc folds the load of a value used by several
// FMAs into each of them (one load per FMA instead of one in all), and the loop becomes load-bound.
inline void in_register(fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 x = v;
  asm volatile("" : "+v"(x));
  v = x;
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 x = v;
  asm volatile("" : "+x"(x));
  v = x;
#else
  (void)v;
#endif
}

// LaneTile: rows in SIMD lanes (prefill tiles, many rows per KV head). Scores and the value update
// are register-blocked outer products (6 or 4 keys, or 4 dims, x up to 4 row vectors per step), so each
// key/value element loaded from the cache serves a whole vector of query rows; the softmax bookkeeping
// runs across rows at once. State is transposed: query_t[d][r] (pre-scaled), acc[d][r].
template <typename T>
struct LaneTile {
  static constexpr int64_t V = fVec::size();
  static constexpr int64_t kMaxVecs = 4;  // row vectors per register block
  const TileInputs<T>& in;
  Scratch& s;
  int64_t P;  // padded row count: stride of the transposed buffers

  LaneTile(const TileInputs<T>& inputs, Scratch& scratch)
      : in(inputs), s(scratch), P((inputs.rows + V - 1) / V * V) {
    for (int64_t d = 0; d < in.D; ++d) {
      float* qt = s.query_t.data() + d * P;
      for (int64_t r = 0; r < in.rows; ++r) qt[r] = in.query_row(r)[d] * in.scale;
      for (int64_t r = in.rows; r < P; ++r) qt[r] = 0.f;
    }
    for (int64_t r = in.rows; r < P; ++r) set_row(r, kNegInf, 0.f, nullptr);
  }

  void set_row(int64_t r, float m, float l, const float* value) {
    s.m[r] = m;
    s.l[r] = l;
    for (int64_t d = 0; d < in.D; ++d) s.acc[d * P + r] = value ? value[d] : 0.f;
  }

  void attend(int64_t lo, int64_t hi, int64_t window) {
    if (lo >= hi) return;
    // Visible key range per row, as floats for lane-wise compares; padded rows see nothing.
    int64_t first_seen = hi, last_seen = -1;
    int64_t all_see_from = 0, all_see_to = hi;  // keys every row of the tile sees
    for (int64_t r = 0; r < P; ++r) {
      const int64_t t = in.position(std::min(r, in.rows - 1));
      const int64_t row_lo = window > 0 ? t - window + 1 : 0;
      s.lo[r] = r < in.rows ? static_cast<float>(row_lo) : 1.f;
      s.hi[r] = r < in.rows ? static_cast<float>(t) : 0.f;
      if (r < in.rows) {
        first_seen = std::min(first_seen, row_lo), last_seen = std::max(last_seen, t);
        all_see_from = std::max(all_see_from, row_lo), all_see_to = std::min(all_see_to, t);
      }
    }
    lo = std::max(lo, first_seen);
    hi = std::min(hi, last_seen + 1);
    RowPointers k, v;
    for (int64_t pos0 = lo; pos0 < hi; pos0 += kLaneRun) {
      const int64_t n = std::min(kLaneRun, hi - pos0);
      const bool masked = pos0 < all_see_from || pos0 + n - 1 > all_see_to;
      gather_rows(in.keys, in.batch, in.req, in.pool_head, pos0, n, in.D, s.keys.data(), k);
      gather_rows(in.values, in.batch, in.req, in.pool_head, pos0, n, in.D, s.values.data(), v);
      for (int64_t c0 = 0; c0 < P; c0 += kMaxVecs * V) {
        switch (std::min<int64_t>(kMaxVecs, (P - c0) / V)) {
          case 1: process<1>(k, v, pos0, n, c0, masked); break;
          case 2: process<2>(k, v, pos0, n, c0, masked); break;
          case 3: process<3>(k, v, pos0, n, c0, masked); break;
          default: process<4>(k, v, pos0, n, c0, masked); break;
        }
      }
    }
  }

  // Keys [pos0, pos0 + n) against rows [c0, c0 + C * V); without `masked` every row sees every key.
  template <int C>
  void process(const RowPointers& k, const RowPointers& v, int64_t pos0, int64_t n, int64_t c0, bool masked) {
    constexpr int64_t W = C * V;  // logits row stride: logits[j][c * V + lane]
    float* logits = s.logits.data();
    int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)  // 6 x 4 accumulators + 4 query vectors: fits 32 registers, not AVX2's 16
    for (; j + 6 <= n; j += 6) scores<C, 6>(k, j, c0, logits + j * W);
#endif
    for (; j + 4 <= n; j += 4) scores<C, 4>(k, j, c0, logits + j * W);
    for (; j < n; ++j) scores<C, 1>(k, j, c0, logits + j * W);

    const fVec neg_inf(kNegInf), zero(0.f);
    fVec row_max[C], alpha[C], shift[C], denom[C];
    for (int c = 0; c < C; ++c) row_max[c] = neg_inf;
    if (!masked) {
      for (j = 0; j < n; ++j)
        for (int c = 0; c < C; ++c) row_max[c] = at::vec::maximum(row_max[c], fVec::loadu(logits + j * W + c * V));
    } else {
      const float* lo = s.lo.data() + c0;  // local copies: the stores below could alias s's members
      const float* hi = s.hi.data() + c0;
      for (j = 0; j < n; ++j) {
        const fVec pos(static_cast<float>(pos0 + j));
        for (int c = 0; c < C; ++c) {
          const fVec visible = (fVec::loadu(lo + c * V) <= pos) & (pos <= fVec::loadu(hi + c * V));
          const fVec x = fVec::blendv(neg_inf, fVec::loadu(logits + j * W + c * V), visible);
          x.store(logits + j * W + c * V);
          row_max[c] = at::vec::maximum(row_max[c], x);
        }
      }
    }
    for (int c = 0; c < C; ++c) {
      float* m = s.m.data() + c0 + c * V;
      const fVec m_old = fVec::loadu(m), m_new = at::vec::maximum(m_old, row_max[c]);
      shift[c] = fVec::blendv(m_new, zero, m_new == neg_inf);  // rows with nothing seen yet stay at 0
      alpha[c] = (m_old - shift[c]).exp_u20();
      m_new.store(m);
      denom[c] = zero;
    }
    for (j = 0; j < n; ++j)
      for (int c = 0; c < C; ++c) {
        const fVec p = (fVec::loadu(logits + j * W + c * V) - shift[c]).exp_u20();
        p.store(logits + j * W + c * V);
        denom[c] = denom[c] + p;
      }
    for (int c = 0; c < C; ++c) {
      float* l = s.l.data() + c0 + c * V;
      at::vec::fmadd(fVec::loadu(l), alpha[c], denom[c]).store(l);
    }
    int64_t d = 0;
    for (; d + 4 <= in.D; d += 4) update<C, 4>(v, n, d, c0, alpha, logits);
    for (; d < in.D; ++d) update<C, 1>(v, n, d, c0, alpha, logits);
  }

  // logits[kb][c] = sum_d k[j + kb][d] * query_t[d][c], for KB keys at once.
  template <int C, int KB>
  void scores(const RowPointers& k, int64_t j, int64_t c0, float* out) const {
    fVec acc[KB][C];
    for (int kb = 0; kb < KB; ++kb)
      for (int c = 0; c < C; ++c) acc[kb][c] = fVec(0.f);
    const float* key[KB];
    for (int kb = 0; kb < KB; ++kb) key[kb] = k[j + kb];
    const float* qt = s.query_t.data() + c0;
    for (int64_t d = 0; d < in.D; ++d, qt += P) {
      fVec q[C];
      for (int c = 0; c < C; ++c) {
        q[c] = fVec::loadu(qt + c * V);
        in_register(q[c]);
      }
      for (int kb = 0; kb < KB; ++kb) {
        const fVec kd(key[kb][d]);
        for (int c = 0; c < C; ++c) acc[kb][c] = at::vec::fmadd(kd, q[c], acc[kb][c]);
      }
    }
    for (int kb = 0; kb < KB; ++kb)
      for (int c = 0; c < C; ++c) acc[kb][c].store(out + kb * C * V + c * V);
  }

  // acc[d + db][c] = acc[d + db][c] * alpha[c] + sum_j v[j][d + db] * p[j][c], for DB dims at once.
  template <int C, int DB>
  void update(const RowPointers& v, int64_t n, int64_t d, int64_t c0, const fVec* alpha, const float* p) {
    constexpr int64_t W = C * V;
    fVec acc[DB][C];
    for (int db = 0; db < DB; ++db)
      for (int c = 0; c < C; ++c) acc[db][c] = fVec::loadu(s.acc.data() + (d + db) * P + c0 + c * V) * alpha[c];
    for (int64_t j = 0; j < n; ++j) {
      fVec pj[C];
      for (int c = 0; c < C; ++c) {
        pj[c] = fVec::loadu(p + j * W + c * V);
        in_register(pj[c]);
      }
      const float* vj = v[j] + d;
      for (int db = 0; db < DB; ++db) {
        const fVec vd(vj[db]);
        for (int c = 0; c < C; ++c) acc[db][c] = at::vec::fmadd(vd, pj[c], acc[db][c]);
      }
    }
    for (int db = 0; db < DB; ++db)
      for (int c = 0; c < C; ++c) acc[db][c].store(s.acc.data() + (d + db) * P + c0 + c * V);
  }

  void finish(const OutRows& out) const {
    float* row = s.out_row.data();
    for (int64_t r = 0; r < in.rows; ++r) {
      const float inv = 1.f / s.l[r];
      for (int64_t d = 0; d < in.D; ++d) row[d] = s.acc[d * P + r] * inv;
      out.store(r, row, in.D);
    }
  }
};

// Calls fn(tile) with the kernel that suits the tile's row count.
template <typename T, typename Fn>
void with_tile(const TileInputs<T>& in, Scratch& s, Fn&& fn) {
  if (in.rows >= kLaneMinRows) {
    LaneTile<T> tile(in, s);
    fn(tile);
  } else {
    RowTile<T> tile{in, s};
    fn(tile);
  }
}

// Starts each row of a local-head tile from its compensation key: for the query at t, with
// n_d = t+1-W-S > 0, logit scale * q.k_hat + ln(n_d) (n_d keys' worth of softmax mass) and value
// v_hat. The sums of [S, t+1-W) are tail(c) of block c = (t+1-W) / B (sums over [S, c*B), read
// from `tail_of(c)`: keys, then values at `value_offset`) plus the cached rows [max(S, c*B), t+1-W)
// of block c, added as t moves through the tile (restarting from the next tail when c moves on).
template <typename T, typename Tile, typename TailOf>
void start_from_compensation(Tile& tile, const TileInputs<T>& in, TailOf&& tail_of, int64_t value_offset,
                             int64_t sink, int64_t window, Scratch& s) {
  const int64_t D = in.D, B = in.batch.block_size;
  float* key_sum = s.key_sum.data();
  float* value_sum = s.value_sum.data();
  int64_t block_c = -1, folded_end = 0;
  for (int64_t i = 0; i * in.g < in.rows; ++i) {
    const int64_t t = in.first_pos + i;
    const int64_t n_dropped = t + 1 - window - sink;
    if (n_dropped <= 0) {
      for (int64_t j = 0; j < in.g; ++j) tile.set_row(i * in.g + j, kNegInf, 0.f, nullptr);
      continue;
    }
    const int64_t c = (t + 1 - window) / B;
    if (c != block_c) {  // first compensated query, or the oldest window position entered a new block
      if (c * B > sink) {
        const float* stored = tail_of(c);
        std::copy(stored, stored + D, key_sum);
        std::copy(stored + value_offset, stored + value_offset + D, value_sum);
      } else {  // tail(c) is the empty sum
        std::fill(key_sum, key_sum + D, 0.f);
        std::fill(value_sum, value_sum + D, 0.f);
      }
      block_c = c;
      folded_end = std::max(sink, c * B);
    }
    for (; folded_end < t + 1 - window; ++folded_end) {
      const int64_t block = in.batch.block(in.req, folded_end), slot = folded_end % B;
      add_as_float(in.keys.row(block, in.pool_head, slot), key_sum, D);
      add_as_float(in.values.row(block, in.pool_head, slot), value_sum, D);
    }
    const float inv = 1.f / static_cast<float>(n_dropped), log_count = std::log(static_cast<float>(n_dropped));
    for (int64_t d = 0; d < D; ++d) s.value_mean[d] = value_sum[d] * inv;
    for (int64_t j = 0; j < in.g; ++j) {
      const int64_t r = i * in.g + j;
      tile.set_row(r, in.scale * dot(in.query_row(r), key_sum, D) * inv + log_count, 1.f, s.value_mean.data());
    }
  }
}

// Tasks of (request, KV head, query tile); keys_seen(span, q_begin, q_end, exact) estimates keys per
// query. With split_prompt, a request's prompt queries [0, split) and the others get separate tiles.
template <typename KeysSeen>
std::vector<Task> tile_tasks(const Batch& batch, int64_t num_kv_heads, int64_t g, bool split_prompt,
                             KeysSeen&& keys_seen) {
  const int64_t tile = std::max<int64_t>(1, kTileRows / g);
  std::vector<Task> tasks;
  for (int64_t i = 0; i < static_cast<int64_t>(batch.spans.size()); ++i) {
    const Span& sp = batch.spans[i];
    const int64_t split = split_prompt ? sp.split : 0;
    for (const auto& [begin, end, exact] : {std::tuple{int64_t{0}, split, true}, std::tuple{split, sp.q_len, false}})
      for (int64_t qb = begin; qb < end; qb += tile) {
        const int64_t qe = std::min(end, qb + tile);
        const int64_t cost = (qe - qb) * g * keys_seen(sp, qb, qe, exact);
        for (int64_t h = 0; h < num_kv_heads; ++h) tasks.push_back({i, h, qb, qe, cost, exact});
      }
  }
  return tasks;
}

template <typename Fn>
void dispatch_cache_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "razor_vllm kernels support float32, bfloat16 and float16 caches, got ", dtype);
  }
}

void check_cache_pair(const at::Tensor& key_cache, const at::Tensor& value_cache, int64_t head_offset,
                      int64_t num_kv_heads) {
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.dim() == 4, "caches must be [num_blocks, H_pool, block_size, D]");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes(), "key_cache ", key_cache.sizes(), " and value_cache ",
              value_cache.sizes(), " differ in shape");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "key and value caches differ in dtype");
  TORCH_CHECK(key_cache.device().is_cpu() && value_cache.device().is_cpu(), "caches must be on the CPU");
  TORCH_CHECK(key_cache.stride(3) == 1 && value_cache.stride(3) == 1, "cache rows (last dim) must be contiguous");
  TORCH_CHECK(num_kv_heads > 0 && head_offset >= 0 && head_offset + num_kv_heads <= key_cache.size(1),
              "heads [", head_offset, ", ", head_offset + num_kv_heads, ") are outside the pool's ", key_cache.size(1),
              " heads");
}

void check_tails(const at::Tensor& tails, const at::Tensor& key_cache) {
  TORCH_CHECK(tails.scalar_type() == at::kFloat && tails.dim() == 4 && tails.size(0) == key_cache.size(0) &&
                  tails.size(1) == key_cache.size(1) && tails.size(2) == 2 && tails.size(3) == key_cache.size(3) &&
                  tails.stride(3) == 1 && tails.device().is_cpu(),
              "tails must be CPU float32 [num_blocks, H_pool, 2, D] with contiguous rows, got ", tails.scalar_type(),
              " ", tails.sizes());
}

void check_rule(int64_t sink, int64_t window) {
  TORCH_CHECK(sink >= 0 && window >= 1, "need sink >= 0 and window >= 1, got sink=", sink, " window=", window);
}

// Returns g, the query heads per KV head.
int64_t check_query(const at::Tensor& query, const at::Tensor& key_cache, int64_t num_kv_heads) {
  TORCH_CHECK(query.dim() == 3, "query must be [num_tokens, num_q_heads, head_size]");
  TORCH_CHECK(query.device().is_cpu(), "query must be on the CPU");
  TORCH_CHECK(query.size(2) == key_cache.size(3), "query head_size ", query.size(2), " != cache head_size ",
              key_cache.size(3));
  TORCH_CHECK(query.size(1) % num_kv_heads == 0, "num_q_heads ", query.size(1), " is not a multiple of num_kv_heads ",
              num_kv_heads);
  return query.size(1) / num_kv_heads;
}

// Query rows as fp32 with each token's heads packed (stride(1) == D): a layer's slice of heads is
// read in place, anything else converted once.
at::Tensor float_query(const at::Tensor& query) {
  if (query.scalar_type() == at::kFloat && query.stride(2) == 1 && query.stride(1) == query.size(2)) return query;
  return query.to(at::kFloat).contiguous();
}

// Which of the query's KV heads (query heads [k * g, k * g + g)) pool head offset + h serves: k =
// kv_heads[h], or h when there is no index (the query holds exactly the pool's heads).
class HeadMap {
 public:
  HeadMap(const std::optional<at::Tensor>& kv_heads, int64_t count, int64_t query_kv_heads) {
    if (kv_heads.has_value()) {
      index_ = IntRead(*kv_heads, "kv_heads");
      TORCH_CHECK(index_.size() == count, "kv_heads has ", index_.size(), " entries for ", count, " pool heads");
      for (int64_t h = 0; h < count; ++h)
        TORCH_CHECK(index_[h] >= 0 && index_[h] < query_kv_heads, "kv_heads[", h, "] = ", index_[h],
                    " is outside the layer's ", query_kv_heads, " KV heads");
    } else {
      TORCH_CHECK(count == query_kv_heads, "without kv_heads the query must hold the pool's ", count,
                  " KV heads, it holds ", query_kv_heads);
    }
  }
  int64_t operator()(int64_t h) const { return index_.defined() ? index_[h] : h; }

 private:
  IntRead index_;
};

// The attention output: `out` [num_tokens, Hq, D] (float32, bfloat16 or float16, contiguous rows),
// written at the mapped heads only; rows past the counted queries (batch padding) get zeros.
void check_output(const at::Tensor& out, const at::Tensor& query, int64_t num_queries) {
  TORCH_CHECK(out.sizes() == query.sizes(), "out ", out.sizes(), " must have the query's shape ", query.sizes());
  TORCH_CHECK(out.device().is_cpu() && out.stride(2) == 1, "out must be a CPU tensor with contiguous rows");
  TORCH_CHECK(num_queries <= query.size(0), "query_start_loc counts ", num_queries, " queries, query has ",
              query.size(0));
}

void zero_padding_rows(const at::Tensor& out, int64_t num_queries, const HeadMap& heads, int64_t count, int64_t g) {
  if (num_queries >= out.size(0)) return;
  const at::Tensor rows = out.narrow(0, num_queries, out.size(0) - num_queries);
  for (int64_t h = 0; h < count; ++h) rows.narrow(1, heads(h) * g, g).zero_();
}

// Causal attention of pool heads [head_offset, head_offset + count) into `out` (see HeadMap).
void paged_attention_into(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& block_table, const at::Tensor& seq_lens,
                          const at::Tensor& query_start_loc, int64_t head_offset, int64_t count, int64_t g,
                          const HeadMap& heads, double scale, const at::Tensor& out) {
  check_cache_pair(key_cache, value_cache, head_offset, count);
  const int64_t D = query.size(2);
  const Batch batch(block_table, seq_lens, query_start_loc, key_cache.size(2));
  check_output(out, query, batch.num_queries());
  zero_padding_rows(out, batch.num_queries(), heads, count, g);
  const at::Tensor q = float_query(query);
  const float* q_data = q.data_ptr<float>();

  std::vector<Task> tasks = tile_tasks(batch, count, g, /*split_prompt=*/false,
                                      [](const Span& sp, int64_t, int64_t qe, bool) { return sp.p0 + qe; });
  dispatch_cache_dtype(key_cache.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const PagedRows<T> keys(key_cache), values(value_cache);
    run_tasks(tasks, std::max(kTileRows, g), D, [&](const Task& task, Scratch& s) {
      const Span& sp = batch.spans[task.span];
      const int64_t first_row = sp.q_start + task.q_begin, q_head = heads(task.head) * g;
      const TileInputs<T> in{keys, values, batch, sp.req, head_offset + task.head, D, g,
                             (task.q_end - task.q_begin) * g, sp.p0 + task.q_begin, static_cast<float>(scale),
                             q_data + first_row * q.stride(0) + q_head * D, q.stride(0)};
      const OutRows rows{static_cast<char*>(out.data_ptr()) + (first_row * out.stride(0) + q_head * out.stride(1)) *
                                                                 out.element_size(),
                         out.scalar_type(), out.stride(0), out.stride(1), g};
      with_tile(in, s, [&](auto& tile) {
        for (int64_t r = 0; r < in.rows; ++r) tile.set_row(r, kNegInf, 0.f, nullptr);
        tile.attend(0, sp.p0 + task.q_end, /*window=*/0);
        tile.finish(rows);
      });
    });
  });
}

// Local-head attention of pool heads [head_offset, head_offset + count) into `out` (see HeadMap).
void local_attention_into(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& tails, const at::Tensor& block_table, const at::Tensor& seq_lens,
                          const at::Tensor& query_start_loc, const std::optional<at::Tensor>& prompt_lens,
                          const std::optional<at::Tensor>& windows, int64_t head_offset, int64_t count, int64_t g,
                          const HeadMap& heads, int64_t sink, int64_t window, bool compensation, bool exact_prefill,
                          double scale, const at::Tensor& out) {
  check_cache_pair(key_cache, value_cache, head_offset, count);
  check_rule(sink, window);
  TORCH_CHECK(!exact_prefill || prompt_lens.has_value(), "exact_prefill needs prompt_lens");
  const int64_t D = query.size(2), B = key_cache.size(2);
  check_tails(tails, key_cache);
  const Batch batch(block_table, seq_lens, query_start_loc, B, window,
                    exact_prefill ? prompt_lens : std::nullopt, windows);
  check_output(out, query, batch.num_queries());
  zero_padding_rows(out, batch.num_queries(), heads, count, g);
  const at::Tensor q = float_query(query);
  const float* q_data = q.data_ptr<float>();
  const float* tail_data = tails.data_ptr<float>();

  std::vector<Task> tasks =
      tile_tasks(batch, count, g, exact_prefill, [&](const Span& sp, int64_t qb, int64_t qe, bool exact) {
        return exact ? sp.p0 + qe : std::min(sink, sp.p0 + qe) + (qe - qb) + sp.window + B;
      });
  dispatch_cache_dtype(key_cache.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const PagedRows<T> keys(key_cache), values(value_cache);
    run_tasks(tasks, std::max(kTileRows, g), D, [&](const Task& task, Scratch& s) {
      const Span& sp = batch.spans[task.span];
      const int64_t pool_head = head_offset + task.head, w = sp.window, q_head = heads(task.head) * g;
      const int64_t first_row = sp.q_start + task.q_begin;
      const int64_t t_first = sp.p0 + task.q_begin, t_last = sp.p0 + task.q_end - 1;
      const TileInputs<T> in{keys, values, batch, sp.req, pool_head, D, g, (task.q_end - task.q_begin) * g, t_first,
                             static_cast<float>(scale), q_data + first_row * q.stride(0) + q_head * D, q.stride(0)};
      const OutRows rows{static_cast<char*>(out.data_ptr()) + (first_row * out.stride(0) + q_head * out.stride(1)) *
                                                                 out.element_size(),
                         out.scalar_type(), out.stride(0), out.stride(1), g};
      with_tile(in, s, [&](auto& tile) {
        if (task.exact) {  // prompt queries: every position [0, t]
          for (int64_t r = 0; r < in.rows; ++r) tile.set_row(r, kNegInf, 0.f, nullptr);
          tile.attend(0, t_last + 1, /*window=*/0);
        } else {
          if (compensation) {
            const auto tail_of = [&](int64_t c) {
              return tail_data + batch.block(sp.req, c * B) * tails.stride(0) + pool_head * tails.stride(1);
            };
            start_from_compensation(tile, in, tail_of, tails.stride(2), sink, w, s);
          } else {  // ablation: dropped tokens leave no trace
            for (int64_t r = 0; r < in.rows; ++r) tile.set_row(r, kNegInf, 0.f, nullptr);
          }
          tile.attend(0, std::min(sink, t_last + 1), /*window=*/0);  // sinks: every one up to t
          tile.attend(std::max(sink, t_first - w + 1), t_last + 1, w);
        }
        tile.finish(rows);
      });
    });
  });
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, int64_t head_offset, int64_t num_kv_heads,
                           double scale) {
  const int64_t g = check_query(query, key_cache, num_kv_heads);
  at::Tensor out = at::empty_like(query, at::MemoryFormat::Contiguous);
  paged_attention_into(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, head_offset,
                       num_kv_heads, g, HeadMap(std::nullopt, num_kv_heads, num_kv_heads), scale, out);
  return out;
}

at::Tensor local_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& tails, const at::Tensor& block_table, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, const std::optional<at::Tensor>& prompt_lens,
                           const std::optional<at::Tensor>& windows, int64_t head_offset, int64_t num_kv_heads,
                           int64_t sink, int64_t window, bool compensation, bool exact_prefill, double scale) {
  const int64_t g = check_query(query, key_cache, num_kv_heads);
  at::Tensor out = at::empty_like(query, at::MemoryFormat::Contiguous);
  local_attention_into(query, key_cache, value_cache, tails, block_table, seq_lens, query_start_loc, prompt_lens,
                       windows, head_offset, num_kv_heads, g, HeadMap(std::nullopt, num_kv_heads, num_kv_heads), sink,
                       window, compensation, exact_prefill, scale, out);
  return out;
}

void write_block_tails(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& tails,
                       const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                       int64_t head_offset, int64_t num_kv_heads, int64_t sink) {
  check_cache_pair(key_cache, value_cache, head_offset, num_kv_heads);
  check_rule(sink, 1);
  const int64_t D = key_cache.size(3), B = key_cache.size(2);
  check_tails(tails, key_cache);
  const Batch batch(block_table, seq_lens, query_start_loc, B);
  float* tail_data = tails.data_ptr<float>();

  // One task per (request, KV head): its started blocks in increasing order, each tail from the last.
  std::vector<Task> tasks;
  for (int64_t i = 0; i < static_cast<int64_t>(batch.spans.size()); ++i) {
    const Span& sp = batch.spans[i];
    const int64_t first = (sp.p0 + B - 1) / B, last = sp.p1() / B;
    if (first > last) continue;
    const int64_t cost = (last - first + 1) * B * D;
    for (int64_t h = 0; h < num_kv_heads; ++h) tasks.push_back({i, h, first, last + 1, cost});
  }
  dispatch_cache_dtype(key_cache.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const PagedRows<T> keys(key_cache), values(value_cache);
    run_tasks(tasks, 1, D, [&](const Task& task, Scratch& s) {
      const Span& sp = batch.spans[task.span];
      const int64_t pool_head = head_offset + task.head;
      const auto tail_of = [&](int64_t b) {
        return tail_data + batch.block(sp.req, b * B) * tails.stride(0) + pool_head * tails.stride(1);
      };
      float* key_sum = s.key_sum.data();
      float* value_sum = s.value_sum.data();
      const int64_t first = task.q_begin;
      if ((first - 1) * B > sink) {  // start from tail(first - 1), written in an earlier step
        const float* prev = tail_of(first - 1);
        std::copy(prev, prev + D, key_sum);
        std::copy(prev + tails.stride(2), prev + tails.stride(2) + D, value_sum);
      } else {
        std::fill(key_sum, key_sum + D, 0.f);
        std::fill(value_sum, value_sum + D, 0.f);
      }
      for (int64_t b = first; b < task.q_end; ++b) {
        for (int64_t pos = std::max(sink, (b - 1) * B); pos < b * B; ++pos) {  // empty when b * B <= S
          const int64_t block = batch.block(sp.req, pos), slot = pos % B;
          add_as_float(keys.row(block, pool_head, slot), key_sum, D);
          add_as_float(values.row(block, pool_head, slot), value_sum, D);
        }
        float* tail = tail_of(b);
        std::copy(key_sum, key_sum + D, tail);
        std::copy(value_sum, value_sum + D, tail + tails.stride(2));
      }
    });
  });
}

namespace {

// One token's rows: the n selected heads of key/value (row i is key head kv_head(i)) into pool heads
// [head_offset, head_offset + n) of one cache slot, converted to the cache dtype as torch's .to does
// (through float, one rounding).
template <typename Src, typename Dst>
void copy_row(const Src* src, Dst* dst, int64_t D) {
  if constexpr (std::is_same_v<Src, Dst>) {
    std::memcpy(dst, src, D * sizeof(Dst));
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<Dst>(static_cast<float>(src[d]));
  }
}

}  // namespace

void store_kv(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& key,
              const at::Tensor& value, const at::Tensor& slot_mapping, int64_t head_offset,
              const std::optional<at::Tensor>& kv_heads) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "key and value must be [num_tokens, heads, head_size] ",
              "of one shape, got ", key.sizes(), " and ", value.sizes());
  TORCH_CHECK(key.device().is_cpu() && value.device().is_cpu(), "key and value must be on the CPU");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "key and value differ in dtype");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "key and value rows (last dim) must be contiguous");
  const IntRead heads = kv_heads.has_value() ? IntRead(*kv_heads, "kv_heads") : IntRead();
  for (int64_t i = 0; i < heads.size(); ++i)
    TORCH_CHECK(heads[i] >= 0 && heads[i] < key.size(1), "kv_heads[", i, "] = ", heads[i], " is outside key's ",
                key.size(1), " heads");
  const int64_t n = heads.defined() ? heads.size() : key.size(1);
  check_cache_pair(key_cache, value_cache, head_offset, n);
  const int64_t T = key.size(0), D = key.size(2), B = key_cache.size(2), num_slots = key_cache.size(0) * B;
  TORCH_CHECK(D == key_cache.size(3), "key head_size ", D, " != cache head_size ", key_cache.size(3));
  const IntRead slot(slot_mapping, "slot_mapping");
  TORCH_CHECK(slot.size() >= T, "slot_mapping has ", slot.size(), " entries for ", T, " tokens");
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slot[t] < num_slots, "slot_mapping[", t, "] = ", slot[t], " is outside the pool's ", num_slots,
                " slots");
  dispatch_cache_dtype(key.scalar_type(), [&](auto src_tag) {
    using Src = decltype(src_tag);
    dispatch_cache_dtype(key_cache.scalar_type(), [&](auto dst_tag) {
      using Dst = decltype(dst_tag);
      const Src* k_in = key.data_ptr<Src>();
      const Src* v_in = value.data_ptr<Src>();
      Dst* k_out = key_cache.data_ptr<Dst>();
      Dst* v_out = value_cache.data_ptr<Dst>();
      const auto copy_tokens = [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          if (slot[t] < 0) continue;  // padding
          const int64_t block = slot[t] / B, offset = slot[t] % B;
          for (int64_t i = 0; i < n; ++i) {
            const int64_t h = heads.defined() ? heads[i] : i;
            const int64_t cache_at = block * key_cache.stride(0) + (head_offset + i) * key_cache.stride(1) +
                                     offset * key_cache.stride(2);
            const int64_t value_at = block * value_cache.stride(0) + (head_offset + i) * value_cache.stride(1) +
                                     offset * value_cache.stride(2);
            copy_row(k_in + t * key.stride(0) + h * key.stride(1), k_out + cache_at, D);
            copy_row(v_in + t * value.stride(0) + h * value.stride(1), v_out + value_at, D);
          }
        }
      };
      // A decode step's rows are a few KiB: threads only for long prefill chunks.
      const int64_t grain = std::max<int64_t>(1, kParallelMinCopy / std::max<int64_t>(1, 2 * n * D));
      at::parallel_for(0, T, grain, copy_tokens);
    });
  });
}

// One layer's step in one pool, in one call (the decode hot path makes one call per layer and pool
// instead of four: store, tails, attention, and the copy of the output heads into the layer's output).
// query/out: the layer's heads [T, Hq, D]; key/value: the layer's KV heads [T, Hkv, D]; kv_heads:
// which of them the pool heads [head_offset, head_offset + num_kv_heads) hold (absent: all, in order).
void retrieval_step(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& query,
                    const at::Tensor& key, const at::Tensor& value, const at::Tensor& slot_mapping,
                    const at::Tensor& out, const at::Tensor& block_table, const at::Tensor& seq_lens,
                    const at::Tensor& query_start_loc, int64_t head_offset, int64_t num_kv_heads,
                    const std::optional<at::Tensor>& kv_heads, double scale) {
  const HeadMap heads(kv_heads, num_kv_heads, key.size(1));  // checked before anything is written
  const int64_t g = check_query(query, key_cache, key.size(1));
  store_kv(key_cache, value_cache, key, value, slot_mapping, head_offset, kv_heads);
  paged_attention_into(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, head_offset,
                       num_kv_heads, g, heads, scale, out);
}

void local_step(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& tails,
                const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                const at::Tensor& slot_mapping, const at::Tensor& out, const at::Tensor& block_table,
                const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                const std::optional<at::Tensor>& prompt_lens, const std::optional<at::Tensor>& windows,
                int64_t head_offset, int64_t num_kv_heads, const std::optional<at::Tensor>& kv_heads, int64_t sink,
                int64_t window, bool compensation, bool exact_prefill, double scale) {
  const HeadMap heads(kv_heads, num_kv_heads, key.size(1));  // checked before anything is written
  const int64_t g = check_query(query, key_cache, key.size(1));
  store_kv(key_cache, value_cache, key, value, slot_mapping, head_offset, kv_heads);
  write_block_tails(key_cache, value_cache, tails, block_table, seq_lens, query_start_loc, head_offset, num_kv_heads,
                    sink);
  local_attention_into(query, key_cache, value_cache, tails, block_table, seq_lens, query_start_loc, prompt_lens,
                       windows, head_offset, num_kv_heads, g, heads, sink, window, compensation, exact_prefill, scale,
                       out);
}

}  // namespace razor

TORCH_LIBRARY_FRAGMENT(razor_vllm, m) {
  m.def(
      "paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor query_start_loc, int head_offset, int num_kv_heads, float scale) -> Tensor");
  m.def(
      "local_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor tails, Tensor block_table, "
      "Tensor seq_lens, Tensor query_start_loc, Tensor? prompt_lens, Tensor? windows, int head_offset, "
      "int num_kv_heads, int sink, int window, bool compensation, bool exact_prefill, float scale) -> Tensor");
  m.def(
      "store_kv(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor key, Tensor value, Tensor slot_mapping, "
      "int head_offset, Tensor? kv_heads=None) -> ()");
  m.def(
      "write_block_tails(Tensor key_cache, Tensor value_cache, Tensor(a!) tails, Tensor block_table, "
      "Tensor seq_lens, Tensor query_start_loc, int head_offset, int num_kv_heads, int sink) -> ()");
  m.def(
      "retrieval_step(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor query, Tensor key, Tensor value, "
      "Tensor slot_mapping, Tensor(c!) out, Tensor block_table, Tensor seq_lens, Tensor query_start_loc, "
      "int head_offset, int num_kv_heads, Tensor? kv_heads, float scale) -> ()");
  m.def(
      "local_step(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor(c!) tails, Tensor query, Tensor key, "
      "Tensor value, Tensor slot_mapping, Tensor(d!) out, Tensor block_table, Tensor seq_lens, "
      "Tensor query_start_loc, Tensor? prompt_lens, Tensor? windows, int head_offset, int num_kv_heads, "
      "Tensor? kv_heads, int sink, int window, bool compensation, bool exact_prefill, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(razor_vllm, CPU, m) {
  m.impl("paged_attention", &razor::paged_attention);
  m.impl("local_attention", &razor::local_attention);
  m.impl("write_block_tails", &razor::write_block_tails);
  m.impl("store_kv", &razor::store_kv);
  m.impl("retrieval_step", &razor::retrieval_step);
  m.impl("local_step", &razor::local_step);
}

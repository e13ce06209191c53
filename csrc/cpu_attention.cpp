// Decode attention on the CPU: one query per row over that row's part of a KV cache, the
// attention of one generation step (gptfast.ops.decode_attention's float32 CPU path), or
// T queries per row at the row's T newest positions, causal among them: a speculative
// verify step's (gptfast.ops.causal_attention's float32 CPU path with per-row q_positions).
//
// Why C++. At GPT-2's decode shapes (B = 1..8 rows, 12 heads of 64, a cache of ~50-100
// positions) the arithmetic is small (B x 12 x 80 x 64 multiply-adds for q.K, as many for
// p.V) and the torch path (gptfast.ops.torch_path.decode_attention: SDPA with a mask built
// from cache_lens, a finite-check and, at batch > 1, temporaries; stale slots may hold NaN)
// spends most of its time on op dispatch, masks and allocations. A direct loop over each
// row's valid positions needs no mask at all: it never reads past a row's length.
// On the 2-core dev machine (Xeon, AVX-512), H = 12, D = 64, S = 80, the op called
// straight: batch 1 ~9 us against the torch path's ~30; batch 8 ~70 us against ~270. At
// batch 8 the kernel is bound by reading the caches (3.9 MB of K and V, more than the two
// cores' L2 caches; one core alone reads ~20 GB/s from L3 here), not by arithmetic; at
// batch 1 about 3 us of the 9 are the dispatcher's call overhead.
//
// Semantics: those of the torch path and of the reference twin
// (gptfast.reference.functional.decode_attention):
//   q (B, H, D) float32; k_cache, v_cache (B, H_kv, S, D) float32, H_kv dividing H
//   (grouped-query: query head h reads kv head h / (H / H_kv)); any strides for all three
//   (q is a slice of the QKV projection, the caches slices of a preallocated cache): they
//   are indexed through their strides, never copied;
//   cache_lens (B,) int32/int64, each clamped into [1, S]; key_start (B,) int32/int64,
//   optional (a negative start counts as 0): row b reads positions key_start[b] .. len_b - 1
//   only, and outputs zeros when that range is empty. Positions outside a row's range are
//   never read, so stale slots (NaN from an uninitialised cache, garbage) cannot leak in.
//   Returns (B, H, D) float32, contiguous.
//   q (B, H, T, D): the same with T queries per row, query i at position len_b - T + i, which
//   reads positions key_start[b] .. len_b - T + i (zeros when that is empty): causal
//   attention at consecutive positions ending at len_b - 1 (twin:
//   gptfast.reference.functional.causal_attention with q_positions). Returns (B, H, T, D)
//   float32 laid out (B, T, H, D) in memory (a transposed view), the layout of the rows the
//   output projection reads next.
// Math, in float32: s_j = scale * (q . k_j); m = max_j s_j; p_j = exp(s_j - m);
// out = (sum_j p_j v_j) / (sum_j p_j). The tests hold it to the error-ratio rule against
// the float64 twin (its error within 3x of the float32 twin's).
//
// Loops. One task is one (row, head, query) triple, in three passes over that query's range:
//   1. scores: s_j = scale * (q . k_j), one dot product per position, and their maximum;
//   2. exp: p_j = exp(s_j - m) in place (exp_nonpos, csrc/cpu_math.h: a plain loop the compiler
//      vectorises, ~1.4 ulp; std::exp is a scalar call per position);
//   3. p.V: out = sum_j p_j v_j, D in column blocks of kVecs vectors held in registers
//      while j runs over the range (so the accumulator never goes through memory), then
//      scaled by 1 / sum_j p_j.
// The dot products and the p.V blocks are written once over an instruction-set struct
// (load, fma, horizontal sum), like csrc/cpu_linear.cpp: AVX-512F, AVX2+FMA, or one lane
// (plain floats), the best chosen at run time (__builtin_cpu_supports). A first version
// with plain loops left to the auto-vectoriser (and std::exp) took 21 us at batch 1 where
// this takes 9: GCC 12 kept a dot product's partial sums on the stack and added them with
// scalar code, and the p.V accumulator went through memory at every position. The head
// dimension D need not be a multiple of the vector width: the remainder runs one lane wide.
// The vector paths need the caches' last stride to be 1 (a cache is always laid out so);
// any other last stride runs the one-lane path with the stride in the index. q's row is
// first copied into a contiguous buffer (D floats), so its strides cost nothing after.
// The row's scores live in a per-thread buffer of the longest row's range.
//
// Work split: at::parallel_for over the B x H x T (row, head, query) tasks (inline OpenMP,
// on once the extension is compiled with -fopenmp, as gptfast.runtime.extension and setup.py do),
// with a grain of at least kGrainMacs multiply-adds per range of tasks, so a small problem
// (batch 1, a short cache) stays on the calling thread instead of waking the others.
//
// Registered with the dispatcher (not pybind11) in the gptfast_cpu namespace, reachable
// once the extension module gptfast._C is imported:
//   decode_attention(q, k_cache, v_cache, cache_lens, scale, key_start=None) -> out
//   decode_attention_isa(q, k_cache, v_cache, cache_lens, scale, key_start, isa) -> out
//     the same on a chosen instruction set (0 one lane, 1 AVX2, 2 AVX-512; -1 the best),
//     so the tests can run every path this CPU supports
//   decode_attention_best_isa() -> int
//   write_kv(qkv, k_cache, v_cache, positions)  the KV-cache write of a step (see there)
// gptfast.ops.decode_attention is the public face (validation, the values of cache_lens
// checked on the host, dispatch); the checks here (TORCH_CHECK: a RuntimeError in Python)
// keep a direct call with bad operands from reading out of bounds.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "cpu_math.h"

namespace {

using at::Tensor;

using gptfast_cpu::best_isa, gptfast_cpu::exp_nonpos, gptfast_cpu::kIsaAuto, gptfast_cpu::kIsaAvx2,
    gptfast_cpu::kIsaAvx512, gptfast_cpu::kIsaScalar;
// Vectors of D accumulated at once in the p.V pass (4 x 16 = GPT-2's 64 in AVX-512).
constexpr int kVecs = 4;
// Multiply-adds (q.K and p.V together) up to which a range of tasks is not
// split across threads: waking a second thread costs about as much as it saves on a small
// problem. On the 2-core dev machine, batch 1, H = 12, D = 64: S = 32 (49k) took 5.5 us on
// one thread and 6.5 on two, S = 80 (123k) 9.2 on one and 8.3 on two; batch 8 gains ~2.5x
// from two threads (the two cores' caches and bandwidth). Grains of 2^12, 2^14, 2^16 and
// 2^18 and "never split" were timed; 2^14 and 2^16 differed by less than the noise.
constexpr int64_t kGrainMacs = 1 << 16;

// One call's operands, as raw pointers and element strides.
struct Problem {
  const float* q;
  const float* k;
  const float* v;
  float* out;                      // (B, T, H, D) contiguous
  const int64_t* begin;            // (B,) first position each row reads
  const int64_t* end;              // (B,) one past the last query's last (begin == end: no position)
  int64_t heads, group, head_dim;  // group = H / H_kv
  int64_t tokens;                  // T: queries per row (head), at the row's last T positions
  int64_t q_sb, q_sh, q_st, q_sd;
  int64_t k_sb, k_sh, k_ss, k_sd;
  int64_t v_sb, v_sh, v_ss, v_sd;
  float scale;
};

// ---- instruction sets ------------------------------------------------------------------

// One lane: plain floats (the fallback, the strided path and every path's remainder of D).
struct Scalar {
  using Vec = float;
  static constexpr int64_t kLanes = 1;
  static Vec zero() { return 0.f; }
  static Vec load(const float* p) { return *p; }
  static void store(float* p, Vec v) { *p = v; }
  static Vec broadcast(float x) { return x; }
  static Vec fma(Vec a, Vec b, Vec c) { return a * b + c; }
  static float sum(Vec v) { return v; }
};

#ifdef GPTFAST_CPU_X86

struct Avx2 {
  using Vec = __m256;
  static constexpr int64_t kLanes = 8;
  __attribute__((target("avx2,fma"))) static Vec zero() { return _mm256_setzero_ps(); }
  __attribute__((target("avx2,fma"))) static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  __attribute__((target("avx2,fma"))) static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  __attribute__((target("avx2,fma"))) static Vec broadcast(float x) { return _mm256_set1_ps(x); }
  __attribute__((target("avx2,fma"))) static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  __attribute__((target("avx2,fma"))) static float sum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

struct Avx512 {
  using Vec = __m512;
  static constexpr int64_t kLanes = 16;
  __attribute__((target("avx512f"))) static Vec zero() { return _mm512_setzero_ps(); }
  __attribute__((target("avx512f"))) static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  __attribute__((target("avx512f"))) static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  __attribute__((target("avx512f"))) static Vec broadcast(float x) { return _mm512_set1_ps(x); }
  __attribute__((target("avx512f"))) static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  __attribute__((target("avx512f"))) static float sum(Vec v) { return _mm512_reduce_add_ps(v); }
};

#endif


// ---- the passes ----------------------------------------------------------------------------

// a . b over n elements (b `stride` apart, 1 when kUnit); vectors of I, the rest one lane.
template <class I, bool kUnit>
inline float dot(const float* a, const float* b, int64_t stride, int64_t n) {
  const int64_t sb = kUnit ? 1 : stride;
  typename I::Vec acc = I::zero();
  int64_t d = 0;
  for (; d + I::kLanes <= n; d += I::kLanes) acc = I::fma(I::load(a + d), I::load(b + d * sb), acc);
  float total = I::sum(acc);
  for (; d < n; ++d) total += a[d] * b[d * sb];
  return total;
}

// out[0 .. NV x lanes) = sum over j < n of p[j] * v[j * row + (0 .. NV x lanes) * stride].
template <class I, int NV, bool kUnit>
inline void weighted_sum(const float* p, const float* v, int64_t row, int64_t stride, int64_t n, float* out) {
  const int64_t sv = kUnit ? 1 : stride;
  typename I::Vec acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = I::zero();
  for (int64_t j = 0; j < n; ++j) {
    const typename I::Vec pj = I::broadcast(p[j]);
    const float* vj = v + j * row;
    for (int i = 0; i < NV; ++i) acc[i] = I::fma(pj, I::load(vj + i * I::kLanes * sv), acc[i]);
  }
  for (int i = 0; i < NV; ++i) I::store(out + i * I::kLanes, acc[i]);
}

// Tasks [t0, t1) of the B x H x T (row, head, query) triples, a (row, head)'s queries
// adjacent (they read the same keys, still in cache); `scores` holds the longest row's
// range, `qrow` D floats (the calling thread's buffers). Query i of T reads up to position
// end - T + i of its row (causal among the row's new tokens).
template <class I, bool kUnit>
void attend(const Problem& p, int64_t t0, int64_t t1, float* scores, float* qrow) {
  constexpr int64_t L = I::kLanes;
  const int64_t dim = p.head_dim, tokens = p.tokens;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t bh = t / tokens, i = t % tokens;
    const int64_t b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
    float* out = p.out + ((b * tokens + i) * p.heads + h) * dim;
    const int64_t j0 = p.begin[b], n = p.end[b] - (tokens - 1 - i) - j0;
    if (n <= 0) {  // nothing to attend to (key_start past the query's position): zeros
      std::fill(out, out + dim, 0.f);
      continue;
    }
    const float* q = p.q + b * p.q_sb + h * p.q_sh + i * p.q_st;
    for (int64_t d = 0; d < dim; ++d) qrow[d] = q[d * p.q_sd];
    const float* k = p.k + b * p.k_sb + hk * p.k_sh + j0 * p.k_ss;
    const float* v = p.v + b * p.v_sb + hk * p.v_sh + j0 * p.v_ss;

    float top = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      const float s = dot<I, kUnit>(qrow, k + j * p.k_ss, p.k_sd, dim) * p.scale;
      scores[j] = s;
      top = std::max(top, s);
    }
    for (int64_t j = 0; j < n; ++j) scores[j] = exp_nonpos(scores[j] - top);
    float total = 0.f;
    for (int64_t j = 0; j < n; ++j) total += scores[j];

    int64_t d = 0;
    for (; d + kVecs * L <= dim; d += kVecs * L)
      weighted_sum<I, kVecs, kUnit>(scores, v + d * p.v_sd, p.v_ss, p.v_sd, n, out + d);
    for (; d + L <= dim; d += L) weighted_sum<I, 1, kUnit>(scores, v + d * p.v_sd, p.v_ss, p.v_sd, n, out + d);
    for (; d < dim; ++d) weighted_sum<Scalar, 1, kUnit>(scores, v + d * p.v_sd, p.v_ss, p.v_sd, n, out + d);
    const float inv = 1.f / total;  // total >= 1: the maximum contributes exp(0) = 1 (unless NaN)
    for (d = 0; d < dim; ++d) out[d] *= inv;
  }
}

#ifdef GPTFAST_CPU_X86
__attribute__((target("avx2,fma"), flatten)) void attend_avx2(const Problem& p, int64_t t0, int64_t t1, float* s,
                                                              float* q) {
  attend<Avx2, true>(p, t0, t1, s, q);
}
__attribute__((target("avx512f"), flatten)) void attend_avx512(const Problem& p, int64_t t0, int64_t t1, float* s,
                                                               float* q) {
  attend<Avx512, true>(p, t0, t1, s, q);
}
#endif

void attend_isa(const Problem& p, int64_t isa, bool unit, int64_t t0, int64_t t1, float* s, float* q) {
  if (!unit) return attend<Scalar, false>(p, t0, t1, s, q);
#ifdef GPTFAST_CPU_X86
  if (isa == kIsaAvx512) return attend_avx512(p, t0, t1, s, q);
  if (isa == kIsaAvx2) return attend_avx2(p, t0, t1, s, q);
#endif
  attend<Scalar, true>(p, t0, t1, s, q);
}

// ---- the op ----------------------------------------------------------------------------------

// Element i of a 1-d int32/int64 CPU tensor, through its stride.
int64_t read_int(const Tensor& t, int64_t i) {
  const int64_t at = i * t.stride(0);
  return t.scalar_type() == at::kInt ? static_cast<int64_t>(t.data_ptr<int32_t>()[at]) : t.data_ptr<int64_t>()[at];
}

void check_rows(const char* what, const Tensor& t, int64_t batch) {
  TORCH_CHECK(t.device().is_cpu(), "decode_attention: ", what, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "decode_attention: ", what,
              " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "decode_attention: ", what, " must have shape (", batch,
              ",) (one per batch row), got ", t.sizes());
}

Tensor decode_attention_isa(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_lens,
                            double scale, const c10::optional<Tensor>& key_start, int64_t isa) {
  const char* op = "decode_attention";
  for (const Tensor* t : {&q, &k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": q, k_cache and v_cache must be CPU tensors, got one on ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": q, k_cache and v_cache must be float32, got ",
                t->scalar_type());
  }
  TORCH_CHECK(q.dim() == 3 || q.dim() == 4, op, ": q must have shape (B, H, D) or (B, H, T, D), got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, op,
              ": k_cache and v_cache must have shape (B, H_kv, S, D), got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), op, ": k_cache ", k_cache.sizes(), " and v_cache ",
              v_cache.sizes(), " differ in shape");
  const bool several = q.dim() == 4;  // T queries per row
  const int64_t batch = q.size(0), heads = q.size(1), tokens = several ? q.size(2) : 1, dim = q.size(-1);
  const int64_t kv_heads = k_cache.size(1), seq_len = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == batch && k_cache.size(3) == dim, op, ": caches of shape ", k_cache.sizes(),
              " do not match q of shape ", q.sizes(), ": expected (", batch, ", H_kv, S, ", dim, ")");
  TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, op, ": k_cache has ", kv_heads,
              " heads, which must divide the ", heads, " query heads (grouped-query attention)");
  TORCH_CHECK(seq_len >= 1, op, ": the cache has no positions (S = 0)");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_rows("cache_lens", cache_lens, batch);
  const bool has_start = key_start.has_value() && key_start->defined();
  if (has_start) check_rows("key_start", *key_start, batch);
  const int64_t best = best_isa();
  if (isa == kIsaAuto) isa = best;
  TORCH_CHECK(isa >= kIsaScalar && isa <= best, op, ": isa ", isa, " is not supported on this CPU (best ", best, ")");

  // (B, T, H, D) in memory: the rows' T tokens of H heads each, as the next product reads them.
  const auto options = q.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor memory = several ? at::empty({batch, tokens, heads, dim}, options) : at::empty({batch, heads, dim}, options);
  Tensor out = several ? memory.transpose(1, 2) : memory;
  if (out.numel() == 0) return out;

  // Each row's range of positions: [clamp(key_start, 0, len), len), len = clamp(cache_lens, 1, S).
  std::vector<int64_t> begin(batch), end(batch);
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    end[b] = std::min(std::max(read_int(cache_lens, b), int64_t{1}), seq_len);
    begin[b] = has_start ? std::min(std::max(read_int(*key_start, b), int64_t{0}), end[b]) : 0;
    longest = std::max(longest, end[b] - begin[b]);
  }

  Problem p{};
  p.q = q.data_ptr<float>(), p.k = k_cache.data_ptr<float>(), p.v = v_cache.data_ptr<float>();
  p.out = memory.data_ptr<float>();
  p.begin = begin.data(), p.end = end.data();
  p.heads = heads, p.group = heads / kv_heads, p.head_dim = dim, p.tokens = tokens;
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_st = several ? q.stride(2) : 0, p.q_sd = q.stride(-1);
  p.k_sb = k_cache.stride(0), p.k_sh = k_cache.stride(1), p.k_ss = k_cache.stride(2), p.k_sd = k_cache.stride(3);
  p.v_sb = v_cache.stride(0), p.v_sh = v_cache.stride(1), p.v_ss = v_cache.stride(2), p.v_sd = v_cache.stride(3);
  p.scale = static_cast<float>(scale);
  const bool unit = (p.k_sd == 1 || dim == 1) && (p.v_sd == 1 || dim == 1);

  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, 2 * longest * dim));
  at::parallel_for(0, batch * heads * tokens, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> buffer(longest + dim);
    attend_isa(p, isa, unit, t0, t1, buffer.data(), buffer.data() + longest);
  });
  return out;
}

Tensor decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_lens,
                        double scale, const c10::optional<Tensor>& key_start) {
  return decode_attention_isa(q, k_cache, v_cache, cache_lens, scale, key_start, kIsaAuto);
}

int64_t decode_attention_best_isa() { return best_isa(); }

// The KV-cache write of a decode / verify step on the CPU (gptfast.ops.torch_path.write_kv's
// semantics, which the packed layers' QKV projection otherwise runs as an arange, a clamp
// and two advanced-index writes: ~25 us a layer at batch 1, against ~2 here).
// qkv (B, T, N) float32, columns [q | k | v] with k and v head-major (column
// Q + h * D + d, Q = N - 2 * H_kv * D); k_cache, v_cache (B_max >= B, H_kv, S, D) float32;
// positions (B, T) int32/int64, each clamped into [0, S). Token t of row b is written to slot
// positions[b, t] of cache row b. Any strides.
void write_kv(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache, const Tensor& positions) {
  const char* op = "write_kv";
  for (const Tensor* t : {&qkv, &k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, op,
                ": qkv, k_cache and v_cache must be float32 CPU tensors, got ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(qkv.dim() == 3, op, ": qkv must have shape (B, T, N), got ", qkv.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
              ": k_cache and v_cache must have one shape (B_max, H_kv, S, D), got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), n = qkv.size(2);
  const int64_t kv_heads = k_cache.size(1), seq_len = k_cache.size(2), dim = k_cache.size(3);
  TORCH_CHECK(k_cache.size(0) >= batch && seq_len >= 1, op, ": caches of shape ", k_cache.sizes(),
              " cannot hold the ", batch, " rows of qkv ", qkv.sizes());
  TORCH_CHECK(n > 2 * kv_heads * dim, op, ": qkv has ", n, " columns, not more than 2 * H_kv * D = ",
              2 * kv_heads * dim, " (columns [q | k | v])");
  TORCH_CHECK(positions.device().is_cpu() && (positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong),
              op, ": positions must be an int32 or int64 CPU tensor, got ", positions.scalar_type());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == batch && positions.size(1) == tokens, op,
              ": positions must have shape (", batch, ", ", tokens, "), got ", positions.sizes());
  const int64_t q_cols = n - 2 * kv_heads * dim;
  const float* src = qkv.data_ptr<float>();
  const int64_t s_b = qkv.stride(0), s_t = qkv.stride(1), s_n = qkv.stride(2);
  const bool is_int = positions.scalar_type() == at::kInt;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t at_pos = b * positions.stride(0) + t * positions.stride(1);
      const int64_t raw = is_int ? positions.data_ptr<int32_t>()[at_pos] : positions.data_ptr<int64_t>()[at_pos];
      const int64_t slot = std::min(std::max(raw, int64_t{0}), seq_len - 1);
      for (int64_t which = 0; which < 2; ++which) {
        const Tensor& cache = which == 0 ? k_cache : v_cache;
        float* dst_base = cache.data_ptr<float>() + b * cache.stride(0) + slot * cache.stride(2);
        const float* row = src + b * s_b + t * s_t + (q_cols + which * kv_heads * dim) * s_n;
        for (int64_t h = 0; h < kv_heads; ++h) {
          float* dst = dst_base + h * cache.stride(1);
          const float* from = row + h * dim * s_n;
          if (cache.stride(3) == 1 && s_n == 1) {
            std::memcpy(dst, from, dim * sizeof(float));
          } else {
            for (int64_t d = 0; d < dim; ++d) dst[d * cache.stride(3)] = from[d * s_n];
          }
        }
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptfast_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, float scale, "
        "Tensor? key_start=None) -> Tensor");
  m.def("decode_attention_isa(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, float scale, "
        "Tensor? key_start, int isa) -> Tensor");
  m.def("decode_attention_best_isa() -> int", &decode_attention_best_isa);
  m.def("write_kv(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions) -> ()");
}

TORCH_LIBRARY_IMPL(gptfast_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_attention_isa", &decode_attention_isa);
  m.impl("write_kv", &write_kv);
}

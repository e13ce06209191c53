// Weight-only int8 linear layer on the CPU: y = (x @ w^T) * scale + bias, with w int8.
//
// A decode step multiplies a few activation rows by every weight matrix, so it is bound
// by how fast the weights stream from memory; int8 weights are a quarter of fp32's bytes.
// This kernel reads each weight row once per tile of activation rows, widens the int8
// values to fp32 in registers (sign-extend + convert: exact, |w| <= 127) and accumulates
// x * w in fp32 with FMA. The per-output-channel scale factors out of the sum over K, so
// it is applied once per output, after the sum (the reference twin dequantises first;
// the two agree to fp32 rounding of the sum).
//
// Why not VNNI: vpdpbusd multiplies int8 by int8. Using it would mean quantising the
// activations too (a different, lossier scheme than weight-only int8, and one the twin
// does not compute), so the vector paths here are plain AVX-512F and AVX2+FMA.
//
// Work split: at::parallel_for over output channels (each thread streams its own weight
// rows); inside, tiles of 4 channels x MT activation rows keep 4*MT accumulators in
// registers, so one widened weight vector feeds MT FMAs and one activation vector feeds
// 4. The instruction set is chosen at run time (__builtin_cpu_supports): AVX-512F, else
// AVX2+FMA, else a scalar loop. The op takes an `isa` argument (-1 = best available) so
// the tests can run every path this CPU supports against the twin.
//
// Registered with the dispatcher (not pybind11) as torch.ops.gptfast_cpu.int8_linear,
// reachable once the extension module gptfast._C is imported; gptfast.ops.int8_linear is
// the public face (validation, dispatch). The kernel assumes what that op checks: x (M,K)
// fp32 contiguous, w (N,K) int8 contiguous, scale (N,) fp32, bias (N,) fp32 or absent.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

namespace {

using at::Tensor;

constexpr int64_t kIsaAuto = -1, kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2;
constexpr int64_t kTileN = 4;  // output channels per register tile

// One call's operands, as raw pointers (row-major, contiguous).
struct Problem {
  const float* x;
  const int8_t* w;
  const float* scale;
  const float* bias;  // nullptr: no bias
  float* y;
  int64_t m, k, n;
};

inline float finish(const Problem& p, float sum, int64_t channel) {
  float out = sum * p.scale[channel];
  return p.bias ? out + p.bias[channel] : out;
}

// ---- scalar fallback (also the tail of the vector paths) ------------------------------

void scalar_channels(const Problem& p, int64_t n_begin, int64_t n_end) {
  for (int64_t row = 0; row < p.m; ++row) {
    const float* x = p.x + row * p.k;
    for (int64_t c = n_begin; c < n_end; ++c) {
      const int8_t* w = p.w + c * p.k;
      float sum = 0.f;
      for (int64_t i = 0; i < p.k; ++i) sum += x[i] * static_cast<float>(w[i]);
      p.y[row * p.n + c] = finish(p, sum, c);
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GPTFAST_INT8_X86 1

// ---- the vector tile, over an instruction set's traits -------------------------------------

// AVX2 + FMA: 8 lanes.
struct Avx2 {
  using Vec = __m256;
  static constexpr int64_t kLanes = 8;
  __attribute__((target("avx2,fma"))) static Vec zero() { return _mm256_setzero_ps(); }
  __attribute__((target("avx2,fma"))) static Vec load(const float* x) { return _mm256_loadu_ps(x); }
  __attribute__((target("avx2,fma"))) static Vec widen(const int8_t* w) {
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  }
  __attribute__((target("avx2,fma"))) static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  __attribute__((target("avx2,fma"))) static float sum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
  }
};

// AVX-512F: 16 lanes.
struct Avx512 {
  using Vec = __m512;
  static constexpr int64_t kLanes = 16;
  __attribute__((target("avx512f"))) static Vec zero() { return _mm512_setzero_ps(); }
  __attribute__((target("avx512f"))) static Vec load(const float* x) { return _mm512_loadu_ps(x); }
  __attribute__((target("avx512f"))) static Vec widen(const int8_t* w) {
    __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
  }
  __attribute__((target("avx512f"))) static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  __attribute__((target("avx512f"))) static float sum(Vec v) { return _mm512_reduce_add_ps(v); }
};

// 4 channels (c0..c0+3) x MT rows (r0..r0+MT-1); the K tail past the last full vector is
// summed in scalar. Its callers (avx2_tile / avx512_tile below) carry the `target` and
// `flatten` attributes, so the traits and their intrinsics inline into them.
template <class I, int MT>
inline void tile(const Problem& p, int64_t r0, int64_t c0) {
  typename I::Vec acc[MT][kTileN];
  for (int r = 0; r < MT; ++r)
    for (int c = 0; c < kTileN; ++c) acc[r][c] = I::zero();
  const int8_t* w = p.w + c0 * p.k;
  const float* x = p.x + r0 * p.k;
  const int64_t kv = p.k - p.k % I::kLanes;
  for (int64_t i = 0; i < kv; i += I::kLanes) {
    typename I::Vec wv[kTileN];
    for (int c = 0; c < kTileN; ++c) wv[c] = I::widen(w + c * p.k + i);
    for (int r = 0; r < MT; ++r) {
      typename I::Vec xv = I::load(x + r * p.k + i);
      for (int c = 0; c < kTileN; ++c) acc[r][c] = I::fma(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MT; ++r) {
    for (int c = 0; c < kTileN; ++c) {
      float sum = I::sum(acc[r][c]);
      for (int64_t i = kv; i < p.k; ++i) sum += x[r * p.k + i] * static_cast<float>(w[c * p.k + i]);
      p.y[(r0 + r) * p.n + c0 + c] = finish(p, sum, c0 + c);
    }
  }
}

template <int MT>
__attribute__((target("avx2,fma"), flatten)) void avx2_tile(const Problem& p, int64_t r0, int64_t c0) { tile<Avx2, MT>(p, r0, c0); }

template <int MT>
__attribute__((target("avx512f"), flatten)) void avx512_tile(const Problem& p, int64_t r0, int64_t c0) {
  tile<Avx512, MT>(p, r0, c0);
}

// Rows in tiles of MAX_MT (then the remainder), for the channel tiles in [n_begin, n_end);
// the channels past the last full tile of 4 go to the scalar loop.
template <void (*T1)(const Problem&, int64_t, int64_t), void (*T2)(const Problem&, int64_t, int64_t),
          void (*T3)(const Problem&, int64_t, int64_t), void (*T4)(const Problem&, int64_t, int64_t)>
void tiled_channels(const Problem& p, int64_t n_begin, int64_t n_end, int64_t max_mt) {
  const int64_t n_tiled = n_begin + (n_end - n_begin) / kTileN * kTileN;
  for (int64_t c0 = n_begin; c0 < n_tiled; c0 += kTileN) {
    int64_t r0 = 0;
    for (; r0 + max_mt <= p.m; r0 += max_mt) (max_mt == 4 ? T4 : T2)(p, r0, c0);
    const int64_t rest = p.m - r0;
    if (rest == 3) T3(p, r0, c0);
    if (rest == 2) T2(p, r0, c0);
    if (rest == 1) T1(p, r0, c0);
  }
  if (n_tiled < n_end) scalar_channels(p, n_tiled, n_end);
}

bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool has_avx512() { return __builtin_cpu_supports("avx512f"); }
#else
bool has_avx2() { return false; }
bool has_avx512() { return false; }
#endif

int64_t best_isa() {
  if (has_avx512()) return kIsaAvx512;
  if (has_avx2()) return kIsaAvx2;
  return kIsaScalar;
}

// The channel range [n_begin, n_end) of every row, with the chosen instruction set.
void run_channels(const Problem& p, int64_t isa, int64_t n_begin, int64_t n_end) {
#ifdef GPTFAST_INT8_X86
  if (isa == kIsaAvx512) {
    // 32 zmm registers: 4x4 accumulators + 4 weight vectors + 1 activation vector fit.
    tiled_channels<avx512_tile<1>, avx512_tile<2>, avx512_tile<3>, avx512_tile<4>>(p, n_begin, n_end, 4);
    return;
  }
  if (isa == kIsaAvx2) {
    // 16 ymm registers: 2x4 accumulators + 4 weight vectors + 1 activation vector fit.
    tiled_channels<avx2_tile<1>, avx2_tile<2>, avx2_tile<1>, avx2_tile<2>>(p, n_begin, n_end, 2);
    return;
  }
#endif
  scalar_channels(p, n_begin, n_end);
}

Tensor int8_linear_cpu(const Tensor& x, const Tensor& w, const Tensor& scale, const c10::optional<Tensor>& bias,
                       int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_linear_cpu: x (M, K) and w (N, K) expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "int8_linear_cpu: x must be contiguous float32");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "int8_linear_cpu: w must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == w.size(0),
              "int8_linear_cpu: scale must be contiguous float32 of shape (N,)");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == w.size(0),
                "int8_linear_cpu: bias must be contiguous float32 of shape (N,)");
  }
  const int64_t best = best_isa();
  if (isa == kIsaAuto) isa = best;
  TORCH_CHECK(isa >= kIsaScalar && isa <= best, "int8_linear_cpu: isa ", isa, " is not supported on this CPU (best ", best,
              ")");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  Problem p{x.data_ptr<float>(), w.data_ptr<int8_t>(), scale.data_ptr<float>(),
            has_bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), m, k, n};
  // Grain: about 64 KiB of weights per task, in whole tiles of 4 channels.
  const int64_t grain = std::max<int64_t>(kTileN, (65536 / std::max<int64_t>(k, 1)) / kTileN * kTileN);
  const int64_t tiles = (n + kTileN - 1) / kTileN;
  at::parallel_for(0, tiles, std::max<int64_t>(1, grain / kTileN), [&](int64_t t_begin, int64_t t_end) {
    run_channels(p, isa, t_begin * kTileN, std::min(n, t_end * kTileN));
  });
  return y;
}

int64_t int8_linear_best_isa() { return best_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptfast_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias, int isa=-1) -> Tensor");
  m.def("int8_linear_best_isa() -> int", &int8_linear_best_isa);
}

TORCH_LIBRARY_IMPL(gptfast_cpu, CPU, m) { m.impl("int8_linear", &int8_linear_cpu); }

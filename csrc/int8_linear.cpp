// Weight-only int8 linear layer on the CPU: y = (x @ w^T) * scale + bias, with w int8.
//
// A decode step multiplies a few activation rows by every weight matrix, so it is bound
// by how fast the weights stream from memory; int8 weights are a quarter of fp32's bytes.
//
// Packed layout. The (N, K) int8 weight is reordered once (int8_pack) into blocks of
// kBlockN = 64 output channels, each block K-major: packed[b][k][c] = w[64 b + c][k],
// the channels past N zero. One k of one block is one 64-byte cache line, and a block
// is one contiguous run of K lines, so each thread streams one sequential region (the
// hardware prefetcher's best case; row-major rows of 768 bytes read four at a time were
// not), and no horizontal sums are needed: the vector lanes are output channels.
//
// Inner loop (weight-only, no activation quantisation). For each k, the 64 weights of
// the block are widened to fp32 in registers (sign-extend + convert: exact, |w| <= 127)
// and each activation row's x[r][k], broadcast, is multiplied into them with FMA: one
// widened line feeds MT rows, and 4 x MT accumulators (4 vectors x MT rows) stay in
// registers. The per-channel scale factors out of the sum over K and is applied once per
// output, with the bias, after the sum. The reference twin dequantises first; the two
// agree to fp32 rounding of the sum (the error-ratio rule of the tests).
//
// Why not VNNI: vpdpbusd multiplies int8 by int8. Using it would mean quantising the
// activations per row to int8 too: an error of about 1% of the largest activation, a
// different and lossier scheme than weight-only int8, far outside the error-ratio rule
// the twin judges by. The vector paths here are plain AVX-512F and AVX2+FMA.
//
// Two schedules:
// - direct (up to kDirectTiles row tiles): every row tile widens the int8 lines as it
//   streams them; with one row tile (small decode batches) each weight byte is read once,
//   straight from memory, and a second tile finds the block in cache;
// - panel (more rows): per block and slice of kPanelK values of k, the int8 weights are
//   widened once into an fp32 panel (32 KiB, L1-resident) and every row tile runs an fp32
//   multiply over it, so the widening is paid once per weight, not once per row tile.
// Row tiles are as few as fit the register budget and as equal in size as can be.
//
// Work split: at::parallel_for over blocks; each thread takes one contiguous range of
// blocks and streams it. (ATen's parallel_for is inline OpenMP: it runs on one thread
// unless the extension is compiled with -fopenmp, as gptfast.runtime.extension and
// setup.py do.) The instruction set is chosen at run time (__builtin_cpu_supports):
// AVX-512F, else AVX2+FMA, else a scalar loop (the same template, one lane wide). The ops take an
// `isa` argument (-1 = best available) so the tests can run every path this CPU supports
// against the twin.
//
// Registered with the dispatcher (not pybind11) in the gptfast_cpu namespace, reachable
// once the extension module gptfast._C is imported:
//   int8_pack(w) -> packed                       (N, K) int8 -> (ceil(N/64), K, 64) int8
//   int8_linear_packed(x, packed, scale, bias, isa)
//   int8_linear(x, w, scale, bias, isa)          packs w for this one call, then as above
//   int8_linear_best_isa()
// gptfast.ops.int8_linear is the public face of int8_linear (validation, dispatch);
// gptfast.generation.cpu_linear calls int8_linear_packed straight for generation.
// The kernels assume what those callers check: x (M, K) fp32 contiguous, scale (N,) fp32,
// bias (N,) fp32 or absent; the shapes are checked here too.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kIsaAuto = -1, kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2;
constexpr int64_t kBlockN = 64;    // output channels per packed block: one cache line per k
constexpr int64_t kPanelK = 128;   // k values per fp32 panel: 128 x 64 x 4 bytes = 32 KiB (L1)
constexpr int64_t kVecs = 4;       // vectors per row of a register tile (64 channels in AVX-512)
constexpr int64_t kDirectTiles = 2;  // row tiles up to which the direct schedule runs
// Software prefetch distance, in 64-byte lines of the packed stream (2 KiB ahead). The
// hardware prefetcher alone left a 2-core decode step at ~16 GB/s from memory: each core
// keeps too few misses in flight while it also widens and multiplies. Prefetching 32
// lines ahead (a few candidates from 8 to 256 were timed on the 2-core dev machine; 32-40
// were best) kept more in flight: ~23 GB/s over all of GPT-2's int8 weights.
// A prefetch past the end of the weights is harmless (prefetches never fault).
constexpr int64_t kPrefetchLines = 32;

// One call's operands, as raw pointers.
struct Problem {
  const float* x;      // (m, k) row-major
  const int8_t* w;     // packed (blocks, k, 64)
  const float* scale;  // (n,)
  const float* bias;   // (n,) or nullptr
  float* y;            // (m, n) row-major
  int64_t m, k, n;
};

// ---- instruction sets ------------------------------------------------------------------

// One lane: the scalar fallback runs the same tiles with float "vectors".
struct Scalar {
  using Vec = float;
  static constexpr int64_t kLanes = 1;
  static constexpr int kMaxRows = 6;
  static Vec zero() { return 0.f; }
  static Vec load(const float* p) { return *p; }
  static void store(float* p, Vec v) { *p = v; }
  static Vec widen(const int8_t* w) { return static_cast<float>(*w); }
  static Vec broadcast(const float* x) { return *x; }
  static Vec fma(Vec a, Vec b, Vec c) { return a * b + c; }
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GPTFAST_INT8_X86 1

// AVX2 + FMA: 8 lanes, 16 registers: 2 rows x 4 accumulators + 4 weights + 1 broadcast.
struct Avx2 {
  using Vec = __m256;
  static constexpr int64_t kLanes = 8;
  static constexpr int kMaxRows = 2;
  __attribute__((target("avx2,fma"))) static Vec zero() { return _mm256_setzero_ps(); }
  __attribute__((target("avx2,fma"))) static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  __attribute__((target("avx2,fma"))) static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  __attribute__((target("avx2,fma"))) static Vec widen(const int8_t* w) {
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  }
  __attribute__((target("avx2,fma"))) static Vec broadcast(const float* x) { return _mm256_broadcast_ss(x); }
  __attribute__((target("avx2,fma"))) static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
};

// AVX-512F: 16 lanes, 32 registers: 6 rows x 4 accumulators + 4 weights + 1 broadcast.
struct Avx512 {
  using Vec = __m512;
  static constexpr int64_t kLanes = 16;
  static constexpr int kMaxRows = 6;
  __attribute__((target("avx512f"))) static Vec zero() { return _mm512_setzero_ps(); }
  __attribute__((target("avx512f"))) static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  __attribute__((target("avx512f"))) static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  __attribute__((target("avx512f"))) static Vec widen(const int8_t* w) {
    __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
  }
  __attribute__((target("avx512f"))) static Vec broadcast(const float* x) { return _mm512_set1_ps(*x); }
  __attribute__((target("avx512f"))) static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
};

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

// ---- the register tile -------------------------------------------------------------------

// acc[r][0..63] (+)= sum over kk < kc of x[r * ldx + kk] * weight(kk, channel), for MT rows
// and the 64 channels of one block, taken kVecs x kLanes channels at a time.
// Int8 = true: `w` is the packed int8 block at its k, widened here (the direct schedule);
// false: `w` is an fp32 panel (kc, 64) (the panel schedule). `acc` rows are 64 floats apart.
template <class I, int MT, bool Int8>
inline void tile(const float* x, int64_t ldx, const void* w, int64_t kc, float* acc, bool accumulate) {
  using Vec = typename I::Vec;
  constexpr int64_t kChunk = kVecs * I::kLanes;
  for (int64_t c0 = 0; c0 < kBlockN; c0 += kChunk) {
    Vec sum[MT][kVecs];
    for (int r = 0; r < MT; ++r)
      for (int v = 0; v < kVecs; ++v)
        sum[r][v] = accumulate ? I::load(acc + r * kBlockN + c0 + v * I::kLanes) : I::zero();
    for (int64_t kk = 0; kk < kc; ++kk) {
      Vec wv[kVecs];
      if constexpr (Int8) {
        const int8_t* line = static_cast<const int8_t*>(w) + kk * kBlockN + c0;
        if (c0 == 0) __builtin_prefetch(line + kPrefetchLines * kBlockN, 0, 3);
        for (int v = 0; v < kVecs; ++v) wv[v] = I::widen(line + v * I::kLanes);
      } else {
        const float* line = static_cast<const float*>(w) + kk * kBlockN + c0;
        for (int v = 0; v < kVecs; ++v) wv[v] = I::load(line + v * I::kLanes);
      }
      for (int r = 0; r < MT; ++r) {
        Vec xb = I::broadcast(x + r * ldx + kk);
        for (int v = 0; v < kVecs; ++v) sum[r][v] = I::fma(xb, wv[v], sum[r][v]);
      }
    }
    for (int r = 0; r < MT; ++r)
      for (int v = 0; v < kVecs; ++v) I::store(acc + r * kBlockN + c0 + v * I::kLanes, sum[r][v]);
  }
}

// y[r0 + r][c] = acc[r][c] * scale[c] + bias[c] for the block's channels below n.
inline void finish(const Problem& p, int64_t r0, int64_t rows, int64_t block, const float* acc) {
  const int64_t c_begin = block * kBlockN, width = std::min(kBlockN, p.n - c_begin);
  const float* scale = p.scale + c_begin;
  const float* bias = p.bias ? p.bias + c_begin : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    float* y = p.y + (r0 + r) * p.n + c_begin;
    const float* a = acc + r * kBlockN;
    if (bias) {
      for (int64_t c = 0; c < width; ++c) y[c] = a[c] * scale[c] + bias[c];
    } else {
      for (int64_t c = 0; c < width; ++c) y[c] = a[c] * scale[c];
    }
  }
}

// A row tile of 1..I::kMaxRows rows: the run-time row count picks the instantiation.
template <class I, bool Int8>
inline void tile_rows(int rows, const float* x, int64_t ldx, const void* w, int64_t kc, float* acc, bool accumulate) {
  switch (rows) {
    case 1: return tile<I, 1, Int8>(x, ldx, w, kc, acc, accumulate);
    case 2: if constexpr (I::kMaxRows >= 2) return tile<I, 2, Int8>(x, ldx, w, kc, acc, accumulate); break;
    case 3: if constexpr (I::kMaxRows >= 3) return tile<I, 3, Int8>(x, ldx, w, kc, acc, accumulate); break;
    case 4: if constexpr (I::kMaxRows >= 4) return tile<I, 4, Int8>(x, ldx, w, kc, acc, accumulate); break;
    case 5: if constexpr (I::kMaxRows >= 5) return tile<I, 5, Int8>(x, ldx, w, kc, acc, accumulate); break;
    case 6: if constexpr (I::kMaxRows >= 6) return tile<I, 6, Int8>(x, ldx, w, kc, acc, accumulate); break;
  }
}

// The row tiles of m rows: as few as fit kMaxRows, their sizes as equal as can be.
inline int64_t tile_start(int64_t m, int64_t tiles, int64_t t) { return t * (m / tiles) + std::min(t, m % tiles); }

// Blocks [b_begin, b_end) of every row.
template <class I>
void run_blocks(const Problem& p, int64_t b_begin, int64_t b_end) {
  constexpr int64_t kRows = I::kMaxRows;
  const int64_t block_bytes = p.k * kBlockN;
  const int64_t tiles = (p.m + kRows - 1) / kRows;
  if (tiles <= kDirectTiles) {
    alignas(64) float acc[kRows * kBlockN];
    for (int64_t b = b_begin; b < b_end; ++b) {
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t r0 = tile_start(p.m, tiles, t);
        const int rows = static_cast<int>(tile_start(p.m, tiles, t + 1) - r0);
        tile_rows<I, true>(rows, p.x + r0 * p.k, p.k, p.w + b * block_bytes, p.k, acc, false);
        finish(p, r0, rows, b, acc);
      }
    }
    return;
  }
  std::vector<float> panel(kPanelK * kBlockN), acc(p.m * kBlockN);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int8_t* w = p.w + b * block_bytes;
    for (int64_t k0 = 0; k0 < p.k; k0 += kPanelK) {
      const int64_t kc = std::min(kPanelK, p.k - k0);
      const int8_t* src = w + k0 * kBlockN;
      for (int64_t i = 0; i < kc * kBlockN; i += I::kLanes) {
        if (i % kBlockN == 0) __builtin_prefetch(src + i + kPrefetchLines * kBlockN, 0, 3);
        I::store(panel.data() + i, I::widen(src + i));
      }
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t r0 = tile_start(p.m, tiles, t);
        const int rows = static_cast<int>(tile_start(p.m, tiles, t + 1) - r0);
        tile_rows<I, false>(rows, p.x + r0 * p.k + k0, p.k, panel.data(), kc, acc.data() + r0 * kBlockN, k0 > 0);
      }
    }
    finish(p, 0, p.m, b, acc.data());
  }
}

#ifdef GPTFAST_INT8_X86
__attribute__((target("avx2,fma"), flatten)) void run_blocks_avx2(const Problem& p, int64_t b0, int64_t b1) {
  run_blocks<Avx2>(p, b0, b1);
}
__attribute__((target("avx512f"), flatten)) void run_blocks_avx512(const Problem& p, int64_t b0, int64_t b1) {
  run_blocks<Avx512>(p, b0, b1);
}
#endif

void run_blocks_isa(const Problem& p, int64_t isa, int64_t b0, int64_t b1) {
#ifdef GPTFAST_INT8_X86
  if (isa == kIsaAvx512) return run_blocks_avx512(p, b0, b1);
  if (isa == kIsaAvx2) return run_blocks_avx2(p, b0, b1);
#endif
  run_blocks<Scalar>(p, b0, b1);
}

// ---- the ops ---------------------------------------------------------------------------

int64_t num_blocks(int64_t n) { return (n + kBlockN - 1) / kBlockN; }

Tensor int8_pack(const Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "int8_pack: w must be a 2-D int8 tensor (N, K), got ",
              w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(w.device().is_cpu(), "int8_pack: w must be on the CPU, got ", w.device());
  const Tensor src = w.contiguous();
  const int64_t n = w.size(0), k = w.size(1), blocks = num_blocks(n);
  Tensor packed = at::zeros({blocks, k, kBlockN}, w.options());
  const int8_t* in = src.data_ptr<int8_t>();
  int8_t* out = packed.data_ptr<int8_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t width = std::min(kBlockN, n - b * kBlockN);
      int8_t* dst = out + b * k * kBlockN;
      for (int64_t c = 0; c < width; ++c) {
        const int8_t* row = in + (b * kBlockN + c) * k;
        for (int64_t i = 0; i < k; ++i) dst[i * kBlockN + c] = row[i];
      }
    }
  });
  return packed;
}

void check_operands(const char* op, const Tensor& x, int64_t k, int64_t n, const Tensor& scale,
                    const c10::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, op, ": x must be (M, ", k, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), op,
              ": x must be a contiguous float32 CPU tensor");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 1 && scale.numel() == n, op,
              ": scale must be contiguous float32 of shape (", n, ",)");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n, op,
                ": bias must be contiguous float32 of shape (", n, ",)");
  }
}

int64_t resolve_isa(const char* op, int64_t isa) {
  const int64_t best = best_isa();
  if (isa == kIsaAuto) return best;
  TORCH_CHECK(isa >= kIsaScalar && isa <= best, op, ": isa ", isa, " is not supported on this CPU (best ", best, ")");
  return isa;
}

Tensor int8_linear_packed(const Tensor& x, const Tensor& packed, const Tensor& scale, const c10::optional<Tensor>& bias,
                          int64_t isa) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kBlockN && packed.scalar_type() == at::kChar &&
                  packed.is_contiguous(),
              "int8_linear_packed: packed must be a contiguous int8 tensor (blocks, K, 64) made by int8_pack, got ",
              packed.scalar_type(), " ", packed.sizes());
  const int64_t k = packed.size(1), n = scale.numel();
  TORCH_CHECK(packed.size(0) == num_blocks(n), "int8_linear_packed: packed holds ", packed.size(0),
              " blocks of 64 channels but scale has ", n, " channels");
  check_operands("int8_linear_packed", x, k, n, scale, bias);
  isa = resolve_isa("int8_linear_packed", isa);
  const int64_t m = x.size(0);
  Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  if (k == 0) return bias.has_value() && bias->defined() ? bias->expand({m, n}).clone() : y.zero_();
  const bool has_bias = bias.has_value() && bias->defined();
  Problem p{x.data_ptr<float>(), packed.data_ptr<int8_t>(), scale.data_ptr<float>(),
            has_bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), m, k, n};
  // Grain: at least about 16 KiB of weights per task, so a small layer does not pay for
  // threads it cannot feed; a large one splits into one contiguous range per thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / (k * kBlockN));
  at::parallel_for(0, num_blocks(n), grain, [&](int64_t b0, int64_t b1) { run_blocks_isa(p, isa, b0, b1); });
  return y;
}

Tensor int8_linear_cpu(const Tensor& x, const Tensor& w, const Tensor& scale, const c10::optional<Tensor>& bias,
                       int64_t isa) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "int8_linear_cpu: w must be int8 (N, K), got ",
              w.scalar_type(), " ", w.sizes());
  check_operands("int8_linear_cpu", x, w.size(1), w.size(0), scale, bias);
  resolve_isa("int8_linear_cpu", isa);
  return int8_linear_packed(x, int8_pack(w), scale, bias, isa);
}

int64_t int8_linear_best_isa() { return best_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptfast_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias, int isa=-1) -> Tensor");
  m.def("int8_pack(Tensor w) -> Tensor");
  m.def("int8_linear_packed(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int isa=-1) -> Tensor");
  m.def("int8_linear_best_isa() -> int", &int8_linear_best_isa);
}

TORCH_LIBRARY_IMPL(gptfast_cpu, CPU, m) {
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int8_pack", &int8_pack);
  m.impl("int8_linear_packed", &int8_linear_packed);
}

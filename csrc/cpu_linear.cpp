// Skinny linear layers on the CPU, y = x @ w^T (* scale) + bias for a few rows x (a decode
// step's batch): fp32 weights, and weight-only int8 weights with per-channel scales.
//
// A decode step multiplies a few activation rows by every weight matrix, so it is bound
// by how fast the weights stream from memory; int8 weights are a quarter of fp32's bytes.
//
// Packed layout. An (N, K) weight is reordered once (fp32_pack / int8_pack) into blocks
// of kBlockN = 64 output channels, each block K-major: packed[b][k][c] = w[64 b + c][k],
// the channels past N zero. One k of one block is one 64-byte cache line of int8 (four
// of fp32), and a block is one contiguous run of K such lines, so each thread streams one
// sequential region (the hardware prefetcher's best case; row-major rows of 768 bytes
// read four at a time were not), and no horizontal sums are needed: the vector lanes are
// output channels.
//
// Inner loop. For each k, the block's 64 weights are loaded (int8: widened to fp32 in
// registers, sign-extend + convert, exact since |w| <= 127) and each activation row's
// x[r][k], broadcast, is multiplied into them with FMA: one line feeds MT rows, and
// 4 x MT accumulators (4 vectors x MT rows) stay in registers. Sums are taken in slices
// of k (see kSliceK). An int8 channel's scale factors out of the sum over K and is
// applied once per output, with the bias, after the sum. The int8 twin dequantises first,
// the fp32 twin is F.linear; the kernels agree with them to fp32 rounding of the sum (the
// error-ratio rule of the tests).
//
// Why not VNNI for int8: vpdpbusd multiplies int8 by int8. Using it would mean quantising
// the activations per row to int8 too: an error of about 1% of the largest activation, a
// different and lossier scheme than weight-only int8, far outside the error-ratio rule
// the twin judges by. The vector paths here are plain AVX-512F and AVX2+FMA.
//
// Schedules. A thread streams two blocks at once (kStreams): one core's single sequential
// stream keeps too few misses in flight (int8 at batch 1 read ~15% faster with two). Per
// block, slice by slice of k, every row tile runs over the slice before the next one is
// read: the first tile streams it from memory (prefetching ahead), the others find it in
// L1, so the streams never pause while a later tile works.
// - direct (fp32 always; int8 up to kDirectTiles row tiles): every tile reads the lines
//   as they are (int8: widening them itself);
// - panel (int8, more rows): per slice the int8 weights are widened once into an fp32
//   panel (32 KiB, L1-resident) and every row tile runs an fp32 multiply over it, so the
//   widening is paid once per weight, not once per row tile.
// Row tiles are as few as fit the register budget and as equal in size as can be.
//
// Work split: at::parallel_for over blocks; each thread takes one contiguous range of
// blocks and streams it. (ATen's parallel_for is inline OpenMP: it runs on one thread
// unless the extension is compiled with -fopenmp, as gptfast.runtime.extension and
// setup.py do.) The instruction set is chosen at run time (__builtin_cpu_supports):
// AVX-512F, else AVX2+FMA, else a scalar loop (the same template, one lane wide). The ops take an
// `isa` argument (-1 = best available) so the tests can run every path this CPU supports
// against the twins.
//
// Registered with the dispatcher (not pybind11) in the gptfast_cpu namespace, reachable
// once the extension module gptfast._C is imported:
//   int8_pack(w) -> packed                       (N, K) int8 -> (ceil(N/64), K, 64) int8
//   int8_linear_packed(x, packed, scale, bias, isa, residual, gelu)
//   int8_linear(x, w, scale, bias, isa)          packs w for this one call, then as above
//   int8_linear_best_isa()                       the best isa (both weight kinds)
//   fp32_pack(w) -> packed                       (N, K) fp32 -> (ceil(N/64), K, 64) fp32
//   fp32_linear_packed(x, packed, n, bias, isa, residual, gelu)  n = N (the packed blocks round it up)
// The packed ops' epilogue (a decode step's neighbours of the matmul, applied to each
// block's outputs while they are in L1): gelu=True applies GPT-2's tanh GELU, and
// `residual` ((M, N) fp32 contiguous, optional) is added last: y = gelu(x w^T + b) + res.
// gptfast.ops.int8_linear is the public face of int8_linear (validation, dispatch);
// gptfast.generation.cpu_linear calls the packed ops straight for generation.
// The kernels assume what those callers check: x (M, K) fp32 contiguous, scale (N,) fp32,
// bias (N,) fp32 or absent; the shapes are checked here too.
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

using gptfast_cpu::best_isa, gptfast_cpu::kIsaAuto, gptfast_cpu::kIsaAvx2, gptfast_cpu::kIsaAvx512,
    gptfast_cpu::kIsaScalar;
constexpr int64_t kBlockN = 64;    // output channels per packed block: one cache line per k
// k values per slice. Every schedule sums a block's products slice by slice of k, each
// slice into fresh registers, then adds the slice's sums to those of the slices before
// (blocked summation: a rounding error that grows with the slice length, not with K).
// fp32 weights: slices of 32, whose error stays within a small multiple of F.linear's
// (MKL's blocked GEMM, the fp32 twin) for every K the tests try; int8 weights: slices of
// 128, one fp32 panel in the panel schedule (128 x 64 x 4 bytes = 32 KiB, L1), as
// accurate as the dequantising twin needs (shorter slices cost the batch-1 stream ~5%).
constexpr int64_t kSliceK = 32;
constexpr int64_t kInt8SliceK = 128;
// Blocks streamed at once by one thread (see run_blocks): on the 2-core dev machine, over
// 850 MB of GPT-2-shaped layers (cold caches), int8 at batch 1 read 16.1-16.4 GB/s with
// two against 13.9-14.1 with one; fp32 and batch 8 did not change; four were no better.
constexpr int64_t kStreams = 2;
constexpr int64_t kVecs = 4;       // vectors per row of a register tile (64 channels in AVX-512)
constexpr int64_t kDirectTiles = 2;  // row tiles up to which the direct schedule runs
// Software prefetch distance, in 64-byte lines of the packed stream (2 KiB ahead). The
// hardware prefetcher alone left a 2-core decode step at ~16 GB/s from memory: each core
// keeps too few misses in flight while it also widens and multiplies. Prefetching 32
// lines ahead (a few candidates from 8 to 256 were timed on the 2-core dev machine; 32-40
// were best) kept more in flight: ~23 GB/s over all of GPT-2's int8 weights.
// A prefetch past the end of the weights is harmless (prefetches never fault).
constexpr int64_t kPrefetchLines = 32;
// The same for fp32 weights, in k steps of a block (256 bytes, four lines, each).
constexpr int64_t kF32PrefetchK = 32;

// One call's operands, as raw pointers.
struct Problem {
  const float* x;      // (m, k) row-major
  const int8_t* w;     // packed (blocks, k, 64) int8, or nullptr for fp32 weights
  const float* w32;    // packed (blocks, k, 64) fp32, or nullptr for int8 weights
  const float* scale;  // (n,) for int8 weights, nullptr for fp32
  const float* bias;   // (n,) or nullptr
  const float* residual;  // (m, n) row-major, added last; or nullptr
  bool gelu;           // GPT-2's tanh GELU on x @ w^T (* scale) + bias, before the residual
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
  static Vec add(Vec a, Vec b) { return a + b; }
};

#ifdef GPTFAST_CPU_X86

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
  __attribute__((target("avx2,fma"))) static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
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
  __attribute__((target("avx512f"))) static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
};

#endif


// ---- the register tile -------------------------------------------------------------------

// Where a tile's weights come from: the packed int8 stream (widened here), an fp32 panel
// already in L1 (the panel schedule), or the packed fp32 stream (fp32_linear_packed).
enum class Weights { kInt8, kPanel, kF32 };

// acc[r][0..63] (+)= sum over kk < kc of x[r * ldx + kk] * weight(kk, channel), for MT rows
// and the 64 channels of one block, taken kVecs x kLanes channels at a time. `w` is the
// block at its first k: int8 or fp32 lines of 64 channels, `kk * 64` elements apart.
// `acc` rows are 64 floats apart. With `prefetch`, the stream ahead of `w` is prefetched
// (the first row tile over a slice does it; the others find the slice in L1).
template <class I, int MT, Weights W>
inline void tile(const float* x, int64_t ldx, const void* w, int64_t kc, float* acc, bool accumulate, bool prefetch) {
  using Vec = typename I::Vec;
  constexpr int64_t kChunk = kVecs * I::kLanes;
  for (int64_t c0 = 0; c0 < kBlockN; c0 += kChunk) {
    Vec sum[MT][kVecs];
    for (int r = 0; r < MT; ++r)
      for (int v = 0; v < kVecs; ++v) sum[r][v] = I::zero();
    for (int64_t kk = 0; kk < kc; ++kk) {
      Vec wv[kVecs];
      if constexpr (W == Weights::kInt8) {
        const int8_t* line = static_cast<const int8_t*>(w) + kk * kBlockN + c0;
        if (prefetch && c0 == 0) __builtin_prefetch(line + kPrefetchLines * kBlockN, 0, 3);
        for (int v = 0; v < kVecs; ++v) wv[v] = I::widen(line + v * I::kLanes);
      } else {
        const float* line = static_cast<const float*>(w) + kk * kBlockN + c0;
        if (W == Weights::kF32 && prefetch) {
          // The chunk's bytes of the k kF32PrefetchK steps ahead, one prefetch per cache line.
          for (int64_t b = 0; b < kChunk * 4; b += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(line + kF32PrefetchK * kBlockN) + b, 0, 3);
        }
        for (int v = 0; v < kVecs; ++v) wv[v] = I::load(line + v * I::kLanes);
      }
      for (int r = 0; r < MT; ++r) {
        Vec xb = I::broadcast(x + r * ldx + kk);
        for (int v = 0; v < kVecs; ++v) sum[r][v] = I::fma(xb, wv[v], sum[r][v]);
      }
    }
    // A fresh sum per slice of k, added to the slices before: blocked summation, whose
    // rounding error grows with the slice length, not with all of K.
    for (int r = 0; r < MT; ++r)
      for (int v = 0; v < kVecs; ++v) {
        float* out = acc + r * kBlockN + c0 + v * I::kLanes;
        I::store(out, accumulate ? I::add(I::load(out), sum[r][v]) : sum[r][v]);
      }
  }
}

// GPT-2's GELU, 0.5 a (1 + tanh(u)) with u = sqrt(2 / pi) (a + 0.044715 a^3), written as
// a / (1 + exp(-2 u)) (the same function: 1 + tanh(u) = 2 / (1 + exp(-2 u))) and, so that
// only the exp of a non-positive number is needed (exp_nonpos: branch-free, so the
// epilogue's loop vectorises; libm's expf and tanhf do not), with t = exp(-2 |u|) <= 1:
// a / (1 + t) for u >= 0, and a t / (1 + t) for u < 0 (numerator and denominator times t).
inline float gelu_tanh(float a) {
  const float u = 0.7978845608028654f * (a + 0.044715f * a * a * a);
  const float t = gptfast_cpu::exp_nonpos(-2.f * std::fabs(u));
  return (u >= 0.f ? a : a * t) / (1.f + t);
}

// y[r0 + r][c] = act(acc[r][c] * scale[c] + bias[c]) + residual[r0 + r][c] for the block's
// channels below n (no scale for fp32 weights; no bias, activation or residual when the
// call has none).
inline void finish(const Problem& p, int64_t r0, int64_t rows, int64_t block, const float* acc) {
  const int64_t c_begin = block * kBlockN, width = std::min(kBlockN, p.n - c_begin);
  const float* scale = p.scale ? p.scale + c_begin : nullptr;
  const float* bias = p.bias ? p.bias + c_begin : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    float* y = p.y + (r0 + r) * p.n + c_begin;
    const float* a = acc + r * kBlockN;
    if (scale && bias) {
      for (int64_t c = 0; c < width; ++c) y[c] = a[c] * scale[c] + bias[c];
    } else if (scale) {
      for (int64_t c = 0; c < width; ++c) y[c] = a[c] * scale[c];
    } else if (bias) {
      for (int64_t c = 0; c < width; ++c) y[c] = a[c] + bias[c];
    } else {
      std::memcpy(y, a, width * sizeof(float));
    }
    if (p.gelu) {
      for (int64_t c = 0; c < width; ++c) y[c] = gelu_tanh(y[c]);
    }
    if (p.residual) {
      const float* res = p.residual + (r0 + r) * p.n + c_begin;
      for (int64_t c = 0; c < width; ++c) y[c] += res[c];
    }
  }
}

// A row tile of 1..I::kMaxRows rows: the run-time row count picks the instantiation.
template <class I, Weights W>
inline void tile_rows(int rows, const float* x, int64_t ldx, const void* w, int64_t kc, float* acc, bool accumulate,
                      bool prefetch) {
  switch (rows) {
    case 1: return tile<I, 1, W>(x, ldx, w, kc, acc, accumulate, prefetch);
    case 2: if constexpr (I::kMaxRows >= 2) return tile<I, 2, W>(x, ldx, w, kc, acc, accumulate, prefetch); break;
    case 3: if constexpr (I::kMaxRows >= 3) return tile<I, 3, W>(x, ldx, w, kc, acc, accumulate, prefetch); break;
    case 4: if constexpr (I::kMaxRows >= 4) return tile<I, 4, W>(x, ldx, w, kc, acc, accumulate, prefetch); break;
    case 5: if constexpr (I::kMaxRows >= 5) return tile<I, 5, W>(x, ldx, w, kc, acc, accumulate, prefetch); break;
    case 6: if constexpr (I::kMaxRows >= 6) return tile<I, 6, W>(x, ldx, w, kc, acc, accumulate, prefetch); break;
  }
}

// The row tiles of m rows: as few as fit kMaxRows, their sizes as equal as can be.
inline int64_t tile_start(int64_t m, int64_t tiles, int64_t t) { return t * (m / tiles) + std::min(t, m % tiles); }

// Blocks [b_begin, b_end) of every row, kStreams blocks at a time. Per group of blocks,
// slice by slice of k, every row tile runs over each block's slice before the next slice
// is read, so the streams from memory never pause while a later tile works (the slice is
// in L1 by then); each tile adds its slice sums to its block's rows of `acc`, and each
// block's outputs are finished once. Several blocks in flight keep several sequential
// streams open per core: one core's stream alone does not keep enough misses in flight.
template <class I>
void run_blocks(const Problem& p, int64_t b_begin, int64_t b_end) {
  constexpr int64_t kRows = I::kMaxRows, kStackRows = 32;
  const int64_t tiles = (p.m + kRows - 1) / kRows;
  // fp32 weights are read as they are; int8 ones are widened in the tile (direct) or,
  // for more row tiles, once per slice into an fp32 panel that every tile then reads.
  const bool panel_schedule = p.w32 == nullptr && tiles > kDirectTiles;
  const int64_t streams = panel_schedule ? 1 : kStreams;
  alignas(64) float stack_acc[kStreams * kStackRows * kBlockN];
  std::vector<float> heap_acc(p.m > kStackRows ? kStreams * p.m * kBlockN : 0),
      panel(panel_schedule ? kInt8SliceK * kBlockN : 0);
  float* acc = p.m > kStackRows ? heap_acc.data() : stack_acc;
  const int64_t slice_k = p.w32 ? kSliceK : kInt8SliceK;
  for (int64_t b0 = b_begin; b0 < b_end; b0 += streams) {
    const int64_t group = std::min(streams, b_end - b0);
    for (int64_t k0 = 0; k0 < p.k; k0 += slice_k) {
      const int64_t kc = std::min(slice_k, p.k - k0);
      for (int64_t s = 0; s < group; ++s) {
        const int64_t line0 = (b0 + s) * p.k + k0;  // the slice's first line
        float* block_acc = acc + s * p.m * kBlockN;
        if (panel_schedule) {
          const int8_t* src = p.w + line0 * kBlockN;
          for (int64_t i = 0; i < kc * kBlockN; i += I::kLanes) {
            if (i % kBlockN == 0) __builtin_prefetch(src + i + kPrefetchLines * kBlockN, 0, 3);
            I::store(panel.data() + i, I::widen(src + i));
          }
        }
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t r0 = tile_start(p.m, tiles, t);
          const int rows = static_cast<int>(tile_start(p.m, tiles, t + 1) - r0);
          const float* x = p.x + r0 * p.k + k0;
          float* tile_acc = block_acc + r0 * kBlockN;
          if (p.w32) {
            tile_rows<I, Weights::kF32>(rows, x, p.k, p.w32 + line0 * kBlockN, kc, tile_acc, k0 > 0, t == 0);
          } else if (!panel_schedule) {
            tile_rows<I, Weights::kInt8>(rows, x, p.k, p.w + line0 * kBlockN, kc, tile_acc, k0 > 0, t == 0);
          } else {
            tile_rows<I, Weights::kPanel>(rows, x, p.k, panel.data(), kc, tile_acc, k0 > 0, false);
          }
        }
      }
    }
    for (int64_t s = 0; s < group; ++s) finish(p, 0, p.m, b0 + s, acc + s * p.m * kBlockN);
  }
}

#ifdef GPTFAST_CPU_X86
__attribute__((target("avx2,fma"), flatten)) void run_blocks_avx2(const Problem& p, int64_t b0, int64_t b1) {
  run_blocks<Avx2>(p, b0, b1);
}
__attribute__((target("avx512f"), flatten)) void run_blocks_avx512(const Problem& p, int64_t b0, int64_t b1) {
  run_blocks<Avx512>(p, b0, b1);
}
#endif

void run_blocks_isa(const Problem& p, int64_t isa, int64_t b0, int64_t b1) {
#ifdef GPTFAST_CPU_X86
  if (isa == kIsaAvx512) return run_blocks_avx512(p, b0, b1);
  if (isa == kIsaAvx2) return run_blocks_avx2(p, b0, b1);
#endif
  run_blocks<Scalar>(p, b0, b1);
}

// ---- the ops ---------------------------------------------------------------------------

int64_t num_blocks(int64_t n) { return (n + kBlockN - 1) / kBlockN; }

// (N, K) -> (ceil(N / 64), K, 64): packed[b][k][c] = w[64 b + c][k], zeros past N.
template <typename T>
Tensor pack_blocks(const Tensor& w) {
  const Tensor src = w.contiguous();
  const int64_t n = w.size(0), k = w.size(1), blocks = num_blocks(n);
  Tensor packed = at::zeros({blocks, k, kBlockN}, w.options());
  const T* in = src.data_ptr<T>();
  T* out = packed.data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t width = std::min(kBlockN, n - b * kBlockN);
      T* dst = out + b * k * kBlockN;
      for (int64_t c = 0; c < width; ++c) {
        const T* row = in + (b * kBlockN + c) * k;
        for (int64_t i = 0; i < k; ++i) dst[i * kBlockN + c] = row[i];
      }
    }
  });
  return packed;
}

Tensor int8_pack(const Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "int8_pack: w must be a 2-D int8 tensor (N, K), got ",
              w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(w.device().is_cpu(), "int8_pack: w must be on the CPU, got ", w.device());
  return pack_blocks<int8_t>(w);
}

Tensor fp32_pack(const Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "fp32_pack: w must be a 2-D float32 tensor (N, K), got ",
              w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(w.device().is_cpu(), "fp32_pack: w must be on the CPU, got ", w.device());
  return pack_blocks<float>(w);
}

void check_operands(const char* op, const Tensor& x, int64_t k, int64_t n, const c10::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, op, ": x must be (M, ", k, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), op,
              ": x must be a contiguous float32 CPU tensor");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n, op,
                ": bias must be contiguous float32 of shape (", n, ",)");
  }
}

void check_residual(const char* op, const c10::optional<Tensor>& residual, int64_t m, int64_t n) {
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() && residual->device().is_cpu() &&
                    residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n,
                op, ": residual must be a contiguous float32 CPU tensor of shape (", m, ", ", n, "), got ",
                residual->scalar_type(), " ", residual->sizes());
  }
}

void check_scale(const char* op, const Tensor& scale, int64_t n) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 1 && scale.numel() == n, op,
              ": scale must be contiguous float32 of shape (", n, ",)");
}

void check_packed(const char* op, const Tensor& packed, at::ScalarType dtype, const char* maker, int64_t n) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kBlockN && packed.scalar_type() == dtype && packed.is_contiguous(),
              op, ": packed must be a contiguous ", dtype, " tensor (blocks, K, 64) made by ", maker, ", got ",
              packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(packed.size(0) == num_blocks(n), op, ": packed holds ", packed.size(0), " blocks of 64 channels but the "
              "layer has ", n, " channels");
}

int64_t resolve_isa(const char* op, int64_t isa) {
  const int64_t best = best_isa();
  if (isa == kIsaAuto) return best;
  TORCH_CHECK(isa >= kIsaScalar && isa <= best, op, ": isa ", isa, " is not supported on this CPU (best ", best, ")");
  return isa;
}

// y = act(x @ w^T (* scale) (+ bias)) (+ residual) over the packed weight p.w or p.w32
// (the rest of p filled here).
Tensor run(Problem p, const Tensor& x, int64_t n, const c10::optional<Tensor>& bias, int64_t isa,
           const c10::optional<Tensor>& residual, bool gelu) {
  const int64_t m = x.size(0), k = x.size(1);
  Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_residual = residual.has_value() && residual->defined();
  if (k == 0) {  // no products: the epilogue of a zero sum
    Tensor out = has_bias ? bias->expand({m, n}).clone() : y.zero_();
    if (gelu) out = at::gelu(out, "tanh");
    return has_residual ? out.add_(*residual) : out;
  }
  p.x = x.data_ptr<float>();
  p.bias = has_bias ? bias->data_ptr<float>() : nullptr;
  p.residual = has_residual ? residual->data_ptr<float>() : nullptr;
  p.gelu = gelu;
  p.y = y.data_ptr<float>();
  p.m = m, p.k = k, p.n = n;
  // Grain: at least about 16 KiB of weights per task, so a small layer does not pay for
  // threads it cannot feed; a large one splits into one contiguous range per thread.
  const int64_t block_bytes = k * kBlockN * (p.w32 ? 4 : 1);
  const int64_t grain = std::max<int64_t>(1, 16384 / block_bytes);
  at::parallel_for(0, num_blocks(n), grain, [&](int64_t b0, int64_t b1) { run_blocks_isa(p, isa, b0, b1); });
  return y;
}

Tensor int8_linear_packed(const Tensor& x, const Tensor& packed, const Tensor& scale, const c10::optional<Tensor>& bias,
                          int64_t isa, const c10::optional<Tensor>& residual, bool gelu) {
  const char* op = "int8_linear_packed";
  const int64_t n = scale.numel();
  check_packed(op, packed, at::kChar, "int8_pack", n);
  check_scale(op, scale, n);
  check_operands(op, x, packed.size(1), n, bias);
  check_residual(op, residual, x.size(0), n);
  Problem p{};
  p.w = packed.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  return run(p, x, n, bias, resolve_isa(op, isa), residual, gelu);
}

Tensor fp32_linear_packed(const Tensor& x, const Tensor& packed, int64_t n, const c10::optional<Tensor>& bias,
                          int64_t isa, const c10::optional<Tensor>& residual, bool gelu) {
  const char* op = "fp32_linear_packed";
  TORCH_CHECK(n >= 0, op, ": n must be >= 0, got ", n);
  check_packed(op, packed, at::kFloat, "fp32_pack", n);
  check_operands(op, x, packed.size(1), n, bias);
  check_residual(op, residual, x.size(0), n);
  Problem p{};
  p.w32 = packed.data_ptr<float>();
  return run(p, x, n, bias, resolve_isa(op, isa), residual, gelu);
}

Tensor int8_linear_cpu(const Tensor& x, const Tensor& w, const Tensor& scale, const c10::optional<Tensor>& bias,
                       int64_t isa) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "int8_linear_cpu: w must be int8 (N, K), got ",
              w.scalar_type(), " ", w.sizes());
  check_operands("int8_linear_cpu", x, w.size(1), w.size(0), bias);
  check_scale("int8_linear_cpu", scale, w.size(0));
  resolve_isa("int8_linear_cpu", isa);
  return int8_linear_packed(x, int8_pack(w), scale, bias, isa, c10::nullopt, false);
}

int64_t int8_linear_best_isa() { return best_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptfast_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias, int isa=-1) -> Tensor");
  m.def("int8_pack(Tensor w) -> Tensor");
  m.def("int8_linear_packed(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int isa=-1, Tensor? residual=None, "
        "bool gelu=False) -> Tensor");
  m.def("int8_linear_best_isa() -> int", &int8_linear_best_isa);
  m.def("fp32_pack(Tensor w) -> Tensor");
  m.def("fp32_linear_packed(Tensor x, Tensor packed, int n, Tensor? bias, int isa=-1, Tensor? residual=None, "
        "bool gelu=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptfast_cpu, CPU, m) {
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int8_pack", &int8_pack);
  m.impl("int8_linear_packed", &int8_linear_packed);
  m.impl("fp32_pack", &fp32_pack);
  m.impl("fp32_linear_packed", &fp32_linear_packed);
}

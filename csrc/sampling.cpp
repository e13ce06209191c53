// gptfast's sampling loop in C++: logits processors, seeded sampling, stop checks and
// the decode loop that drives them.
//
// The general path is device-agnostic ATen, so one build serves CPU and CUDA tensors,
// and every op is CUDA-graph capturable (no host syncs, fixed shapes). On CPU tensors,
// where per-op overhead and index-tracking reductions dominate a decode step, plain C++
// loops replace the parts that allow it bit for bit: one fused pass per row for the
// penalties / bias / min-new mask / max / argmax / temperature, the hash noise, and the
// per-row bookkeeping. `force_aten` selects the general path on CPU too (tests compare
// all three: twin, CPU fast path, ATen path).
//
// The Python twin, gptfast/reference/sampling.py, runs the same torch operations in the
// same order: for one seed both pick identical tokens. Read it first: its docstring
// gives the processor order and the exponential-race sampling rule; the comments here
// only note where C++ differs in form.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>
#include <vector>

namespace py = pybind11;
using at::Tensor;

namespace {

// Bumped whenever the Python <-> C++ interface changes; the loader rejects a stale build.
constexpr int64_t kApiVersion = 7;

// ---- counter-based noise (see the twin's mix32 / row_keys / uniform_noise) -------------

constexpr int64_t kMask32 = 0xFFFFFFFFLL;
constexpr int64_t kMixMul1 = 0x7FEB352DLL;
constexpr int64_t kMixMul2 = 0x68E31DA5LL;
constexpr int64_t kSaltSeed = 0x9E3779B9LL;
constexpr int64_t kSaltToken = 0x85EBCA77LL;
constexpr int64_t kSaltOuter = 0x27D4EB2FLL;
constexpr double kInv2Pow32 = 1.0 / 4294967296.0;
constexpr int64_t kFinishStopToken = 1, kFinishLength = 2;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Scalar form for the CPU loop: values < 2**32 and multipliers < 2**31 never overflow.
inline uint64_t mix32_scalar(uint64_t x) {
  x ^= x >> 16;
  x = (x * static_cast<uint64_t>(kMixMul1)) & static_cast<uint64_t>(kMask32);
  x ^= x >> 15;
  x = (x * static_cast<uint64_t>(kMixMul2)) & static_cast<uint64_t>(kMask32);
  return x ^ (x >> 16);
}

// Tensor form (int64 tensors holding values in [0, 2**32)): runs on any device.
Tensor mix32(const Tensor& x0) {
  Tensor x = x0.bitwise_xor(at::bitwise_right_shift(x0, 16));
  x = x.mul(kMixMul1).bitwise_and_(kMask32);
  x = x.bitwise_xor(at::bitwise_right_shift(x, 15));
  x = x.mul(kMixMul2).bitwise_and_(kMask32);
  return x.bitwise_xor(at::bitwise_right_shift(x, 16));
}

Tensor token_table(int64_t vocab_size, at::Device device) {
  TORCH_CHECK(vocab_size >= 1, "token_table: vocab_size must be >= 1, got ", vocab_size);
  return mix32(at::arange(vocab_size, at::TensorOptions().dtype(at::kLong).device(device)).bitwise_xor(kSaltToken));
}

std::pair<Tensor, Tensor> row_keys(const Tensor& seed, const Tensor& step) {
  Tensor k = mix32(seed.bitwise_and(kMask32).bitwise_xor(kSaltSeed));
  k = mix32(k.bitwise_xor(at::bitwise_right_shift(seed, 32)));
  k = mix32(k.bitwise_xor(step.bitwise_and(kMask32)));
  return {k, mix32(k.bitwise_xor(kSaltOuter))};
}

Tensor uniform_noise_aten(const Tensor& seed, const Tensor& step, const Tensor& table, const Tensor& token_ids) {
  auto [k1, k2] = row_keys(seed, step);
  Tensor per_token = token_ids.defined() ? at::take(table, token_ids) : table.unsqueeze(0);
  Tensor h = mix32(mix32(k1.unsqueeze(1).bitwise_xor(per_token)).bitwise_xor(k2.unsqueeze(1)));
  return h.to(at::kDouble).add(0.5).mul(kInv2Pow32);
}

// The same bits as uniform_noise_aten, in one pass over a CPU output buffer (the per-token
// hash comes from the table, as there).
Tensor uniform_noise_cpu(const Tensor& seed, const Tensor& step, const Tensor& table, const Tensor& token_ids) {
  const int64_t rows = seed.size(0);
  const int64_t cols = token_ids.defined() ? token_ids.size(1) : table.size(0);
  Tensor seed_c = seed.contiguous(), step_c = step.expand({rows}).contiguous(), table_c = table.contiguous();
  const int64_t* table_p = table_c.data_ptr<int64_t>();
  Tensor ids = token_ids.defined() ? token_ids.contiguous() : Tensor();
  const int64_t* seed_p = seed_c.data_ptr<int64_t>();
  const int64_t* step_p = step_c.data_ptr<int64_t>();
  const int64_t* ids_p = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
  std::vector<uint64_t> key1(rows), key2(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t s = static_cast<uint64_t>(seed_p[r]);
    uint64_t k = mix32_scalar((s & kMask32) ^ kSaltSeed);
    k = mix32_scalar(k ^ (s >> 32));
    k = mix32_scalar(k ^ (static_cast<uint64_t>(step_p[r]) & kMask32));
    key1[r] = k;
    key2[r] = mix32_scalar(k ^ kSaltOuter);
  }
  Tensor out = at::empty({rows, cols}, seed.options().dtype(at::kDouble));
  double* out_p = out.data_ptr<double>();
  at::parallel_for(0, rows * cols, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / cols;
      const uint64_t per_token = static_cast<uint64_t>(table_p[ids_p ? ids_p[i] : i % cols]);
      const uint64_t h = mix32_scalar(mix32_scalar(key1[r] ^ per_token) ^ key2[r]);
      out_p[i] = (static_cast<double>(h) + 0.5) * kInv2Pow32;
    }
  });
  return out;
}

// ---- per-row parameters and loop state, read once from the Python dataclasses ---------

Tensor tensor_attr(py::handle obj, const char* name) {
  py::object value = obj.attr(name);
  return value.is_none() ? Tensor() : value.cast<Tensor>();
}

struct Params {  // mirrors gptfast.decode_state.SamplingTensors
  Tensor greedy, temperature, top_k, top_p, log_min_p, repetition_penalty, presence_penalty, frequency_penalty,
      min_new_tokens, max_new_tokens, seed, table, logit_bias, stop_mask;
  bool all_greedy, use_repetition, use_presence_frequency, use_min_new, use_top_k, use_top_p, use_min_p, sort_vocab;
  int64_t max_top_k, num_logprobs;

  static Params from(py::handle o) {
    Params p;
    p.greedy = tensor_attr(o, "greedy");
    p.temperature = tensor_attr(o, "temperature");
    p.top_k = tensor_attr(o, "top_k");
    p.top_p = tensor_attr(o, "top_p");
    p.log_min_p = tensor_attr(o, "log_min_p");
    p.repetition_penalty = tensor_attr(o, "repetition_penalty");
    p.presence_penalty = tensor_attr(o, "presence_penalty");
    p.frequency_penalty = tensor_attr(o, "frequency_penalty");
    p.min_new_tokens = tensor_attr(o, "min_new_tokens");
    p.max_new_tokens = tensor_attr(o, "max_new_tokens");
    p.seed = tensor_attr(o, "seed");
    p.table = tensor_attr(o, "token_table");
    p.logit_bias = tensor_attr(o, "logit_bias");
    p.stop_mask = tensor_attr(o, "stop_mask");
    p.all_greedy = o.attr("all_greedy").cast<bool>();
    p.use_repetition = o.attr("use_repetition").cast<bool>();
    p.use_presence_frequency = o.attr("use_presence_frequency").cast<bool>();
    p.use_min_new = o.attr("use_min_new").cast<bool>();
    p.use_top_k = o.attr("use_top_k").cast<bool>();
    p.use_top_p = o.attr("use_top_p").cast<bool>();
    p.use_min_p = o.attr("use_min_p").cast<bool>();
    p.sort_vocab = o.attr("sort_vocab").cast<bool>();
    p.max_top_k = o.attr("max_top_k").cast<int64_t>();
    p.num_logprobs = o.attr("num_logprobs").cast<int64_t>();
    TORCH_CHECK(!p.use_min_new || p.stop_mask.defined(), "sampling: min_new_tokens needs stop_mask");
    return p;
  }
};

struct State {  // mirrors gptfast.decode_state.DecodeState
  Tensor tokens, positions, step, generated, finished, finish_reason, bad_step, out_tokens, counts, prompt_seen,
      out_logprobs, out_top_ids, out_top_logprobs;

  static State from(py::handle o) {
    State s;
    s.tokens = tensor_attr(o, "tokens");
    s.positions = tensor_attr(o, "positions");
    s.step = tensor_attr(o, "step");
    s.generated = tensor_attr(o, "generated");
    s.finished = tensor_attr(o, "finished");
    s.finish_reason = tensor_attr(o, "finish_reason");
    s.bad_step = tensor_attr(o, "bad_step");
    s.out_tokens = tensor_attr(o, "out_tokens");
    s.counts = tensor_attr(o, "counts");
    s.prompt_seen = tensor_attr(o, "prompt_seen");
    s.out_logprobs = tensor_attr(o, "out_logprobs");
    s.out_top_ids = tensor_attr(o, "out_top_ids");
    s.out_top_logprobs = tensor_attr(o, "out_top_logprobs");
    return s;
  }
};

void check_consistent(const Params& p, const State& s) {
  TORCH_CHECK(!(p.use_repetition || p.use_presence_frequency) || s.counts.defined(),
              "sampling: penalties are on but the decode state has no counts");
  TORCH_CHECK(p.num_logprobs < 0 || s.out_logprobs.defined(), "sampling: logprobs requested but no buffer");
}

Tensor uniform_noise(const Params& p, const State& s, const Tensor& token_ids, bool force_aten) {
  if (!force_aten && p.seed.device().is_cpu()) {
    return uniform_noise_cpu(p.seed, s.step, p.table, token_ids);
  }
  return uniform_noise_aten(p.seed, s.step, p.table, token_ids);
}

// ---- one step (twin: process_logits, choose_tokens, sample_step) -----------------------

Tensor process_logits(const Tensor& logits, const Params& p, const State& s) {
  Tensor x = logits.to(at::kFloat);
  if (p.use_repetition) {
    Tensor seen = s.counts.gt(0);
    if (s.prompt_seen.defined()) seen = seen.bitwise_or(s.prompt_seen);
    Tensor penalized = at::where(x.lt(0), x.mul(p.repetition_penalty), x.div(p.repetition_penalty));
    x = at::where(seen, penalized, x);
  }
  if (p.use_presence_frequency) {
    x = x.sub(s.counts.to(at::kFloat).mul(p.frequency_penalty))
            .sub(s.counts.gt(0).to(at::kFloat).mul(p.presence_penalty));
  }
  if (p.logit_bias.defined()) x = x.add(p.logit_bias);
  if (p.use_min_new) {
    Tensor too_early = s.step.lt(p.min_new_tokens);
    x = x.masked_fill(p.stop_mask.bitwise_and(too_early.unsqueeze(1)), kNegInf);
  }
  return x;
}

Tensor sample_candidates(const Tensor& z, const Params& p, const State& s, bool force_aten);
Tensor race(Tensor cand, const Tensor& cand_ids, const Params& p, const State& s, bool force_aten);

std::pair<Tensor, Tensor> choose_tokens(const Tensor& x, const Params& p, const State& s, bool force_aten) {
  auto [xmax, greedy_tokens] = at::max(x, -1);
  Tensor bad = at::isnan(xmax).bitwise_or(xmax.eq(kNegInf));
  if (p.all_greedy) return {greedy_tokens, bad};
  Tensor z = x.sub(xmax.unsqueeze(1)).div(p.temperature);
  return {at::where(p.greedy, greedy_tokens, sample_candidates(z, p, s, force_aten)), bad};
}

// Step 8's top-k and top-p on candidates sorted by z, descending (twin: filter_sorted).
// Top-k drops what is below the k-th candidate, so ties with it stay (Hugging Face's
// rule); top-p compares unnormalised float64 prefix sums with top_p * total, which come
// out the same on a top-K list as on the whole sorted vocabulary (the CPU path's list).
Tensor filter_top_p(Tensor cand, const Params& p);

Tensor filter_sorted(Tensor cand, const Params& p) {
  if (p.use_top_k) {
    Tensor kth = cand.gather(1, p.top_k.clamp_max(cand.size(-1)).sub(1));
    cand = cand.masked_fill(cand.lt(kth), kNegInf);
  }
  return filter_top_p(cand, p);
}

Tensor filter_top_p(Tensor cand, const Params& p) {
  if (p.use_top_p) {
    Tensor cand_d = cand.to(at::kDouble);
    Tensor weight = at::exp(cand_d.sub(cand_d.narrow(1, 0, 1)));
    Tensor total = weight.cumsum(-1);
    Tensor limit = p.top_p.mul(total.narrow(1, total.size(1) - 1, 1));
    cand = cand.masked_fill(total.sub(weight).ge(limit), kNegInf);
  }
  return cand;
}

// Steps 8-9 on temperature-scaled logits z (B, V): candidates, filters, exponential race.
Tensor sample_candidates(const Tensor& z, const Params& p, const State& s, bool force_aten) {
  if (!p.sort_vocab) return race(z, Tensor(), p, s, force_aten);
  auto [cand, cand_ids] = at::sort(z, /*stable=*/true, -1, /*descending=*/true);
  return race(filter_sorted(cand, p), cand_ids, p, s, force_aten);
}

// Step 8's min-p and step 9's exponential race on filtered candidates. cand_ids
// undefined means cand covers the whole vocabulary in token order.
Tensor race(Tensor cand, const Tensor& cand_ids, const Params& p, const State& s, bool force_aten) {
  if (p.use_min_p) cand = cand.masked_fill(cand.lt(p.log_min_p), kNegInf);
  Tensor u = uniform_noise(p, s, cand_ids, force_aten);
  Tensor score = cand.to(at::kDouble).sub(at::log(at::log(u).neg()));
  Tensor winner = score.argmax(-1);
  return cand_ids.defined() ? cand_ids.gather(1, winner.unsqueeze(1)).squeeze(1) : winner;
}

void record_logprobs(const Tensor& logits, const Tensor& tokens, const Tensor& column, int64_t n, State& s) {
  Tensor logprobs = at::log_softmax(logits.to(at::kFloat), -1);
  s.out_logprobs.scatter_(1, column, logprobs.gather(1, tokens.unsqueeze(1)));
  if (n > 0) {
    auto [top_values, top_ids] = at::topk(logprobs, n, -1);
    Tensor top_column = column.unsqueeze(2).expand({-1, 1, n});
    s.out_top_logprobs.scatter_(1, top_column, top_values.unsqueeze(1));
    s.out_top_ids.scatter_(1, top_column, top_ids.unsqueeze(1));
  }
}

Tensor sample_step_aten(const Tensor& logits, const Params& p, State& s, bool force_aten) {
  const int64_t batch = s.tokens.size(0);
  auto [tokens, bad] = choose_tokens(process_logits(logits, p, s), p, s, force_aten);
  Tensor active = s.finished.logical_not();
  s.bad_step.copy_(at::where(bad.bitwise_and(active).bitwise_and(s.bad_step.lt(0)), s.step, s.bad_step));
  tokens = at::where(active, tokens, s.tokens.select(1, 0));
  Tensor column = s.step.expand({batch}).unsqueeze(1);
  s.out_tokens.scatter_(1, column, at::where(active, tokens, -1).unsqueeze(1));
  if (p.num_logprobs >= 0) record_logprobs(logits, tokens, column, p.num_logprobs, s);
  Tensor active_long = active.to(at::kLong);
  s.generated.add_(active_long);
  Tensor done = active.bitwise_and(s.generated.ge(p.max_new_tokens));
  Tensor reason = at::where(done, kFinishLength, s.finish_reason);
  if (p.stop_mask.defined()) {
    Tensor hit_stop = active.bitwise_and(p.stop_mask.gather(1, tokens.unsqueeze(1)).squeeze(1));
    reason = at::where(hit_stop, kFinishStopToken, reason);
    done = done.bitwise_or(hit_stop);
  }
  s.finish_reason.copy_(reason);
  s.finished.logical_or_(done);
  if (s.counts.defined()) s.counts.scatter_add_(1, tokens.unsqueeze(1), active.to(at::kInt).unsqueeze(1));
  s.positions.add_(active_long.unsqueeze(1));
  s.tokens.copy_(tokens.unsqueeze(1));
  s.step.add_(1);
  return tokens;
}

// ---- CPU fast path ----------------------------------------------------------------------
//
// Same arithmetic as the ATen path, element by element: IEEE float +, -, *, / round the
// same whether vectorised or not (the ISO C++ mode keeps the compiler from contracting
// them into FMAs), and the max / argmax keeps torch.max's rules: the first maximum wins,
// and the first NaN wins over everything.

template <typename T>
const T* ptr_or_null(const Tensor& t, bool wanted) {
  return wanted && t.defined() ? t.data_ptr<T>() : nullptr;
}

bool all_on_cpu_contiguous(std::initializer_list<Tensor> tensors) {
  for (const Tensor& t : tensors) {
    if (t.defined() && (!t.device().is_cpu() || !t.is_contiguous())) return false;
  }
  return true;
}

// Every tensor the CPU loops read or write through raw pointers (the speculative round's
// fast path shares this list).
bool params_and_state_on_cpu(const Params& p, const State& s) {
  return all_on_cpu_contiguous({p.greedy, p.temperature, p.top_k, p.repetition_penalty, p.presence_penalty,
                                p.frequency_penalty, p.min_new_tokens, p.max_new_tokens, p.logit_bias, p.stop_mask,
                                s.tokens, s.positions, s.step, s.generated, s.finished, s.finish_reason, s.bad_step,
                                s.out_tokens, s.counts, s.prompt_seen});
}

bool cpu_fast_path_applies(const Tensor& logits, const Params& p, const State& s) {
  return logits.device().is_cpu() && params_and_state_on_cpu(p, s);
}

// torch.max(dim)'s index on one row: the first position holding the maximum (ties, and
// -0.0 == 0.0, resolve to the earliest, as in torch), or the first NaN when there is one.
inline int64_t first_nan(const float* x, int64_t n) {
  int64_t index = 0;
  while (index < n && !std::isnan(x[index])) ++index;
  return index;
}

inline int64_t argmax_row_scalar(const float* x, int64_t n) {
  int64_t best = 0;
  float m = x[0];
  if (std::isnan(m)) return 0;
  for (int64_t i = 1; i < n; ++i) {
    const float v = x[i];
    if (v > m) {
      m = v;
      best = i;
    } else if (std::isnan(v)) {
      return i;
    }
  }
  return best;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GPTFAST_HAVE_AVX2 1
// One pass, eight lanes: each lane keeps its largest value and the first index where it
// saw it (a strict > never replaces an equal earlier value); a NaN anywhere sends the
// row to first_nan. The answer is the smallest index among the lanes holding the overall
// maximum, then the scalar tail continues from there. Compiled for AVX2 whatever the
// build flags, and called only on CPUs that have it.
__attribute__((target("avx2"))) int64_t argmax_row_avx2(const float* x, int64_t n) {
  __m256 lane_max = _mm256_loadu_ps(x);
  __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i index = lane_index;
  const __m256i eight = _mm256_set1_epi32(8);
  __m256 any_nan = _mm256_cmp_ps(lane_max, lane_max, _CMP_UNORD_Q);
  int64_t i = 8;
  for (; i + 8 <= n; i += 8) {
    index = _mm256_add_epi32(index, eight);
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 greater = _mm256_cmp_ps(v, lane_max, _CMP_GT_OQ);
    any_nan = _mm256_or_ps(any_nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    lane_max = _mm256_blendv_ps(lane_max, v, greater);
    lane_index = _mm256_blendv_epi8(lane_index, index, _mm256_castps_si256(greater));
  }
  if (_mm256_movemask_ps(any_nan) != 0) return first_nan(x, n);
  alignas(32) float values[8];
  alignas(32) int32_t indices[8];
  _mm256_store_ps(values, lane_max);
  _mm256_store_si256(reinterpret_cast<__m256i*>(indices), lane_index);
  float m = values[0];
  int64_t best = indices[0];
  for (int k = 1; k < 8; ++k) {
    if (values[k] > m || (values[k] == m && indices[k] < best)) {
      m = values[k];
      best = indices[k];
    }
  }
  for (; i < n; ++i) {  // the tail; no NaN before it
    if (x[i] > m) {
      m = x[i];
      best = i;
    } else if (std::isnan(x[i])) {
      return i;
    }
  }
  return best;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

inline int64_t argmax_row(const float* x, int64_t n) {
#ifdef GPTFAST_HAVE_AVX2
  if (n >= 64 && n < (int64_t{1} << 31) && cpu_has_avx2()) return argmax_row_avx2(x, n);
#endif
  return argmax_row_scalar(x, n);
}

// The twin's "bad logits" test on a row's maximum: NaN, or -inf (every token masked).
inline bool is_bad_max(float m) { return std::isnan(m) || m == -std::numeric_limits<float>::infinity(); }

// The first chunk start c = from, from + 8, ... (c + 8 <= n) whose eight logits hold one
// that passes `threshold`: above it or NaN (kAboveOrNaN), or at least it (kAtLeast);
// the first c with c + 8 > n when none does. The top-k scan below calls it with a
// threshold that only rises, so it runs over most of the row without stopping.
enum class Pass { kAboveOrNaN, kAtLeast };

template <Pass pass>
inline bool passes(float value, float threshold) {
  return pass == Pass::kAboveOrNaN ? !(value <= threshold) : value >= threshold;
}

template <Pass pass>
int64_t next_chunk_scalar(const float* x, int64_t from, int64_t n, float threshold) {
  for (; from + 8 <= n; from += 8) {
    bool hit = false;
    for (int j = 0; j < 8; ++j) hit |= passes<pass>(x[from + j], threshold);
    if (hit) return from;
  }
  return from;
}

#ifdef GPTFAST_HAVE_AVX2
template <Pass pass>
__attribute__((target("avx2"))) int64_t next_chunk_avx2(const float* x, int64_t from, int64_t n, float threshold) {
  const __m256 t = _mm256_set1_ps(threshold);
  for (; from + 8 <= n; from += 8) {
    const __m256 v = _mm256_loadu_ps(x + from);
    const __m256 hit = pass == Pass::kAboveOrNaN ? _mm256_cmp_ps(v, t, _CMP_NLE_UQ) : _mm256_cmp_ps(v, t, _CMP_GE_OQ);
    if (_mm256_movemask_ps(hit) != 0) return from;
  }
  return from;
}
#endif

template <Pass pass>
inline int64_t next_chunk(const float* x, int64_t from, int64_t n, float threshold) {
#ifdef GPTFAST_HAVE_AVX2
  if (cpu_has_avx2()) return next_chunk_avx2<pass>(x, from, n, threshold);
#endif
  return next_chunk_scalar<pass>(x, from, n, threshold);
}

// Rows per task so that each task covers at least ~64k logits (smaller work stays serial).
inline int64_t row_grain(int64_t vocab) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(vocab, 1));
}

// at::topk(z, k) (largest, sorted) of one CPU row, z = (x - m) / t with t > 0, where the
// answer is unique, found without computing z for the whole row. Then the k largest z
// are strictly above every other z, so for every row's top_k <= k the tokens that
// top-k keeps (ties with the k-th included) are the first top_k of this list, and the
// list stands in for the sorted vocabulary. z is a non-decreasing
// function of x, so the k largest z are among the k + 1 largest x: a size-(k+1) min-heap
// finds those in one pass over x (eight logits at a time against the heap's minimum,
// which skips most of the row). Their z, in order, must then be strictly decreasing:
// then every other token has z <= the (k+1)-th's < the k-th's, the top k is the only
// possible answer, and it equals torch.topk's. Returns false otherwise (ties, NaN, or
// the (k+1)-th x tied with another), and the caller sorts the whole vocabulary instead.
bool unique_topk_row(const float* x, int64_t vocab, int64_t k, float m, float t, float* values, int64_t* indices,
                     std::vector<float>& heap, std::vector<std::pair<float, int64_t>>& top) {
  const int64_t keep = k + 1;  // callers guarantee 4 * k <= vocab
  heap.assign(x, x + keep);
  for (float value : heap) {
    if (std::isnan(value)) return false;  // torch.topk ranks NaN above everything
  }
  std::make_heap(heap.begin(), heap.end(), std::greater<float>());
  auto offer = [&](float value) {
    if (value > heap.front()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
      heap.back() = value;
      std::push_heap(heap.begin(), heap.end(), std::greater<float>());
    }
  };
  int64_t v = keep;
  while ((v = next_chunk<Pass::kAboveOrNaN>(x, v, vocab, heap.front())) + 8 <= vocab) {
    for (int j = 0; j < 8; ++j, ++v) {
      if (std::isnan(x[v])) return false;
      offer(x[v]);
    }
  }
  for (; v < vocab; ++v) {
    if (std::isnan(x[v])) return false;
    offer(x[v]);
  }
  const float threshold = heap.front();
  top.clear();
  auto collect = [&](int64_t i) {
    if (x[i] < threshold) return true;
    if (static_cast<int64_t>(top.size()) == keep) return false;  // the (k+1)-th x is tied
    top.emplace_back(x[i], i);
    return true;
  };
  int64_t i = 0;
  while ((i = next_chunk<Pass::kAtLeast>(x, i, vocab, threshold)) + 8 <= vocab) {
    for (int j = 0; j < 8; ++j, ++i) {
      if (!collect(i)) return false;
    }
  }
  for (; i < vocab; ++i) {
    if (!collect(i)) return false;
  }
  if (static_cast<int64_t>(top.size()) != keep) return false;
  std::sort(top.begin(), top.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  float previous = (top[0].first - m) / t;
  for (int64_t i = 0; i < k; ++i) {
    const float next = (top[i + 1].first - m) / t;
    if (!(previous > next)) return false;  // a tie in z (or NaN): torch.topk's order decides
    values[i] = previous;
    indices[i] = top[i].second;
    previous = next;
  }
  return true;
}

// Step 1 on one row, without a branch per token so that it vectorises: every logit's
// penalised value is computed, and kept where the token was seen. The AVX2 entry point
// inlines the same body, compiled for AVX2.
__attribute__((always_inline)) inline void apply_repetition_penalty(float* x, const int32_t* counts,
                                                                    const uint8_t* prompt_seen, int64_t n,
                                                                    float penalty) {
  // (A division, not a multiply by 1 / penalty: it must round as the twin's does.)
  if (prompt_seen == nullptr) {
    for (int64_t v = 0; v < n; ++v) {
      const float value = x[v];
      const float scaled_up = value * penalty, scaled_down = value / penalty;  // both, branch-free
      const float penalized = value < 0 ? scaled_up : scaled_down;
      x[v] = counts[v] > 0 ? penalized : value;
    }
  } else {
    for (int64_t v = 0; v < n; ++v) {
      const float value = x[v];
      const float scaled_up = value * penalty, scaled_down = value / penalty;  // both, branch-free
      const float penalized = value < 0 ? scaled_up : scaled_down;
      x[v] = ((counts[v] > 0) | (prompt_seen[v] != 0)) ? penalized : value;
    }
  }
}

#ifdef GPTFAST_HAVE_AVX2
__attribute__((target("avx2"))) void apply_repetition_penalty_avx2(float* x, const int32_t* counts,
                                                                   const uint8_t* prompt_seen, int64_t n, float penalty) {
  apply_repetition_penalty(x, counts, prompt_seen, n, penalty);
}
#endif

// Steps 1-4 of the twin on one row, one simple loop per active processor.
template <typename scalar_t>
void process_row_cpu(const scalar_t* in, float* x, int64_t b, int64_t vocab, const Params& p, const State& s,
                     int64_t step) {
  for (int64_t v = 0; v < vocab; ++v) x[v] = static_cast<float>(in[v]);
  const int64_t row = b * vocab;
  const int32_t* counts = s.counts.defined() ? s.counts.data_ptr<int32_t>() + row : nullptr;
  if (p.use_repetition) {
    const float penalty = p.repetition_penalty.data_ptr<float>()[b];
    const uint8_t* prompt_seen =  // bool tensor: one byte per token, 0 or 1
        s.prompt_seen.defined() ? reinterpret_cast<const uint8_t*>(s.prompt_seen.data_ptr<bool>()) + row : nullptr;
#ifdef GPTFAST_HAVE_AVX2
    if (cpu_has_avx2()) {
      apply_repetition_penalty_avx2(x, counts, prompt_seen, vocab, penalty);
    } else
#endif
    {
      apply_repetition_penalty(x, counts, prompt_seen, vocab, penalty);
    }
  }
  if (p.use_presence_frequency) {
    const float frequency = p.frequency_penalty.data_ptr<float>()[b];
    const float presence = p.presence_penalty.data_ptr<float>()[b];
    for (int64_t v = 0; v < vocab; ++v) {
      const float count = static_cast<float>(counts[v]);
      const float present = counts[v] > 0 ? 1.0f : 0.0f;
      x[v] = x[v] - count * frequency - present * presence;
    }
  }
  if (p.logit_bias.defined()) {
    const float* bias = p.logit_bias.data_ptr<float>() + row;
    for (int64_t v = 0; v < vocab; ++v) x[v] = x[v] + bias[v];
  }
  if (p.use_min_new && step < p.min_new_tokens.data_ptr<int64_t>()[b]) {
    const bool* stop = p.stop_mask.data_ptr<bool>() + row;
    for (int64_t v = 0; v < vocab; ++v) {
      if (stop[v]) x[v] = -std::numeric_limits<float>::infinity();
    }
  }
}

// choose_tokens on the CPU, row by row while the row is in cache: processors, max and
// argmax, z = (x - max) / T, and (when every sampled row has a top_k <= K) the row's top
// K; then the filters and the race through ATen as in the general path. A tie at a top-K
// list's end (where top-k might keep tokens past it) sends the batch to the sorted path.
std::pair<Tensor, Tensor> choose_tokens_cpu(const Tensor& logits, const Params& p, const State& s) {
  const int64_t rows = logits.size(0), vocab = logits.size(1), k = p.max_top_k;
  const int64_t step = s.step.data_ptr<int64_t>()[0];
  Tensor src = logits.contiguous();
  const bool any_processor = p.use_repetition || p.use_presence_frequency || p.logit_bias.defined() || p.use_min_new;
  const bool own_x = any_processor || src.scalar_type() != at::kFloat;
  const bool row_topk = !p.all_greedy && k > 0 && k * 4 <= vocab;  // top K found per row here
  const bool full_z = !p.all_greedy && !row_topk;                 // z for sample_candidates
  const auto f32 = src.options().dtype(at::kFloat);
  Tensor x = own_x ? at::empty({rows, vocab}, f32) : src;  // with no processor, the logits themselves
  Tensor z = full_z ? at::empty({rows, vocab}, f32) : Tensor();
  Tensor cand = row_topk ? at::zeros({rows, k}, f32) : Tensor();
  Tensor cand_ids = row_topk ? at::arange(k, src.options().dtype(at::kLong)).repeat({rows, 1}) : Tensor();
  Tensor greedy_tokens = at::empty({rows}, src.options().dtype(at::kLong));
  Tensor bad = at::empty({rows}, src.options().dtype(at::kBool));
  std::vector<char> topk_fallback(rows, 0);
  const bool* greedy_rows = p.greedy.data_ptr<bool>();
  const float* temperature = p.temperature.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "choose_tokens_cpu", [&] {
    at::parallel_for(0, rows, row_grain(vocab), [&](int64_t row_begin, int64_t row_end) {
      std::vector<float> heap;
      std::vector<std::pair<float, int64_t>> top;
      for (int64_t b = row_begin; b < row_end; ++b) {
        float* xr = x.data_ptr<float>() + b * vocab;
        if (own_x) process_row_cpu<scalar_t>(src.data_ptr<scalar_t>() + b * vocab, xr, b, vocab, p, s, step);
        const int64_t index = argmax_row(xr, vocab);
        const float m = xr[index];  // torch.max's value: the first maximum's own bits
        greedy_tokens.data_ptr<int64_t>()[b] = index;
        bad.data_ptr<bool>()[b] = is_bad_max(m);
        if (p.all_greedy || (row_topk && greedy_rows[b])) continue;  // greedy rows need no candidates
        if (row_topk) {
          topk_fallback[b] = !unique_topk_row(xr, vocab, k, m, temperature[b], cand.data_ptr<float>() + b * k,
                                               cand_ids.data_ptr<int64_t>() + b * k, heap, top);
        } else {
          float* zr = z.data_ptr<float>() + b * vocab;
          for (int64_t v = 0; v < vocab; ++v) zr[v] = (xr[v] - m) / temperature[b];
        }
      }
    });
  });
  if (p.all_greedy) return {greedy_tokens, bad};
  if (!row_topk) return {at::where(p.greedy, greedy_tokens, sample_candidates(z, p, s, false)), bad};
  if (std::find(topk_fallback.begin(), topk_fallback.end(), 1) != topk_fallback.end()) {
    Tensor z_all = x.sub(std::get<0>(at::max(x, -1)).unsqueeze(1)).div(p.temperature);  // the twin's z
    return {at::where(p.greedy, greedy_tokens, sample_candidates(z_all, p, s, false)), bad};
  }
  if (p.use_top_k) {  // filter_sorted's top-k on the list, as a loop (the list's z strictly decrease)
    const int64_t* top_k = p.top_k.data_ptr<int64_t>();
    for (int64_t b = 0; b < rows; ++b) {
      float* values = cand.data_ptr<float>() + b * k;
      for (int64_t i = std::min(top_k[b], k); i < k; ++i) values[i] = -std::numeric_limits<float>::infinity();
    }
  }
  return {at::where(p.greedy, greedy_tokens, race(filter_top_p(cand, p), cand_ids, p, s, false)), bad};
}

// The twin's bookkeeping after the choice, as a loop over rows.
Tensor advance_state_cpu(const Tensor& logits, Tensor tokens, const Tensor& bad, const Params& p, State& s) {
  const int64_t rows = s.tokens.size(0), width = s.out_tokens.size(1);
  const int64_t step = s.step.data_ptr<int64_t>()[0];
  TORCH_CHECK(step < width, "decode step ", step, " is past the output buffer of ", width, " tokens");
  const int64_t vocab = p.table.size(0);
  int64_t* token_p = tokens.data_ptr<int64_t>();
  const bool* bad_p = bad.data_ptr<bool>();
  const bool* finished_p = s.finished.data_ptr<bool>();
  int64_t* last_p = s.tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b) {
    const bool active = !finished_p[b];
    if (bad_p[b] && active && s.bad_step.data_ptr<int64_t>()[b] < 0) s.bad_step.data_ptr<int64_t>()[b] = step;
    if (!active) token_p[b] = last_p[b];
    s.out_tokens.data_ptr<int64_t>()[b * width + step] = active ? token_p[b] : -1;
  }
  if (p.num_logprobs >= 0) {
    record_logprobs(logits, tokens, s.step.expand({rows}).unsqueeze(1), p.num_logprobs, s);
  }
  const int64_t* max_new = p.max_new_tokens.data_ptr<int64_t>();
  const bool* stop = ptr_or_null<bool>(p.stop_mask, true);
  int32_t* counts = s.counts.defined() ? s.counts.data_ptr<int32_t>() : nullptr;
  for (int64_t b = 0; b < rows; ++b) {
    const bool active = !finished_p[b];
    const int64_t token = token_p[b];
    int64_t& generated = s.generated.data_ptr<int64_t>()[b];
    generated += active ? 1 : 0;
    bool done = active && generated >= max_new[b];
    int64_t reason = done ? kFinishLength : s.finish_reason.data_ptr<int64_t>()[b];
    if (stop != nullptr && active && stop[b * vocab + token]) {
      reason = kFinishStopToken;
      done = true;
    }
    s.finish_reason.data_ptr<int64_t>()[b] = reason;
    if (done) s.finished.data_ptr<bool>()[b] = true;
    if (counts != nullptr && active) counts[b * vocab + token] += 1;
    if (active) s.positions.data_ptr<int64_t>()[b] += 1;
    last_p[b] = token;
  }
  s.step.data_ptr<int64_t>()[0] += 1;
  return tokens;
}

Tensor sample_step_cpu(const Tensor& logits, const Params& p, State& s) {
  auto [tokens, bad] = choose_tokens_cpu(logits, p, s);
  return advance_state_cpu(logits, tokens.contiguous(), bad, p, s);
}

// ---- Python entry points -------------------------------------------------------------

Tensor sample_step_impl(const Tensor& logits_in, const Params& p, State& s, bool force_aten) {
  const int64_t batch = s.tokens.size(0);
  TORCH_CHECK(logits_in.numel() == batch * p.table.size(0), "sample_step: logits of shape ", logits_in.sizes(),
              " do not hold ", batch, " rows of the vocabulary size ", p.table.size(0));
  TORCH_CHECK(logits_in.is_floating_point(), "sample_step: logits must be floating point, got ",
              logits_in.scalar_type());
  Tensor logits = logits_in.reshape({batch, -1});
  if (!force_aten && cpu_fast_path_applies(logits, p, s)) return sample_step_cpu(logits, p, s);
  return sample_step_aten(logits, p, s, force_aten);
}

Tensor sample_step(const Tensor& logits, py::handle params, py::handle state, bool force_aten) {
  Params p = Params::from(params);
  State s = State::from(state);
  check_consistent(p, s);
  return sample_step_impl(logits, p, s, force_aten);
}

// The decode loop. Each iteration runs one model step and one sampling step: either
// `model_step(tokens, positions) -> logits` followed by sample_step here, or, with
// `graph_replay`, `model_step()` alone, which replays a CUDA graph that captured both.
// The host looks at the device only every `sync_every` generated tokens (and when the
// loop ends): `on_sync(tokens_generated)` reads the finished flags and the new tokens in
// one transfer, streams, checks stop strings, and returns True when every row is done.
// On CPU tensors a host read costs nothing, so the loop also checks for finished rows
// and bad logits after every step and syncs at once when it finds either.
bool any_row_needs_the_host(const State& s) {  // CPU state: all rows finished, or bad logits
  const int64_t rows = s.finished.numel();
  const bool* finished = s.finished.data_ptr<bool>();
  const int64_t* bad_step = s.bad_step.data_ptr<int64_t>();
  bool all_finished = true;
  for (int64_t b = 0; b < rows; ++b) {
    if (bad_step[b] >= 0) return true;
    all_finished = all_finished && finished[b];
  }
  return all_finished;
}

int64_t decode_loop(py::handle params, py::handle state, py::function model_step, bool graph_replay,
                    py::function on_sync, int64_t num_steps, int64_t sync_every, int64_t first_step, bool force_aten) {
  TORCH_CHECK(sync_every >= 1, "decode_loop: sync_every must be >= 1, got ", sync_every);
  TORCH_CHECK(num_steps >= 0, "decode_loop: num_steps must be >= 0, got ", num_steps);
  Params p = Params::from(params);
  State s = State::from(state);
  check_consistent(p, s);
  const bool host_reads_are_free = all_on_cpu_contiguous({s.finished, s.bad_step});
  for (int64_t i = 0; i < num_steps; ++i) {
    if (graph_replay) {
      model_step();
    } else {
      Tensor logits = model_step(s.tokens, s.positions).cast<Tensor>();
      sample_step_impl(logits, p, s, force_aten);
    }
    const int64_t generated = first_step + i + 1;
    bool sync = generated % sync_every == 0 || i + 1 == num_steps;
    if (!sync && host_reads_are_free) sync = any_row_needs_the_host(s);
    if (sync && on_sync(generated).cast<bool>()) return i + 1;
  }
  return num_steps;
}


// ---- speculative decoding (twin: gptfast/reference/speculative.py) ----------------------
//
// One round per call of speculative_round: the draft proposes k tokens, the target
// verifies them in one forward, the acceptance rule keeps a prefix plus one token, and the
// state advances. Every step is the twin's sequence of ATen ops, so both pick the same
// tokens; the noise comes from the same counter-based hash (CPU fast path or ATen: same bits).
// On CPU state with every row greedy, the round's CPU fast path (after speculative_round)
// does the same in loops.

constexpr int64_t kStreamDraft = 1, kStreamAccept = 2, kStreamResidual = 3;
constexpr int64_t kSaltStream = 0x2C1B3C6DLL;

struct SpecState {  // mirrors gptfast.decode_state.SpeculativeState
  Tensor prev_tokens, drafted, accepted;

  static SpecState from(py::handle o) {
    return {tensor_attr(o, "prev_tokens"), tensor_attr(o, "drafted"), tensor_attr(o, "accepted")};
  }
};

Tensor stream_seed(const Tensor& seed, int64_t stream) {
  return seed.bitwise_xor(((kSaltStream * stream) & 0x7FFFFFFFLL) << 32);
}

Tensor noise(const Tensor& seed, const Tensor& step, const Tensor& table, const Tensor& token_ids, bool force_aten) {
  if (!force_aten && seed.device().is_cpu()) return uniform_noise_cpu(seed, step, table, token_ids);
  return uniform_noise_aten(seed, step, table, token_ids);
}

Tensor filtered_z(const Tensor& x, const Tensor& xmax, const Params& p) {
  Tensor z = x.sub(xmax.unsqueeze(1)).div(p.temperature);
  if (p.sort_vocab) {
    auto [cand, ids] = at::sort(z, /*stable=*/true, -1, /*descending=*/true);
    z = at::empty_like(z).scatter_(1, ids, filter_sorted(cand, p));
  }
  if (p.use_min_p) z = z.masked_fill(z.lt(p.log_min_p), kNegInf);
  return z;
}

Tensor race_full(const Tensor& log_weights, const Tensor& seed, const Tensor& step, const Tensor& table,
                 bool force_aten) {
  Tensor u = noise(seed, step, table, Tensor(), force_aten);
  return log_weights.to(at::kDouble).sub(at::log(at::log(u).neg())).argmax(-1);
}

State lookahead(const State& s, const Tensor& counts, int64_t j) {
  State view = s;
  view.step = s.generated.add(j);
  view.counts = counts;
  return view;
}

Tensor is_bad(const Tensor& xmax) { return at::isnan(xmax).bitwise_or(xmax.eq(kNegInf)); }

void count_tokens(const Tensor& counts, const Tensor& tokens) {
  if (counts.defined()) counts.scatter_add_(1, tokens.unsqueeze(1), at::ones_like(tokens, at::kInt).unsqueeze(1));
}

struct Proposal {
  Tensor drafts, bad;
  std::vector<Tensor> weights;
};

Proposal propose(const Params& p, const State& s, const SpecState& spec, const py::function& draft_step, int64_t k,
                 bool force_aten) {
  Tensor counts = s.counts.defined() ? s.counts.clone() : Tensor();
  Tensor tokens = at::cat({spec.prev_tokens, s.tokens}, 1);
  Tensor positions = at::cat({s.positions.sub(1), s.positions}, 1);
  std::vector<Tensor> drafts, bad;
  Proposal out;
  for (int64_t j = 0; j < k; ++j) {
    State view = lookahead(s, counts, j);
    Tensor logits = draft_step(tokens, positions).cast<Tensor>();
    Tensor x = process_logits(logits.select(1, logits.size(1) - 1), p, view);
    auto [xmax, top] = at::max(x, -1);
    Tensor token = top;
    if (!p.all_greedy) {
      Tensor z = filtered_z(x, xmax, p);
      token = at::where(p.greedy, top, race_full(z, stream_seed(p.seed, kStreamDraft), view.step, p.table, force_aten));
      out.weights.push_back(z);
    }
    bad.push_back(is_bad(xmax));
    drafts.push_back(token);
    count_tokens(counts, token);
    tokens = token.unsqueeze(1);
    positions = s.positions.add(j + 1);
  }
  out.drafts = at::stack(drafts, 1);
  out.bad = at::stack(bad, 1);
  return out;
}

std::pair<Tensor, Tensor> judge(const Tensor& d, const Tensor& x, const Tensor& xmax, const Tensor& top,
                                const Tensor& q_weights, const Tensor& q_bad, const Params& p, const State& view,
                                bool force_aten) {
  Tensor target = at::softmax(filtered_z(x, xmax, p).to(at::kDouble), -1);
  Tensor draft = at::softmax(q_weights.to(at::kDouble), -1).masked_fill(q_bad.unsqueeze(1), 0.0);
  Tensor zeros = at::zeros_like(d).unsqueeze(1);
  Tensor u = noise(stream_seed(p.seed, kStreamAccept), view.step, p.table, zeros, force_aten).select(1, 0);
  Tensor take = u.mul(draft.gather(1, d.unsqueeze(1)).select(1, 0))
                    .lt(target.gather(1, d.unsqueeze(1)).select(1, 0))
                    .bitwise_and(q_bad.logical_not());
  Tensor residual = target.sub(draft).clamp_min(0.0);
  residual = at::where(residual.sum(-1, /*keepdim=*/true).gt(0), residual, target);
  Tensor fix = race_full(at::log(residual), stream_seed(p.seed, kStreamResidual), view.step, p.table, force_aten);
  return {at::where(p.greedy, d.eq(top), take), at::where(p.greedy, top, fix)};
}

// Steps 2-3 on the verify logits: (block (B, k+1), accepted drafts (B,), bad indices (B, k+1)).
std::tuple<Tensor, Tensor, Tensor> accept(const Tensor& logits, const Proposal& prop, const Params& p, const State& s,
                                          int64_t k, bool force_aten) {
  Tensor counts = s.counts.defined() ? s.counts.clone() : Tensor();
  std::vector<Tensor> ok, fixes, bad;
  for (int64_t j = 0; j <= k; ++j) {
    State view = lookahead(s, counts, j);
    Tensor x = process_logits(logits.select(1, j), p, view);
    auto [xmax, top] = at::max(x, -1);
    bad.push_back(is_bad(xmax));
    if (j == k) {
      if (!p.all_greedy) {
        top = at::where(p.greedy, top, race_full(filtered_z(x, xmax, p), p.seed, view.step, p.table, force_aten));
      }
      fixes.push_back(top);
      break;
    }
    Tensor d = prop.drafts.select(1, j);
    if (p.all_greedy) {
      ok.push_back(d.eq(top));
      fixes.push_back(top);
    } else {
      auto [take, fix] = judge(d, x, xmax, top, prop.weights[j], prop.bad.select(1, j), p, view, force_aten);
      ok.push_back(take);
      fixes.push_back(fix);
    }
    count_tokens(counts, d);
  }
  Tensor n_accepted = at::stack(ok, 1).to(at::kLong).cumprod(1).sum(1);
  Tensor index = at::arange(k + 1, prop.drafts.options());
  Tensor block = at::where(index.lt(n_accepted.unsqueeze(1)), at::cat({prop.drafts, prop.drafts.narrow(1, 0, 1)}, 1),
                           at::stack(fixes, 1));
  return {block, n_accepted, at::stack(bad, 1)};
}

void put(Tensor& buffer, const Tensor& column, const Tensor& values, const Tensor& keep) {
  std::vector<int64_t> shape{-1, 1}, expand{-1, 1};
  for (int64_t d = 2; d < buffer.dim(); ++d) {
    shape.push_back(1);
    expand.push_back(buffer.size(d));
  }
  Tensor index = column.view(shape).expand(expand);
  Tensor old = buffer.gather(1, index);
  buffer.scatter_(1, index, at::where(keep.view(shape), values.unsqueeze(1), old));
}

std::pair<Tensor, Tensor> emitted(const Tensor& block, const Tensor& n_accepted, const Params& p, const State& s) {
  Tensor index = at::arange(block.size(1), block.options());
  Tensor n = n_accepted.add(1);
  Tensor hit_stop = at::zeros_like(s.finished);
  if (p.stop_mask.defined()) {
    Tensor stops = p.stop_mask.gather(1, block).bitwise_and(index.lt(n.unsqueeze(1)));
    Tensor any_stop = stops.any(1);
    n = at::where(any_stop, stops.to(at::kInt).argmax(1).add(1), n);
    hit_stop = any_stop;
  }
  Tensor room = p.max_new_tokens.sub(s.generated);
  hit_stop = hit_stop.bitwise_and(n.le(room));
  Tensor active = s.finished.logical_not();
  return {at::where(active, at::minimum(n, room), 0), hit_stop.bitwise_and(active)};
}

void commit(const Tensor& logits, const Tensor& block, const Tensor& n_accepted, const Tensor& bad, const Params& p,
            State& s, SpecState& spec) {
  const int64_t k1 = block.size(1), width = s.out_tokens.size(1);
  auto [n, hit_stop] = emitted(block, n_accepted, p, s);
  Tensor active = s.finished.logical_not();
  Tensor index = at::arange(k1, block.options());
  Tensor keep = index.lt(n.unsqueeze(1));
  Tensor bad_in = bad.bitwise_and(keep);
  Tensor first_bad = s.generated.add(bad_in.to(at::kInt).argmax(1));
  s.bad_step.copy_(at::where(bad_in.any(1).bitwise_and(s.bad_step.lt(0)), first_bad, s.bad_step));
  Tensor logprobs = p.num_logprobs >= 0 ? at::log_softmax(logits.to(at::kFloat), -1) : Tensor();
  for (int64_t i = 0; i < k1; ++i) {
    Tensor column = s.generated.add(i).clamp_max(width - 1);
    Tensor keep_i = keep.select(1, i);
    put(s.out_tokens, column, block.select(1, i), keep_i);
    if (logprobs.defined()) {
      Tensor row = logprobs.select(1, i);
      put(s.out_logprobs, column, row.gather(1, block.narrow(1, i, 1)).select(1, 0), keep_i);
      if (p.num_logprobs > 0) {
        auto [top_values, top_ids] = at::topk(row, p.num_logprobs, -1);
        put(s.out_top_logprobs, column, top_values, keep_i);
        put(s.out_top_ids, column, top_ids, keep_i);
      }
    }
  }
  if (s.counts.defined()) s.counts.scatter_add_(1, block, keep.to(at::kInt));
  Tensor last = block.gather(1, n.sub(1).clamp_min(0).unsqueeze(1));
  Tensor before = block.gather(1, n.sub(2).clamp_min(0).unsqueeze(1));
  spec.prev_tokens.copy_(at::where(n.ge(2).unsqueeze(1), before,
                                   at::where(n.eq(1).unsqueeze(1), s.tokens, spec.prev_tokens)));
  s.tokens.copy_(at::where(n.ge(1).unsqueeze(1), last, s.tokens));
  s.generated.add_(n);
  s.positions.add_(n.unsqueeze(1));
  Tensor done = active.bitwise_and(s.generated.ge(p.max_new_tokens));
  Tensor reason = at::where(done, kFinishLength, s.finish_reason);
  s.finish_reason.copy_(at::where(hit_stop, kFinishStopToken, reason));
  s.finished.logical_or_(done.bitwise_or(hit_stop));
  spec.drafted.add_(active.to(at::kLong).mul(k1 - 1));
  spec.accepted.add_(at::where(active, n_accepted, 0));
}

void speculative_round(const Params& p, State& s, SpecState& spec, const py::function& draft_step,
                       const py::function& verify_step, int64_t k, bool force_aten) {
  Proposal prop = propose(p, s, spec, draft_step, k, force_aten);
  Tensor positions = s.positions.add(at::arange(k + 1, s.positions.options()));
  Tensor logits = verify_step(at::cat({s.tokens, prop.drafts}, 1), positions).cast<Tensor>();
  auto [block, n_accepted, bad] = accept(logits, prop, p, s, k, force_aten);
  commit(logits, block, n_accepted, bad, p, s, spec);
}

// ---- speculative round, CPU fast path (every row greedy) ---------------------------------
//
// With every row greedy and no logprobs, a round's bookkeeping is a few argmaxes and
// integer updates per row, yet as ATen ops above it is some 150-200 dispatches of tiny
// tensors: about half a millisecond a round, a quarter of a small model's generate on
// the CPU. On CPU state the same round runs here as loops over raw pointers, with the
// plain decode's helpers (process_row_cpu, argmax_row) and, per row, the arithmetic of
// propose / accept / emitted / commit, so every state tensor comes out bit for bit as
// the ATen path leaves it. Only the model steps' inputs are still built with ATen ops.

bool speculative_fast_path_applies(const Params& p, const State& s, const SpecState& spec) {
  return p.all_greedy && p.num_logprobs < 0 && params_and_state_on_cpu(p, s) &&
         all_on_cpu_contiguous({spec.prev_tokens, spec.drafted, spec.accepted});
}

// A model step's logits (B, T, V), T >= t_min, as a contiguous CPU tensor (any float dtype).
Tensor cpu_step_logits(const Tensor& logits, int64_t batch, int64_t t_min, int64_t vocab, const char* step) {
  TORCH_CHECK(logits.device().is_cpu() && logits.is_floating_point() && logits.dim() == 3 &&
                  logits.size(0) == batch && logits.size(1) >= t_min && logits.size(2) == vocab,
              "speculative_loop: ", step, " must return CPU float logits (", batch, ", >= ", t_min, ", ", vocab,
              ") on CPU state, got ", logits.scalar_type(), " ", logits.sizes(), " on ", logits.device());
  return logits.contiguous();
}

struct GreedyPick {
  int64_t token;
  bool bad;  // the twin's _bad: the row's maximum is NaN or -inf
};

// The greedy pick on one row of logits: steps 1-4 at output index `step` (into the
// scratch row x), then torch.max's argmax.
template <typename scalar_t>
GreedyPick greedy_pick(const scalar_t* in, float* x, int64_t b, int64_t vocab, const Params& p, const State& view,
                       int64_t step) {
  process_row_cpu<scalar_t>(in, x, b, vocab, p, view, step);
  const int64_t token = argmax_row(x, vocab);
  return {token, is_bad_max(x[token])};
}

inline void count_token(const Tensor& counts, int64_t b, int64_t vocab, int64_t token) {
  if (counts.defined()) counts.data_ptr<int32_t>()[b * vocab + token] += 1;
}

// propose for greedy rows: the drafts as a (k, B) tensor, so that draft j is a contiguous
// (B, 1) input for draft step j + 1. Every row drafts, finished or not, and its drafts
// count in the look-ahead counts, as in the ATen path (the draft's inputs are the same).
Tensor propose_cpu(const Params& p, const State& s, const SpecState& spec, const py::function& draft_step,
                   int64_t k) {
  const int64_t batch = s.tokens.size(0), vocab = p.table.size(0);
  State view = s;  // lookahead's: counts with the earlier drafts, step generated + j per row
  view.counts = s.counts.defined() ? s.counts.clone() : Tensor();
  const int64_t* generated = s.generated.data_ptr<int64_t>();
  Tensor drafts = at::empty({k, batch}, s.tokens.options());
  Tensor tokens = at::cat({spec.prev_tokens, s.tokens}, 1);
  Tensor positions = at::cat({s.positions.sub(1), s.positions}, 1);
  for (int64_t j = 0; j < k; ++j) {
    Tensor logits = cpu_step_logits(draft_step(tokens, positions).cast<Tensor>(), batch, 1, vocab, "draft_step");
    const int64_t t = logits.size(1);
    int64_t* out = drafts.data_ptr<int64_t>() + j * batch;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "propose_cpu", [&] {
      const scalar_t* last = logits.data_ptr<scalar_t>() + (t - 1) * vocab;  // row b's: + b * t * vocab
      at::parallel_for(0, batch, row_grain(vocab), [&](int64_t begin, int64_t end) {
        std::vector<float> x(vocab);
        for (int64_t b = begin; b < end; ++b) {  // (the draft's bad flags matter to sampled rows only)
          out[b] = greedy_pick(last + b * t * vocab, x.data(), b, vocab, p, view, generated[b] + j).token;
          count_token(view.counts, b, vocab, out[b]);
        }
      });
    });
    tokens = drafts.select(0, j).unsqueeze(1);
    positions = s.positions.add(j + 1);
  }
  return drafts;
}

// accept for one greedy row on its verify logits (k + 1, V): block[j] = the target's
// pick at index j, for j = 0 .. n_accepted (the accepted drafts equal it, then the
// correction or bonus token), bad[j] likewise; returns n_accepted. It stops at the first
// mismatch: indices past n_accepted never reach the state (a row keeps at most
// n_accepted + 1 tokens).
template <typename scalar_t>
int64_t accept_row(const scalar_t* logits, const int64_t* drafts, int64_t b, int64_t batch, int64_t k,
                   const Params& p, const State& view, float* x, int64_t* block, char* bad) {
  const int64_t vocab = p.table.size(0), generated = view.generated.data_ptr<int64_t>()[b];
  for (int64_t j = 0;; ++j) {
    const GreedyPick pick = greedy_pick(logits + j * vocab, x, b, vocab, p, view, generated + j);
    block[j] = pick.token;
    bad[j] = pick.bad;
    if (j == k || drafts[j * batch + b] != block[j]) return j;
    count_token(view.counts, b, vocab, block[j]);  // the accepted draft, for index j + 1
  }
}

// emitted and commit for one running row: block[0 .. n_accepted], bad likewise.
void commit_row(const int64_t* block, const char* bad, int64_t n_accepted, int64_t b, int64_t k, const Params& p,
                State& s, SpecState& spec) {
  const int64_t vocab = p.table.size(0), width = s.out_tokens.size(1);
  const int64_t max_new = p.max_new_tokens.data_ptr<int64_t>()[b];
  int64_t& generated = s.generated.data_ptr<int64_t>()[b];
  int64_t n = n_accepted + 1;  // emitted: cut after the first stop token, then at max_new_tokens
  bool hit_stop = false;
  const bool* stop = ptr_or_null<bool>(p.stop_mask, true);
  for (int64_t i = 0; stop != nullptr && i < n; ++i) {
    if (stop[b * vocab + block[i]]) {
      n = i + 1;
      hit_stop = true;
      break;
    }
  }
  const int64_t room = max_new - generated;
  hit_stop = hit_stop && n <= room;
  n = std::min(n, room);
  int64_t& bad_step = s.bad_step.data_ptr<int64_t>()[b];
  for (int64_t i = 0; i < n && bad_step < 0; ++i) {
    if (bad[i]) bad_step = generated + i;
  }
  for (int64_t i = 0; i < n; ++i) {  // a later index wins a clamped column, as put's order gives
    s.out_tokens.data_ptr<int64_t>()[b * width + std::min(generated + i, width - 1)] = block[i];
    count_token(s.counts, b, vocab, block[i]);
  }
  int64_t& token = s.tokens.data_ptr<int64_t>()[b];
  int64_t& prev = spec.prev_tokens.data_ptr<int64_t>()[b];
  if (n >= 2) prev = block[n - 2];
  if (n == 1) prev = token;
  if (n >= 1) token = block[n - 1];
  generated += n;
  s.positions.data_ptr<int64_t>()[b] += n;
  const bool done = generated >= max_new;
  if (done) s.finish_reason.data_ptr<int64_t>()[b] = kFinishLength;
  if (hit_stop) s.finish_reason.data_ptr<int64_t>()[b] = kFinishStopToken;  // a stop wins over the length
  if (done || hit_stop) s.finished.data_ptr<bool>()[b] = true;
  spec.drafted.data_ptr<int64_t>()[b] += k;
  spec.accepted.data_ptr<int64_t>()[b] += n_accepted;
}

// accept and commit, row by row (rows share nothing); a finished row emits nothing, and
// commit leaves its state as it is.
void accept_commit_cpu(const Tensor& logits, const Tensor& drafts, const Params& p, State& s, SpecState& spec,
                       int64_t k) {
  const int64_t batch = s.tokens.size(0), vocab = p.table.size(0);
  State view = s;  // lookahead's counts: a fresh copy, with the accepted drafts
  view.counts = s.counts.defined() ? s.counts.clone() : Tensor();
  const bool* finished = s.finished.data_ptr<bool>();
  const int64_t* draft_p = drafts.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "accept_commit_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, batch, row_grain(vocab * (k + 1)), [&](int64_t begin, int64_t end) {
      std::vector<float> x(vocab);
      std::vector<int64_t> block(k + 1);
      std::vector<char> bad(k + 1);
      for (int64_t b = begin; b < end; ++b) {
        if (finished[b]) continue;
        const scalar_t* rows = base + b * (k + 1) * vocab;
        const int64_t n = accept_row(rows, draft_p, b, batch, k, p, view, x.data(), block.data(), bad.data());
        commit_row(block.data(), bad.data(), n, b, k, p, s, spec);
      }
    });
  });
}

void speculative_round_cpu(const Params& p, State& s, SpecState& spec, const py::function& draft_step,
                           const py::function& verify_step, int64_t k) {
  Tensor drafts = propose_cpu(p, s, spec, draft_step, k);
  Tensor positions = s.positions.add(at::arange(k + 1, s.positions.options()));
  Tensor logits = verify_step(at::cat({s.tokens, drafts.t()}, 1), positions).cast<Tensor>();
  const int64_t batch = s.tokens.size(0), vocab = p.table.size(0);
  accept_commit_cpu(cpu_step_logits(logits, batch, k + 1, vocab, "verify_step"), drafts, p, s, spec, k);
}

// The speculative loop: rounds, with a host sync every `sync_rounds` rounds (and when it
// ends); on_sync gets an upper bound on any row's token count. On CPU state it also syncs
// as soon as every row is done or a row's logits went bad, as decode_loop does.
int64_t speculative_loop(py::handle params, py::handle state, py::handle spec_state, py::function draft_step,
                         py::function verify_step, py::function on_sync, int64_t num_rounds, int64_t sync_rounds,
                         int64_t k, int64_t first_step, bool force_aten) {
  TORCH_CHECK(sync_rounds >= 1, "speculative_loop: sync_rounds must be >= 1, got ", sync_rounds);
  TORCH_CHECK(num_rounds >= 0, "speculative_loop: num_rounds must be >= 0, got ", num_rounds);
  TORCH_CHECK(k >= 1, "speculative_loop: k must be >= 1, got ", k);
  Params p = Params::from(params);
  State s = State::from(state);
  SpecState spec = SpecState::from(spec_state);
  check_consistent(p, s);
  const bool host_reads_are_free = all_on_cpu_contiguous({s.finished, s.bad_step});
  const bool fast = !force_aten && speculative_fast_path_applies(p, s, spec);
  const int64_t width = s.out_tokens.size(1);
  for (int64_t i = 0; i < num_rounds; ++i) {
    if (fast) {
      speculative_round_cpu(p, s, spec, draft_step, verify_step, k);
    } else {
      speculative_round(p, s, spec, draft_step, verify_step, k, force_aten);
    }
    const int64_t bound = std::min(width, first_step + (i + 1) * (k + 1));
    bool sync = (i + 1) % sync_rounds == 0 || i + 1 == num_rounds;
    if (!sync && host_reads_are_free) sync = any_row_needs_the_host(s);
    if (sync && on_sync(bound).cast<bool>()) return i + 1;
  }
  return num_rounds;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gptfast C++ sampling loop (see gptfast/reference/sampling.py for the algorithm)";
  m.attr("API_VERSION") = kApiVersion;
  m.def("mix32", &mix32, "32-bit hash mixer on int64 tensors in [0, 2**32)", py::arg("x"));
  m.def(
      "token_table", [](int64_t vocab_size, py::object device) {
        return token_table(vocab_size, device.is_none() ? at::Device(at::kCPU) : device.cast<at::Device>());
      },
      "per-token hash inputs (V,) int64", py::arg("vocab_size"), py::arg("device") = py::none());
  m.def(
      "uniform_noise",
      [](const Tensor& seed, const Tensor& step, const Tensor& table, std::optional<Tensor> token_ids, bool force_aten) {
        Tensor ids = token_ids.has_value() ? *token_ids : Tensor();
        TORCH_CHECK(seed.dim() == 1 && seed.scalar_type() == at::kLong, "uniform_noise: seed must be (B,) int64");
        TORCH_CHECK(step.scalar_type() == at::kLong && (step.numel() == 1 || step.numel() == seed.numel()),
                    "uniform_noise: step must be int64 of shape (1,) or (B,)");
        TORCH_CHECK(!ids.defined() || (ids.dim() == 2 && ids.size(0) == seed.size(0) && ids.scalar_type() == at::kLong),
                    "uniform_noise: token_ids must be (B, K) int64");
        TORCH_CHECK(table.dim() == 1 && table.scalar_type() == at::kLong && table.device() == seed.device(),
                    "uniform_noise: table must be token_table(V) on the seed's device");
        TORCH_CHECK(!ids.defined() || ids.numel() == 0 ||
                        (ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < table.size(0)),
                    "uniform_noise: token_ids must lie in [0, ", table.size(0), ")");
        if (!force_aten && seed.device().is_cpu()) return uniform_noise_cpu(seed, step, table, ids);
        return uniform_noise_aten(seed, step, table, ids);
      },
      "uniforms in (0, 1) from (seed, step, token id)", py::arg("seed"), py::arg("step"), py::arg("table"),
      py::arg("token_ids") = py::none(), py::arg("force_aten") = false);
  m.def("sample_step", &sample_step, "process logits, sample and advance the decode state in place", py::arg("logits"),
        py::arg("params"), py::arg("state"), py::arg("force_aten") = false);
  m.def("decode_loop", &decode_loop, "run decode steps until done, syncing with the host every sync_every tokens",
        py::arg("params"), py::arg("state"), py::arg("model_step"), py::arg("graph_replay"), py::arg("on_sync"),
        py::arg("num_steps"), py::arg("sync_every"), py::arg("first_step"), py::arg("force_aten") = false);
  m.def("speculative_loop", &speculative_loop,
        "speculative decoding rounds (draft k tokens, verify, accept) until done, syncing every sync_rounds rounds",
        py::arg("params"), py::arg("state"), py::arg("spec_state"), py::arg("draft_step"), py::arg("verify_step"),
        py::arg("on_sync"), py::arg("num_rounds"), py::arg("sync_rounds"), py::arg("k"), py::arg("first_step"),
        py::arg("force_aten") = false);
}

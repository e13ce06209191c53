// Scalar math the CPU kernels share (csrc/cpu_attention.cpp's softmax, csrc/cpu_linear.cpp's
// GELU epilogue), written so that a loop of it vectorises.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace gptfast_cpu {

// exp(x) for x <= 0 (Cephes' expf): 2^n e^r with n = round(x / ln 2), |r| <= ln(2) / 2,
// e^r by a degree-6 polynomial; within 1.5 ulp of exp over [-87, 0] (below -87 the result
// is 0 to float precision next to the maximum's exp(0) = 1, and x is clamped there so 2^n
// stays a normal float). n is rounded by adding and subtracting 1.5 x 2^23 (ISO C++: the
// compiler may not fold the two), which also leaves n in the sum's low bits: no float to
// int conversion, and only unsigned integer arithmetic, so a NaN argument just gives NaN.
// Branch-free: a loop of it vectorises.
inline float exp_nonpos(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 x 2^23, bits 0x4B400000
  x = std::max(x, -87.0f);
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B400000u + 127u) << 23;  // 2^n, n in [-126, 0]
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

}  // namespace gptfast_cpu

// Branch-free exp/log that the compiler vectorises (Cephes-style polynomials, ~1 ulp in
// float32), with the special values CTC needs exact: exp(-inf) = 0, log(0) = -inf, NaN in ->
// NaN out. The double overloads defer to libm: float64 is the accuracy path, not the fast one.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace omnifast {

template <typename T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

inline float bits_to_float(int32_t i) { float f; std::memcpy(&f, &i, sizeof f); return f; }
inline int32_t float_to_bits(float f) { int32_t i; std::memcpy(&i, &f, sizeof i); return i; }

inline float fast_exp(float x) {
  const float lo = -87.3365447504f, hi = 88.3762626647f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  // n = round(x / ln2) through the 1.5 * 2^23 trick; r = x - n ln2 in two pieces.
  const float shifter = 12582912.0f;
  float t = xc * 1.44269504088896341f + shifter;
  float n = t - shifter;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t exponent = float_to_bits(t) - float_to_bits(shifter);
  float result = y * bits_to_float((exponent + 127) << 23);
  result = x < lo ? 0.0f : result;
  result = x > hi ? std::numeric_limits<float>::infinity() : result;
  return x != x ? x : result;
}

inline float fast_log(float x) {
  int32_t bits = float_to_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 127);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // mantissa in [1, 2)
  bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
  float f = m - 1.0f, z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z - 2.12194440e-4f * e - 0.5f * z;
  float result = f + y + 0.693359375f * e;
  result = x == 0.0f ? neg_inf<float>() : result;
  result = x == std::numeric_limits<float>::infinity() ? x : result;
  return (x != x || x < 0.0f) ? std::numeric_limits<float>::quiet_NaN() : result;
}

inline double fast_exp(double x) { return std::exp(x); }
inline double fast_log(double x) { return std::log(x); }

// log(exp(a) + exp(b) + exp(c)); -inf when all are -inf; NaN if any is NaN.
template <typename T>
inline T logsumexp3(T a, T b, T c) {
  T m = a > b ? a : b;
  m = m > c ? m : c;
  m = m > neg_inf<T>() ? m : T(0);
  return m + fast_log(fast_exp(a - m) + fast_exp(b - m) + fast_exp(c - m));
}

}  // namespace omnifast

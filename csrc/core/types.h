// normkit core: storage types and accumulation types.
//
// Kernels are templated on the storage type T of x, y, dy, dx: float, double, nk::half or
// nk::bfloat16. The two 16-bit types are plain bit containers; arithmetic always happens in
// compute_t<T> (float, or double for double), and per-group parameters and statistics are stored
// as acc_t<T> (float, or double for double; SPEC section 2).
//
// Conversions are written with integer operations only, so they behave identically on every
// host and device and need no hardware half support:
//   half -> float      exact (every half is a float).
//   float -> half      round to nearest, ties to even; overflow to +-inf; NaN stays NaN (quiet).
//   bfloat16 <-> float bfloat16 is the top half of a float; rounding to nearest even.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/macros.h"

namespace nk {

struct half {
  uint16_t bits;
};
struct bfloat16 {
  uint16_t bits;
};

NK_HOST_DEVICE NK_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}
NK_HOST_DEVICE NK_INLINE float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

NK_HOST_DEVICE NK_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0) {
    // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return bits_float(sign | float_bits(magnitude));
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

NK_HOST_DEVICE NK_INLINE uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) {  // inf or NaN (NaN keeps its top payload bits and is made quiet)
    return static_cast<uint16_t>(sign | 0x7c00u | (a > 0x7f800000u ? (0x200u | ((a >> 13) & 0x3ffu)) : 0u));
  }
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {
    // Result is subnormal (|f| < 2^-14). Adding 0.5 places the half's last bit (2^-24) at the
    // float's last bit, so the FPU's own round-to-nearest-even does the rounding.
    const float shifted = bits_float(a) + 0.5f;
    return static_cast<uint16_t>(sign | (float_bits(shifted) - 0x3f000000u));
  }
  // Normal: re-bias the exponent (127 -> 15), then round the 13 dropped bits to nearest even.
  const uint32_t odd = (a >> 13) & 1u;
  a += 0xc8000fffu + odd;
  return static_cast<uint16_t>(sign | (a >> 13));
}

NK_HOST_DEVICE NK_INLINE float bfloat16_to_float(uint16_t b) {
  return bits_float(static_cast<uint32_t>(b) << 16);
}

NK_HOST_DEVICE NK_INLINE uint16_t float_to_bfloat16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

// compute_t<T>: the type per-element arithmetic is done in.
// acc_t<T>: the dtype of weight, bias, mean, rstd, dweight, dbias and running statistics.
template <class T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <class T> using acc_t = typename AccType<T>::type;
template <class T> using compute_t = acc_t<T>;

// load / store between storage and compute types.
NK_HOST_DEVICE NK_INLINE float load(float v) { return v; }
NK_HOST_DEVICE NK_INLINE double load(double v) { return v; }
NK_HOST_DEVICE NK_INLINE float load(half v) { return half_to_float(v.bits); }
NK_HOST_DEVICE NK_INLINE float load(bfloat16 v) { return bfloat16_to_float(v.bits); }

template <class T> NK_HOST_DEVICE NK_INLINE T store(compute_t<T> v);
template <> NK_HOST_DEVICE NK_INLINE float store<float>(float v) { return v; }
template <> NK_HOST_DEVICE NK_INLINE double store<double>(double v) { return v; }
template <> NK_HOST_DEVICE NK_INLINE half store<half>(float v) { return half{float_to_half(v)}; }
template <> NK_HOST_DEVICE NK_INLINE bfloat16 store<bfloat16>(float v) {
  return bfloat16{float_to_bfloat16(v)};
}

}  // namespace nk

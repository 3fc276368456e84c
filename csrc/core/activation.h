// normkit core: the activations fused after a channel norm (issue 15), y = act(z) with
// z = xhat * w + b, and their derivatives; the only place these formulas are written.
//
//   relu(z) = z < 0 ? 0 : z            (NaN stays NaN)      relu'(z) = z > 0 ? 1 : 0
//   silu(z) = z * s, s = sigmoid(z)                          silu'(z) = s * (1 + z * (1 - s))
//
// The backward recomputes z from x and the saved statistics (x is read anyway), so it needs
// nothing from the forward but what every backward takes, plus the bias.
//
// sigmoid is evaluated without overflow from e = exp(-|z|) in (0, 1]: s = 1 / (1 + e) for
// z >= 0, e / (1 + e) for z < 0. exp(a) for a <= 0 is Cody and Waite's reduction a = n ln2 + r,
// |r| <= ln2 / 2, ln2 split in a high part with trailing zeros (n * ln2_hi is exact) and a low
// part, then the Taylor polynomial of degree 7 (float: truncation below 5e-9 relative) or 13
// (double: below 5e-18), scaled by 2^n built from the exponent bits. Below a = -126 ln2 (float)
// or -1022 ln2 (double) e is taken as 0: 2^n would be subnormal, and there s * z is below the
// type's smallest normal number anyway. References: W. J. Cody and W. Waite, Software Manual
// for the Elementary Functions (1980); S. Elfwing et al., Sigmoid-weighted linear units (2018).
//
// Every step is one IEEE operation in a fixed order (no FMA contraction in the CPU builds), and
// the formulas are templates on the value type V with the few non-arithmetic steps (selection,
// building 2^n) taken from an Ops struct: ScalarOps below for plain scalars (CPU tails, CUDA),
// cpu/simd.h's BlockOps for the CPU's SIMD blocks. Blocks and scalars give the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/macros.h"

namespace nk {

enum Activation : int { kActNone = 0, kActRelu = 1, kActSilu = 2 };

// 1/k! in double (k! is exact in double up to 22!), a compile-time constant in the polynomial.
NK_HOST_DEVICE constexpr double inv_factorial(int k) {
  double f = 1.0;
  for (int i = 2; i <= k; ++i) f *= i;
  return 1.0 / f;
}

// Horner on the Taylor coefficients 1/k!, each rounded to E: p <- p * r + 1/k! for k = K .. 0.
template <class E, int K, class V> NK_HOST_DEVICE NK_INLINE V horner_exp(V p, V r) {
  if constexpr (K < 0) {
    return p;
  } else {
    constexpr E c = static_cast<E>(inv_factorial(K));
    return horner_exp<E, K - 1>(p * r + c, r);
  }
}

// The constants of exp_nonpos per element type.
template <class E> struct ExpConst;
template <> struct ExpConst<float> {
  using Bits = uint32_t;
  static constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr Bits kMagicBits = 0x4B400000u;
  static constexpr Bits kBias = 127u;
  static constexpr int kMantissa = 23;
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f;       // 9 significant bits
  static constexpr float kLn2Lo = -2.12194440e-4f;    // ln 2 - kLn2Hi
  static constexpr float kLowest = -87.3365447505531f;  // -126 ln 2
  static constexpr int kDegree = 7;
};
template <> struct ExpConst<double> {
  using Bits = uint64_t;
  static constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr Bits kMagicBits = 0x4338000000000000ull;
  static constexpr Bits kBias = 1023u;
  static constexpr int kMantissa = 52;
  static constexpr double kLog2e = 1.44269504088896340736;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01;  // 32 significant bits
  static constexpr double kLn2Lo = 1.90821492927058770002e-10;
  static constexpr double kLowest = -708.396418532264106;  // -1022 ln 2
  static constexpr int kDegree = 13;
};

// The non-arithmetic steps on plain scalars.
struct ScalarOps {
  // a where z > 0, else b
  template <class V, class A, class B>
  static NK_HOST_DEVICE NK_INLINE V where_pos(V z, A a, B b) {
    return z > V(0) ? V(a) : V(b);
  }
  // -|z|: z with its sign bit set (a NaN stays a NaN)
  template <class V> static NK_HOST_DEVICE NK_INLINE V neg_abs(V z) {
    using B = typename ExpConst<V>::Bits;
    B b;
    memcpy(&b, &z, sizeof(V));
    b |= B{1} << (8 * sizeof(V) - 1);
    memcpy(&z, &b, sizeof(V));
    return z;
  }
  // 0 where a < lim, else v
  template <class V, class L> static NK_HOST_DEVICE NK_INLINE V zero_below(V a, L lim, V v) {
    return a < V(lim) ? V(0) : v;
  }
  // p * 2^n, where t = n + kMagic holds the integer n in its low mantissa bits
  template <class V> static NK_HOST_DEVICE NK_INLINE V scale_pow2(V p, V t) {
    using K = ExpConst<V>;
    typename K::Bits tb;
    memcpy(&tb, &t, sizeof(V));
    const typename K::Bits sb = (tb - K::kMagicBits + K::kBias) << K::kMantissa;
    V s;
    memcpy(&s, &sb, sizeof(V));
    return p * s;
  }
};

// exp(a) for a <= 0 (NaN gives NaN); E is the element type of V.
template <class Ops, class E, class V> NK_HOST_DEVICE NK_INLINE V exp_nonpos(V a) {
  using K = ExpConst<E>;
  const V t = a * K::kLog2e + K::kMagic;
  const V n = t - K::kMagic;
  const V r = (a - n * K::kLn2Hi) - n * K::kLn2Lo;
  // Horner on the Taylor coefficients 1/k!, each rounded to E: one multiply and one add a term
  constexpr E top = static_cast<E>(inv_factorial(K::kDegree));
  constexpr E next = static_cast<E>(inv_factorial(K::kDegree - 1));
  const V p = horner_exp<E, K::kDegree - 2>(r * top + next, r);
  return Ops::zero_below(a, K::kLowest, Ops::scale_pow2(p, t));
}

// sigmoid(z), from e = exp(-|z|) (-|z| by setting the sign bit: one logical operation rather than
// a comparison and a selection; for z = +0 it gives -0, whose exp is the same 1).
template <class Ops, class E, class V> NK_HOST_DEVICE NK_INLINE V sigmoid_of(V z) {
  const V e = exp_nonpos<Ops, E>(Ops::neg_abs(z));
  return Ops::where_pos(z, E(1), e) / (e + E(1));
}

// y = act(z)
template <int kAct, class Ops, class E, class V> NK_HOST_DEVICE NK_INLINE V activate(V z) {
  if constexpr (kAct == kActRelu) {
    return Ops::where_pos(-z, E(0), z);  // z < 0 ? 0 : z
  } else if constexpr (kAct == kActSilu) {
    return z * sigmoid_of<Ops, E>(z);
  } else {
    return z;
  }
}

// dL/dz = dy * act'(z)
template <int kAct, class Ops, class E, class V> NK_HOST_DEVICE NK_INLINE V activation_grad(V dy, V z) {
  if constexpr (kAct == kActRelu) {
    return Ops::where_pos(z, dy, E(0));
  } else if constexpr (kAct == kActSilu) {
    const V s = sigmoid_of<Ops, E>(z);
    return dy * (s * ((E(1) - s) * z + E(1)));
  } else {
    return dy;
  }
}

}  // namespace nk

// normkit CPU: fixed-order multi-accumulator sums.
//
// A plain `s += f(i)` loop is one long dependency chain the compiler may not reorder (that would
// change the rounding), so it neither vectorizes nor pipelines. Here the order is fixed in the
// source instead: kLanes = 32 accumulators, element i of each full block of 32 goes to lane
// i % 32 (four blocks of 8 held in SIMD registers: four independent addition chains, enough to
// hide the latency of a double addition); of the remaining elements, each full block of 8 goes
// to lanes 0..7 and the last few to lanes 0, 1, ... in order; the lanes are added in a fixed
// tree at the end. (The blocks of 8 keep short pieces, such as BatchNorm planes of 49, mostly
// vectorized.) The result is the same bits for
// every instruction set, thread count and machine.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "core/macros.h"
#include "core/welford.h"
#include "cpu/simd.h"

namespace nk::cpu {

constexpr int kLanes = 32;

#if defined(NK_HAVE_VECTOR_EXT)
// Where a block of 8 doubles spans several registers (AVX2: two, SSE2: four), the 32 lanes' sums
// would not fit the 16 vector registers with their operands, and the compiler would keep some in
// memory: a store and a reload in every accumulator's addition chain. So the full blocks of 32 are
// walked in kLaneSweeps sweeps, each adding one part of every block into its own lanes (lane sums
// are independent, and each lane still receives its terms in index order: the same bits). The
// second sweep reads the piece again, from cache. lane_sum2 (two sums): AVX2 two sweeps, SSE2 four;
// lane_sum (one sum): two on SSE2. GroupNorm (32, 256, 28, 28) float32 forward (shifted sums),
// 1 thread, Xeon, 2026-12-07, medians of 3 interleaved runs: forced AVX2 7.9 -> 4.9 ms, baseline
// 7.8 -> 6.4 ms (two sweeps on SSE2: 8.2 ms); BatchNorm (32, 64, 56, 56) backward: AVX2
// 9.0 -> 8.7 ms, baseline 11.8 -> 12.2 ms (two sweeps: 11.3 ms); AVX-512 unchanged.
#if defined(__AVX512F__)
constexpr int kLaneSweeps = 1, kLaneSweeps1 = 1;
#elif defined(__AVX__)
constexpr int kLaneSweeps = 2, kLaneSweeps1 = 1;
#else
constexpr int kLaneSweeps = 4, kLaneSweeps1 = 2;
#endif
#endif

NK_INLINE double lanes_total(const double* acc) {
  double t[kLanes / 2];
  for (int k = 0; k < kLanes / 2; ++k) t[k] = acc[k] + acc[k + kLanes / 2];
  for (int half = kLanes / 4; half >= 1; half /= 2)
    for (int k = 0; k < half; ++k) t[k] += t[k + half];
  return t[0];
}

#if defined(NK_HAVE_VECTOR_EXT)
// lanes_total of the 32 lanes held as four blocks (lanes 0-7, 8-15, 16-23, 24-31) plus `tail`
// added to lanes 0-7, computed with vector operations in the same order as lanes_total:
// t = (a0 + a2) + (a1 + a3), u[k] = t[k] + t[k + 4], v[k] = u[k] + u[k + 2], v[0] + v[1].
NK_INLINE double lanes_total(d8 a0, d8 a1, d8 a2, d8 a3) {
  const d8 t = (a0 + a2) + (a1 + a3);
#if defined(__AVX512F__)
  const d4 u = __builtin_shufflevector(t, t, 0, 1, 2, 3) + __builtin_shufflevector(t, t, 4, 5, 6, 7);
  const d2 v = __builtin_shufflevector(u, u, 0, 1) + __builtin_shufflevector(u, u, 2, 3);
#elif defined(__AVX__)
  const d4 u = t.v0 + t.v1;
  const d2 v = __builtin_shufflevector(u, u, 0, 1) + __builtin_shufflevector(u, u, 2, 3);
#else
  const d2 v = (t.v0 + t.v2) + (t.v1 + t.v3);
#endif
  return v[0] + v[1];
}

// The last n - i (< 8) terms f(i), f(i + 1), ... as a block for lanes 0, 1, ...: -0.0 elsewhere,
// and -0.0 + t = t and a + -0.0 = a exactly, so adding the block equals adding the terms one by
// one. Lanes are set by constant index (register inserts, no stack buffer).
template <class F> NK_INLINE d8 tail_block(int64_t i, int64_t n, F&& f) {
  d8 t = neg_zero<d8>();
  const int64_t m = n - i;
  if (m > 0) set_lane<0>(t, f(i));
  if (m > 1) set_lane<1>(t, f(i + 1));
  if (m > 2) set_lane<2>(t, f(i + 2));
  if (m > 3) set_lane<3>(t, f(i + 3));
  if (m > 4) set_lane<4>(t, f(i + 4));
  if (m > 5) set_lane<5>(t, f(i + 5));
  if (m > 6) set_lane<6>(t, f(i + 6));
  return t;
}
#endif

// Sum over i in [0, n) of f(i, width), in double. f returns a double for Width<1> and 8 doubles
// (elements i .. i+7) for Width<8>.
template <class F> NK_INLINE double lane_sum(int64_t n, F&& f) {
  int64_t i = 0;
#if defined(NK_HAVE_VECTOR_EXT)
  d8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  const int64_t full = n / kLanes * kLanes;
  if constexpr (kLaneSweeps1 == 1) {
    for (; i < full; i += kLanes) {
      a0 += f(i, Width<8>{});
      a1 += f(i + 8, Width<8>{});
      a2 += f(i + 16, Width<8>{});
      a3 += f(i + 24, Width<8>{});
    }
  } else {  // one sweep per two blocks of lanes (see kLaneSweeps)
    for (; i < full; i += kLanes) {
      a0 += f(i, Width<8>{});
      a1 += f(i + 8, Width<8>{});
    }
    for (int64_t k = 0; k < full; k += kLanes) {
      a2 += f(k + 16, Width<8>{});
      a3 += f(k + 24, Width<8>{});
    }
  }
  for (; i + 8 <= n; i += 8) a0 += f(i, Width<8>{});
  if (i < n) a0 += tail_block(i, n, [&](int64_t k) { return f(k, Width<1>{}); });
  return lanes_total(a0, a1, a2, a3);
#else
  double acc[kLanes] = {};
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += f(i + k, Width<1>{});
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += f(i + k, Width<1>{});
  for (int k = 0; i < n; ++i, ++k) acc[k] += f(i, Width<1>{});
  return lanes_total(acc);
#endif
}

// Two sums in one pass: f(i, width) returns two(a, b) (doubles or 8-double blocks).
template <class F> NK_INLINE void lane_sum2(int64_t n, double& out_a, double& out_b, F&& f) {
  int64_t i = 0;
#if defined(NK_HAVE_VECTOR_EXT)
  d8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
  const int64_t full = n / kLanes * kLanes;
  const auto add = [&](d8& a, d8& b, int64_t k) {
    const auto v = f(k, Width<8>{});
    a += v.first;
    b += v.second;
  };
  if constexpr (kLaneSweeps == 1) {
    for (; i < full; i += kLanes) {
      add(a0, b0, i);
      add(a1, b1, i + 8);
      add(a2, b2, i + 16);
      add(a3, b3, i + 24);
    }
  } else if constexpr (kLaneSweeps == 2) {
    for (; i < full; i += kLanes) {
      add(a0, b0, i);
      add(a1, b1, i + 8);
    }
    for (int64_t k = 0; k < full; k += kLanes) {
      add(a2, b2, k + 16);
      add(a3, b3, k + 24);
    }
  } else {
    for (; i < full; i += kLanes) add(a0, b0, i);
    for (int64_t k = 0; k < full; k += kLanes) add(a1, b1, k + 8);
    for (int64_t k = 0; k < full; k += kLanes) add(a2, b2, k + 16);
    for (int64_t k = 0; k < full; k += kLanes) add(a3, b3, k + 24);
  }
  for (; i + 8 <= n; i += 8) {
    const auto v0 = f(i, Width<8>{});
    a0 += v0.first;
    b0 += v0.second;
  }
  if (i < n) {
    // the pairs' two halves as two tail blocks; f is evaluated once per element
    decltype(f(i, Width<1>{})) v[7];
    for (int k = 0; i + k < n; ++k) v[k] = f(i + k, Width<1>{});
    a0 += tail_block(0, n - i, [&](int64_t k) { return v[k].first; });
    b0 += tail_block(0, n - i, [&](int64_t k) { return v[k].second; });
    i = n;
  }
  out_a = lanes_total(a0, a1, a2, a3);
  out_b = lanes_total(b0, b1, b2, b3);
#else
  double a[kLanes] = {}, b[kLanes] = {};
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const auto v = f(i + k, Width<1>{});
      a[k] += v.first;
      b[k] += v.second;
    }
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const auto v = f(i + k, Width<1>{});
      a[k] += v.first;
      b[k] += v.second;
    }
  for (int k = 0; i < n; ++i, ++k) {
    const auto v = f(i, Width<1>{});
    a[k] += v.first;
    b[k] += v.second;
  }
  out_a = lanes_total(a);
  out_b = lanes_total(b);
#endif
}

// ---- shifted one-pass moments -------------------------------------------------------------------
// Statistics of float, half and bfloat16 data take one pass of shifted sums instead of two passes
// (mean, then squared deviations): with a shift s taken from the data (its first element),
// d = x - s and d^2 are exact in double (a float has 24 significant bits), their sums are formed
// in double with the fixed lanes above, and then
//   mean = s + sum(d) / n,   M2 = sum(d^2) - sum(d)^2 / n   (clamped at 0).
// The cancellation in M2 grows with sum(d^2) / M2, which is at most about n when the shift is
// the group's most extreme value (the shift's own term makes M2 >= (s - mean)^2 * (n - 1) / n),
// and the rounding of the sums with the number of terms per lane: so every shifted piece holds
// at most kShiftPiece elements (worst case then ~1e-10 relative, typical ~1e-15), and longer
// groups merge their pieces with Chan's formula. A constant group gives d = 0: mean = s and M2 = 0
// exactly, so `y = bias` holds bit for bit; a NaN or infinity in the group gives a NaN M2, as the
// two passes do. Double data keeps the two passes: there d itself is
// rounded and the bound would not hold to double precision.
template <class T> constexpr bool kShiftedStats = !std::is_same_v<T, double>;

// Sums of d = x[i] - shift and d^2 over [0, n), added to s1 and s2.
template <class T>
NK_INLINE void add_shifted_sums(const T* x, int64_t n, double shift, double& s1, double& s2) {
  double a = 0.0, b = 0.0;
  lane_sum2(n, a, b, [&](int64_t i, auto w) {
    const auto d = load_wide(x + i, w) - shift;
    return two(d, d * d);
  });
  s1 += a;
  s2 += b;
}

// (mean, M2) of n elements from their shifted sums, given inv_n = 1 / n.
NK_INLINE std::pair<double, double> shifted_mean_m2_inv(double inv_n, double shift, double s1,
                                                        double s2) {
  const double dm = s1 * inv_n;
  const double m2 = s2 - s1 * dm;
  return {shift + dm, m2 < 0.0 ? 0.0 : m2};  // NaN stays NaN
}

NK_INLINE std::pair<double, double> shifted_mean_m2(int64_t n, double shift, double s1, double s2) {
  return shifted_mean_m2_inv(1.0 / static_cast<double>(n), shift, s1, s2);
}

constexpr int64_t kShiftPiece = 4096;

// Moments of n >= 1 values in pieces of at most kShiftPiece elements, each shifted by its first
// value, merged in order with Chan's formula: shift_of(i) is the value of element i, and
// sums(i, len, shift, s1, s2) adds the shifted sums of elements [i, i + len) to s1, s2 (zero).
template <class S, class Sums>
NK_INLINE Moments<double> piecewise_shifted_moments(int64_t n, S&& shift_of, Sums&& sums) {
  Moments<double> m;
  for (int64_t i = 0; i < n; i += kShiftPiece) {
    const int64_t len = n - i < kShiftPiece ? n - i : kShiftPiece;
    double s1 = 0.0, s2 = 0.0;
    const double shift = shift_of(i);
    sums(i, len, shift, s1, s2);
    const auto mm = shifted_mean_m2(len, shift, s1, s2);
    welford_merge(m, moments_from_two_pass(len, mm.first, mm.second));
  }
  return m;
}

// Moments of x[0, n) (n >= 1).
template <class T> NK_INLINE Moments<double> shifted_moments(const T* x, int64_t n) {
  return piecewise_shifted_moments(
      n, [x](int64_t i) { return load_wide(x + i, Width<1>{}); },
      [x](int64_t i, int64_t len, double shift, double& s1, double& s2) {
        add_shifted_sums(x + i, len, shift, s1, s2);
      });
}

}  // namespace nk::cpu

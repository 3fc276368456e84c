// normkit CPU: fixed-order multi-accumulator sums.
//
// A plain `s += f(i)` loop is one long dependency chain the compiler may not reorder (that would
// change the rounding), so it neither vectorizes nor pipelines. Here the order is fixed in the
// source instead: element i goes to accumulator i % kLanes, and the lanes are added in a fixed
// tree at the end. The compiler can map the lanes onto SIMD registers of any width, and the
// result is the same bits on every machine and for every thread count.
#pragma once

#include <cstdint>

#include "core/macros.h"

namespace nk::cpu {

constexpr int kLanes = 16;

NK_INLINE double lanes_total(const double* acc) {
  double t[kLanes / 2];
  for (int k = 0; k < kLanes / 2; ++k) t[k] = acc[k] + acc[k + kLanes / 2];
  for (int k = 0; k < kLanes / 4; ++k) t[k] += t[k + kLanes / 4];
  for (int k = 0; k < kLanes / 8; ++k) t[k] += t[k + kLanes / 8];
  return t[0] + t[1];
}

// sum over i in [0, n) of f(i), in double.
template <class F> NK_INLINE double lane_sum(int64_t n, F&& f) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += f(i + k);
  for (int k = 0; i < n; ++i, ++k) acc[k] += f(i);
  return lanes_total(acc);
}

// Two sums in one pass: f(i, a, b) adds its two terms to a and b.
template <class F> NK_INLINE void lane_sum2(int64_t n, double& out_a, double& out_b, F&& f) {
  double a[kLanes] = {}, b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) f(i + k, a[k], b[k]);
  for (int k = 0; i < n; ++i, ++k) f(i, a[k], b[k]);
  out_a = lanes_total(a);
  out_b = lanes_total(b);
}

}  // namespace nk::cpu

// normkit core: mergeable first and second moments (count, mean, M2).
//
// A group's statistics are built from pieces: a piece's mean and M2 = sum((x - mean)^2) come
// from two passes over data that is still in cache (or from Welford pushes, one element at a
// time, where two passes are not possible), and pieces are combined with Chan et al.'s parallel
// formula:
//   n = na + nb,  d = mean_b - mean_a,
//   mean = mean_a + d * nb / n,   M2 = M2a + M2b + d^2 * na * nb / n.
// Neither form subtracts two large sums (E[x^2] - E[x]^2), so a large mean with a small spread
// keeps its precision. (The CPU kernels form float/half/bfloat16 pieces from sums shifted by one
// of the piece's own values, which bounds that subtraction's error; see cpu/lanes.h.) Pieces are always merged in a fixed order so that the result does not
// depend on how the work was split among threads (SPEC section 5).
//
// References: B. P. Welford, Technometrics 4(3), 1962; T. F. Chan, G. H. Golub, R. J. LeVeque,
// "Updating formulae and a pairwise algorithm for computing sample variances", 1979.
#pragma once

#include <cstdint>

#include "core/macros.h"

namespace nk {

template <class A> struct Moments {
  int64_t count = 0;
  A mean = A(0);
  A m2 = A(0);  // sum of squared deviations from mean
};

// Welford's update with one value.
template <class A> NK_HOST_DEVICE NK_INLINE void welford_push(Moments<A>& m, A v) {
  m.count += 1;
  const A delta = v - m.mean;
  m.mean += delta / static_cast<A>(m.count);
  m.m2 += delta * (v - m.mean);
}

// Chan's merge of (mean_b, m2_b) into (mean_a, m2_a), given wb = nb / (na + nb) and na * wb.
// Templated on the value type so the CPU can merge whole blocks of columns at once.
template <class V, class A>
NK_HOST_DEVICE NK_INLINE void chan_merge(V& mean_a, V& m2_a, V mean_b, V m2_b, A wb, A na_wb) {
  const V delta = mean_b - mean_a;
  mean_a += delta * wb;
  m2_a += m2_b + delta * delta * na_wb;
}

// Chan's merge: a <- a U b.
template <class A> NK_HOST_DEVICE NK_INLINE void welford_merge(Moments<A>& a, const Moments<A>& b) {
  if (b.count == 0) return;
  if (a.count == 0) {
    a = b;
    return;
  }
  const int64_t n = a.count + b.count;
  const A na = static_cast<A>(a.count), nb = static_cast<A>(b.count), nt = static_cast<A>(n);
  const A wb = nb / nt;
  chan_merge(a.mean, a.m2, b.mean, b.m2, wb, na * wb);
  a.count = n;
}

// Weighted moments (weights >= 0): total weight w, weighted mean, and m2 = sum w_i (x_i - mean)^2.
template <class A> struct WeightedMoments {
  A w = A(0);
  A mean = A(0);
  A m2 = A(0);
};

// Chan's merge with real weights in place of counts: a <- a U b.
template <class A>
NK_HOST_DEVICE NK_INLINE void weighted_merge(WeightedMoments<A>& a, const WeightedMoments<A>& b) {
  if (!(b.w > A(0))) return;
  if (!(a.w > A(0))) {
    a = b;
    return;
  }
  const A w = a.w + b.w;
  const A wb = b.w / w;
  chan_merge(a.mean, a.m2, b.mean, b.m2, wb, a.w * wb);
  a.w = w;
}

// A piece from its sums shifted by k: w = sum of weights, s1 = sum w (x - k), s2 = sum w (x - k)^2.
template <class A> NK_HOST_DEVICE NK_INLINE WeightedMoments<A> weighted_from_shifted(A w, A k, A s1, A s2) {
  WeightedMoments<A> m;
  if (!(w > A(0))) return m;
  m.w = w;
  m.mean = k + s1 / w;
  const A m2 = s2 - s1 * (s1 / w);
  m.m2 = m2 > A(0) ? m2 : A(0);  // rounding can leave a tiny negative value
  return m;
}

// A piece from its two-pass sums: count, sum of values, sum of squared deviations from sum/count.
template <class A> NK_HOST_DEVICE NK_INLINE Moments<A> moments_from_two_pass(int64_t count, A mean, A m2) {
  Moments<A> m;
  m.count = count;
  m.mean = mean;
  m.m2 = m2;
  return m;
}

// Population (biased) variance; 0 for an empty group.
template <class A> NK_HOST_DEVICE NK_INLINE A population_var(const Moments<A>& m) {
  return m.count > 0 ? m.m2 / static_cast<A>(m.count) : A(0);
}

// Unbiased variance m2 / (n - 1), used for running statistics.
template <class A> NK_HOST_DEVICE NK_INLINE A unbiased_var(const Moments<A>& m) {
  return m.count > 1 ? m.m2 / static_cast<A>(m.count - 1) : A(0);
}

}  // namespace nk

// normkit core: the per-element normalization formulas, the only place they are written.
//
// Forward, for a group of n elements with mean and rstd = 1 / sqrt(var + eps):
//   xhat = (x - mean) * rstd,          y = xhat * w + b.
// Backward (g = dy * w; sums over the group):
//   c1 = sum(g * xhat) / n,  c2 = sum(g) / n,   dx = rstd * (g - c2 - xhat * c1).
//   RMSNorm: mean = 0 and c2 is dropped. Statistics held constant: dx = g * rstd.
//   dweight = sum(dy * xhat), dbias = sum(dy) over all but the affine axes.
//
// Precision of (x - mean) in float: the mean is known in double, but a float kernel works in
// float. Rounding the mean to float would shift every xhat by up to half an ulp of the mean,
// which is large when the mean is large compared with the spread (mean 1e4, std 1: 5e-4). So the
// mean is carried as two floats, hi + lo, and x - hi is exact (Sterbenz) for x near the mean;
// subtracting lo then recovers the double-precision centre at the cost of one extra subtraction.
#pragma once

#include <cmath>

#include "core/macros.h"
#include "core/types.h"

namespace nk {

NK_HOST_DEVICE NK_INLINE double rstd_from_var(double var, double eps) {
  return 1.0 / sqrt(var + eps);
}

// Statistics of one group in the compute type C (float or double).
template <class C> struct GroupStats {
  C mean_hi;
  C mean_lo;
  C rstd;
};

template <class C> NK_HOST_DEVICE NK_INLINE GroupStats<C> make_group_stats(double mean, double rstd) {
  GroupStats<C> s;
  s.mean_hi = static_cast<C>(mean);
  s.mean_lo = static_cast<C>(mean - static_cast<double>(s.mean_hi));
  s.rstd = static_cast<C>(rstd);
  return s;
}

// The formulas below are templates on the value type V as well as on the statistics' type, so
// the CPU kernels can apply them to SIMD blocks of V (scalars broadcast) and CUDA to scalars.
template <class V, class C> NK_HOST_DEVICE NK_INLINE V xhat_of(V x, const GroupStats<C>& s) {
  return ((x - s.mean_hi) - s.mean_lo) * s.rstd;
}

// xhat from the group's statistics given per element (column-wise statistics).
template <class V, class H, class L, class R>
NK_HOST_DEVICE NK_INLINE V xhat_of(V x, H mean_hi, L mean_lo, R rstd) {
  return ((x - mean_hi) - mean_lo) * rstd;
}

template <class V, class W, class B> NK_HOST_DEVICE NK_INLINE V affine(V xhat, W w, B b) {
  return xhat * w + b;
}

// dx from g = dy * w, the group's rstd, c1 = sum(g * xhat) / n and c2 = sum(g) / n.
template <class V, class R, class C1, class C2>
NK_HOST_DEVICE NK_INLINE V input_grad(V g, V xhat, R rstd, C1 c1, C2 c2) {
  return rstd * ((g - c2) - xhat * c1);
}

// dx with the statistics held constant (training=False): rstd * g, the same value as
// input_grad with c1 = c2 = 0 but without reading x, so a NaN or inf in x does not reach dx
// (x-hat times a zero c1 would be NaN there), as PyTorch's evaluation-mode backward.
template <class V, class R> NK_HOST_DEVICE NK_INLINE V input_grad_const(V g, R rstd) {
  return rstd * g;
}

// Running statistics: running = (1 - momentum) * running + momentum * batch_stat.
template <class A> NK_HOST_DEVICE NK_INLINE A running_update(A running, double batch_stat, double momentum) {
  return static_cast<A>((1.0 - momentum) * static_cast<double>(running) + momentum * batch_stat);
}

}  // namespace nk

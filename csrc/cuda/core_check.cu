// normkit CUDA: compile-time proof that the shared math of csrc/core is device code.
//
// This translation unit includes every csrc/core header and instantiates each host+device
// function in a __global__ kernel for all four storage types. It is compiled whenever CUDA is
// enabled (NORMKIT_CUDA=AUTO with nvcc found, or ON) and is not linked into the Python module:
// the CUDA kernels proper live beside it and share exactly these functions.
#include <cstdint>

#include "core/dispatch.h"
#include "core/macros.h"
#include "core/norm_math.h"
#include "core/params.h"
#include "core/types.h"
#include "core/welford.h"

namespace nk {

// Assumptions: one thread per element; n fits the grid (this kernel is never launched).
template <class T>
__global__ void core_math_check(const T* x, const T* dy, T* y, T* dx, acc_t<T>* out, int64_t n) {
  using C = compute_t<T>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  Moments<double> m;
  welford_push(m, static_cast<double>(load(x[i])));
  Moments<double> other = moments_from_two_pass<double>(1, static_cast<double>(load(x[i])), 0.0);
  welford_merge(m, other);
  const double rstd = rstd_from_var(population_var(m), 1e-5);
  const GroupStats<C> st = make_group_stats<C>(m.mean, rstd);
  const C xh = xhat_of(static_cast<C>(load(x[i])), st);
  y[i] = store<T>(affine(xh, C(2), C(1)));
  dx[i] = store<T>(input_grad(static_cast<C>(load(dy[i])), xh, st.rstd, C(0.5), C(0.25)));
  out[i] = running_update(out[i], unbiased_var(m), 0.1);
}

template __global__ void core_math_check<float>(const float*, const float*, float*, float*, float*, int64_t);
template __global__ void core_math_check<double>(const double*, const double*, double*, double*, double*, int64_t);
template __global__ void core_math_check<half>(const half*, const half*, half*, half*, float*, int64_t);
template __global__ void core_math_check<bfloat16>(const bfloat16*, const bfloat16*, bfloat16*, bfloat16*, float*, int64_t);

}  // namespace nk

// normkit CUDA: small device helpers shared by the kernels of csrc/cuda.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"

// Launch bounds of every kernel: `threads` per block, and registers for at least 1024 resident
// threads per SM (at most 64 per thread; the kernels are memory-bound and want occupancy). With
// the thread count alone, ptxas targeted full occupancy (32 registers for 256 threads) and
// spilled in the 16-bit row kernels on sm_90.
#define NK_BOUNDS(threads) __launch_bounds__(threads, 1024 / (threads))

namespace nk::cuda {

// Per-feature parameter p[j], or the constant `dflt` when the parameter is absent (kHas false).
template <bool kHas, class A> __device__ __forceinline__ A param(const A* p, int64_t j, A dflt) {
  if constexpr (kHas) {
    return p[j];
  } else {
    return dflt;
  }
}

// f(i) for i < n, one thread per index, grid-stride (blockDim.x == kBlock).
template <class F> __device__ __forceinline__ void for_each_index(int64_t n, F&& f) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kBlock)
    f(i);
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace nk::cuda

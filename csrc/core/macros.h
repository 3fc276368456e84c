// normkit core: portability macros shared by the CPU and CUDA builds.
//
// NK_HOST_DEVICE marks a function callable from host and device code. Under nvcc it expands to
// `__host__ __device__`; for a plain C++ compiler it is empty, so every header in csrc/core is
// ordinary C++17 there. Nothing in csrc/core may include CUDA, pybind11 or NumPy headers.
#pragma once

#if defined(__CUDACC__)
#define NK_HOST_DEVICE __host__ __device__
#define NK_INLINE __forceinline__
#elif defined(_MSC_VER)
#define NK_HOST_DEVICE
#define NK_INLINE __forceinline
#else
#define NK_HOST_DEVICE
#define NK_INLINE inline __attribute__((always_inline))
#endif

#if !defined(__CUDA_ARCH__)
#include <stdexcept>
#include <string>
// NK_CHECK: host-only argument check; becomes a Python ValueError through pybind11.
#define NK_CHECK(cond, msg)                                   \
  do {                                                        \
    if (!(cond)) throw std::invalid_argument(std::string(msg)); \
  } while (0)
#endif

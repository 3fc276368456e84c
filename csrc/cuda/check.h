// normkit CUDA: error checks. Every CUDA call and every launch goes through NK_CUDA_CHECK, which
// throws std::runtime_error("file:line: <call>: <CUDA error string>"); pybind11 turns that into a
// Python RuntimeError. Nothing here exits or aborts.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace nk::cuda {

inline void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + what + ": " +
                           cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

}  // namespace nk::cuda

#define NK_CUDA_CHECK(call)                                                   \
  do {                                                                        \
    const cudaError_t nk_err_ = (call);                                       \
    if (nk_err_ != cudaSuccess) ::nk::cuda::throw_cuda(nk_err_, #call, __FILE__, __LINE__); \
  } while (0)

// After a <<<...>>> launch: configuration errors surface through cudaGetLastError.
#define NK_CUDA_LAUNCHED() NK_CUDA_CHECK(cudaGetLastError())

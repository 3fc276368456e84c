// normkit CUDA: runtime queries. The module links the CUDA runtime statically, so it imports on a
// machine without a driver; these queries then report "no device" instead of failing.
#include "cuda/check.h"
#include "cuda/kernels.h"

namespace nk::cuda {

namespace {

cudaError_t count_devices(int& n) {
  n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    n = 0;
    (void)cudaGetLastError();  // clear the sticky "no driver" / "no device" error
  }
  return err;
}

}  // namespace

int device_count() {
  int n;
  count_devices(n);
  return n;
}

std::string device_error() {
  int n;
  const cudaError_t err = count_devices(n);
  if (err != cudaSuccess) return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  return n > 0 ? std::string() : std::string("no CUDA device");
}

int runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

void synchronize(uintptr_t stream) {
  NK_CUDA_CHECK(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace nk::cuda

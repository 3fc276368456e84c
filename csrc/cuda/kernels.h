// normkit CUDA: host entry points of the kernels (no CUDA headers: the bindings include this).
//
// Every pointer in the params structs is a device pointer; `workspace` is device scratch of the
// size the *_workspace functions of cuda/launch.h give, allocated by the caller; `stream` is a
// cudaStream_t passed as an integer (0: the legacy default stream). Launches are asynchronous
// on that stream; a failed launch throws std::runtime_error with file:line and CUDA's message.
#pragma once

#include <cstdint>
#include <string>

#include "core/params.h"

namespace nk::cuda {

// Number of usable devices: 0 (never an exception) without a driver or a GPU.
int device_count();
// Why device_count() is 0 ("" when it is not), from the CUDA runtime.
std::string device_error();
// The CUDA runtime version this module was linked with (static cudart), e.g. 13000.
int runtime_version();
// Blocks until the stream's work is done; throws on a CUDA error.
void synchronize(uintptr_t stream);

template <class T> void row_norm_forward(const RowForwardParams<T>& p, uintptr_t stream);
template <class T>
void row_norm_backward(const RowBackwardParams<T>& p, void* workspace, uintptr_t stream);
template <class T>
void channel_norm_forward(const ChannelForwardParams<T>& p, void* workspace, uintptr_t stream);
template <class T>
void channel_norm_backward(const ChannelBackwardParams<T>& p, void* workspace, uintptr_t stream);

}  // namespace nk::cuda

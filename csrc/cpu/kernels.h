// normkit CPU: entry points of the two kernel families (definitions in row_norm.cpp and
// channel_norm.cpp, instantiated for float, double, nk::half and nk::bfloat16).
#pragma once

#include "core/dispatch.h"
#include "core/params.h"

namespace nk::cpu {

template <class T> void row_norm_forward(const RowForwardParams<T>& p);
template <class T> void row_norm_backward(const RowBackwardParams<T>& p);
template <class T> void channel_norm_forward(const ChannelForwardParams<T>& p);
template <class T> void channel_norm_backward(const ChannelBackwardParams<T>& p);

}  // namespace nk::cpu

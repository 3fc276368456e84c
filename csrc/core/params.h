// normkit core: the plain parameter structs handed from the bindings to the kernels.
//
// Pointers are typed, sizes are int64_t (tensors past 2^31 elements must work), and all arrays
// are dense in the layout named by the struct; the bindings guarantee it before a kernel runs.
//
// Row view (LayerNorm, RMSNorm): x is (M, N), row-major; one statistic per row; weight/bias (N,).
// Channel view (BatchNorm, GroupNorm, InstanceNorm): x is (B, C, S) for channels-first or
//   (B, S, C) for channels-last; weight/bias (C,). Channels form G groups of D = C / G.
//   per_sample=false (BatchNorm, G = C): one statistic per channel over B * S elements; (C,).
//   per_sample=true (GroupNorm; InstanceNorm is G = C): one per (sample, group) over D * S
//   elements; mean, rstd (B, G).
#pragma once

#include <cstdint>

#include "core/types.h"

namespace nk {

template <class T> struct RowForwardParams {
  const T* x = nullptr;
  T* y = nullptr;
  const acc_t<T>* weight = nullptr;  // (N,) or null (= 1)
  const acc_t<T>* bias = nullptr;    // (N,) or null (= 0)
  acc_t<T>* mean = nullptr;          // (M,); null for RMSNorm
  acc_t<T>* rstd = nullptr;          // (M,)
  int64_t M = 0, N = 0;
  // Rows [row_begin, M) are processed; always 0 except in the test hook that proves row
  // offsets past 2^31 elements work without allocating them (_core._row_norm_rows_from).
  int64_t row_begin = 0;
  double eps = 0.0;
  // Fused residual add (add_layer_norm / add_rms_norm): when `residual` is set, each row is
  // first summed, h = x + residual rounded to T, written to `h` (which may be x or residual
  // itself), and h is normalized (read back while it is still in cache).
  const T* residual = nullptr;
  T* h = nullptr;
};

template <class T> struct RowBackwardParams {
  const T* dy = nullptr;
  const T* x = nullptr;
  const acc_t<T>* mean = nullptr;    // (M,); null for RMSNorm (no centring)
  const acc_t<T>* rstd = nullptr;    // (M,)
  const acc_t<T>* weight = nullptr;  // (N,) or null
  T* dx = nullptr;
  acc_t<T>* dweight = nullptr;       // (N,)
  acc_t<T>* dbias = nullptr;         // (N,) or null (RMSNorm)
  int64_t M = 0, N = 0;
  int64_t row_begin = 0;             // as in RowForwardParams
};

template <class T> struct ChannelForwardParams {
  const T* x = nullptr;
  T* y = nullptr;
  const acc_t<T>* weight = nullptr;  // (C,) or null
  const acc_t<T>* bias = nullptr;    // (C,) or null
  acc_t<T>* mean = nullptr;          // (C,) or (B, G) out: statistics used
  acc_t<T>* rstd = nullptr;          // (C,) or (B, G) out
  // (C,) in/out, element strides running_mean_stride / running_var_stride, or null. per_sample (InstanceNorm, G = C):
  // updated with the batch averages of the per-sample means and unbiased variances.
  acc_t<T>* running_mean = nullptr;
  acc_t<T>* running_var = nullptr;
  int64_t running_mean_stride = 1, running_var_stride = 1;
  int64_t B = 0, C = 0, S = 0, G = 0;
  double eps = 0.0, momentum = 0.0;
  bool training = true;  // false: statistics from the running ones (per_sample must be false)
  bool channels_last = false;
  bool per_sample = false;
  // CPU only, training only: when set, (samples * G,) out: each group's mean and M2 (sum of
  // squared deviations) in double, before any rounding to acc_t. y == nullptr: statistics only
  // (nothing normalized or written but mean, rstd, these and the running statistics).
  double* group_mean64 = nullptr;
  double* group_m2_64 = nullptr;
  // Fused activation (core/activation.h): y = act(xhat * w + b). Anything but kActNone needs
  // weight and bias set (the bindings pass ones / zeros for absent ones).
  int activation = 0;
  // CPU only, training only: weighted statistics (mask= / sample_weight=). omega holds one
  // weight >= 0 per position, shared by the channels, laid out [sample][O][I] of the channel
  // view (core/channel_view.h): (B, S) for every op and layout. Each group's statistics are
  // its weighted mean and variance; y is computed at every position. Needs weight and bias
  // (ones / zeros for absent ones), group_mean64, group_m2_64 and group_w64 (out: the total
  // weight per group); running statistics unset (the caller updates them from these). An
  // activation applies to y as without weights.
  const acc_t<T>* omega = nullptr;
  double* group_w64 = nullptr;
};

template <class T> struct ChannelBackwardParams {
  const T* dy = nullptr;
  const T* x = nullptr;
  const acc_t<T>* mean = nullptr;    // (C,) or (B, G)
  const acc_t<T>* rstd = nullptr;    // (C,) or (B, G)
  const acc_t<T>* weight = nullptr;  // (C,) or null
  T* dx = nullptr;
  acc_t<T>* dweight = nullptr;       // (C,)
  acc_t<T>* dbias = nullptr;         // (C,)
  int64_t B = 0, C = 0, S = 0, G = 0;
  bool training = true;  // false: statistics are constants
  bool channels_last = false;
  bool per_sample = false;
  // The forward's activation; with one, dy is the gradient of act(z), z = xhat * w + b is
  // recomputed from x, and weight and bias must both be set (as in the forward).
  int activation = 0;
  const acc_t<T>* bias = nullptr;    // (C,); read only with an activation
  // Weighted statistics (as in the forward): omega per position, and each group's total weight
  // (group_w, samples * G); the statistics' gradient then reaches x in proportion to its weight.
  // Needs weight (ones for an absent one), and bias with an activation (as above).
  const acc_t<T>* omega = nullptr;
  const double* group_w = nullptr;
};

}  // namespace nk

// normkit core: the option rules of the native entry points, written once.
//
// Each rule returns nullptr when its arguments are valid, or the reason (without the function
// name) when they are not. The bindings use them in two ways (one validator, two failure modes):
// the checked entry points (_core, _cuda) raise ValueError with "<function>: <reason>", and the
// fast paths (bindings/bind_fast.cpp) decline instead, so that the Python path raises the
// documented error with the argument's value in its message (python/normkit/_plan.py holds the
// Python side of the same rules).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/dispatch.h"

namespace nk::rules {

inline const char* eps(double eps) {
  return std::isnan(eps) || eps < 0 ? "eps must be >= 0" : nullptr;
}

inline const char* momentum(double m) {
  return std::isnan(m) || m < 0 || m > 1 ? "momentum must be in [0, 1]" : nullptr;
}

inline const char* running_pair(bool has_mean, bool has_var) {
  return has_mean != has_var ? "running_mean and running_var must be given together" : nullptr;
}

inline const char* eval_needs_running(bool training, bool has_running) {
  return !training && !has_running ? "training=False requires running_mean and running_var"
                                   : nullptr;
}

// groups == 0: one statistic per channel over the batch; else per sample and group.
inline const char* groups_divide(int64_t C, int64_t groups) {
  return groups > 0 && C % groups != 0 ? "the number of channels is not divisible by num_groups"
                                       : nullptr;
}

// BatchNorm in training mode: more than one value per channel (count = B * S).
inline const char* batch_count(bool training, int64_t C, int64_t count) {
  return training && C > 0 && count <= 1
             ? "expected more than 1 value per channel when training"
             : nullptr;
}

// A fused activation (core/activation.h codes: 0 none, 1 relu, 2 silu) needs the affine
// parameters (callers pass ones / zeros for absent ones).
inline const char* activation(int act, bool has_weight, bool has_bias) {
  if (act < 0 || act > 2) return "activation must be 0 (none), 1 (relu) or 2 (silu)";
  return act != 0 && !(has_weight && has_bias) ? "an activation needs weight and bias" : nullptr;
}

// RMSNorm's eps=None: the machine epsilon of the compute type (float64 for float64 data,
// float32 otherwise), as PyTorch does.
inline double rms_default_eps(DType d) {
  return d == DType::kFloat64 ? 2.220446049250313e-16 : 1.1920928955078125e-07;
}

// Below this eps a float32 group's rstd = 1/sqrt(var + eps) can exceed float32's range; the
// Python path then computes in float64 (functional._TINY_EPS), so fast paths decline.
constexpr double kTinyEps = 0x1p-250;

inline bool needs_wide_statistics(DType d, double eps) {
  return d != DType::kFloat64 && eps < kTinyEps;
}

// A rule in its raising form (bindings map std::invalid_argument to ValueError):
// "<fn>: <reason><detail>".
inline void check_rule(const char* reason, const std::string& fn, const std::string& detail = "") {
  if (reason) throw std::invalid_argument(fn + ": " + reason + detail);
}

}  // namespace nk::rules

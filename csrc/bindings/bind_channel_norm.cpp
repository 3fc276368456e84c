// normkit bindings: channel norms (BatchNorm), view (B, C, S) or channels-last (B, S, C).
// Each entry: check everything, fill the params struct, release the GIL, run the kernel.
#include <cmath>
#include <type_traits>
#include <vector>

#include "bindings/arrays.h"
#include "cpu/kernels.h"

namespace nk::bind {

namespace {

struct ChannelShape {
  int64_t B, C, S;
};

ChannelShape channel_shape(const py::array& x, bool channels_last, const char* fn) {
  check(x.ndim() == 3, std::string(fn) + ": x must be 3-D (B, C, S) or (B, S, C), got shape " +
                           shape_str(x));
  return channels_last ? ChannelShape{x.shape(0), x.shape(2), x.shape(1)}
                       : ChannelShape{x.shape(0), x.shape(1), x.shape(2)};
}

void channel_forward(const py::array& x, bool channels_last, const py::object& weight,
                     const py::object& bias, const py::object& running_mean,
                     const py::object& running_var, bool training, double momentum, double eps,
                     py::array& y, const py::object& mean, const py::object& rstd,
                     int64_t groups, int activation, const py::object& omega,
                     const py::object& moments) {
  const char* fn = "channel_norm_forward";
  const DType d = data_dtype(x, fn, "x");
  const ChannelShape s = channel_shape(x, channels_last, fn);
  const bool per_sample = groups > 0;
  check_rule(rules::groups_divide(s.C, groups), fn,
             " (C = " + std::to_string(s.C) + ", num_groups = " + std::to_string(groups) + ")");
  check(!per_sample || training, std::string(fn) + ": per-sample statistics require training=True");
  check(!per_sample || running_mean.is_none() || groups == s.C,
        std::string(fn) + ": running statistics with per-sample groups need one group per channel");
  const int64_t n_stats = per_sample ? s.B * groups : s.C;
  check_rule(rules::activation(activation, !weight.is_none(), !bias.is_none()), fn);
  check(omega.is_none() == moments.is_none(), std::string(fn) + ": omega and moments go together");
  check(omega.is_none() || (training && running_mean.is_none() && !weight.is_none() &&
                            !bias.is_none()),
        std::string(fn) + ": weighted statistics need training=True, weight and bias (pass ones "
                          "and zeros) and no running statistics");
  check_rule(rules::eps(eps), fn);
  check_rule(rules::momentum(momentum), fn);
  check_rule(rules::running_pair(!running_mean.is_none(), !running_var.is_none()), fn);
  check_rule(rules::eval_needs_running(training, !running_mean.is_none()), fn);
  if (!per_sample) check_rule(rules::batch_count(training, s.C, s.B * s.S), fn);
  check(!per_sample || s.S * (s.C / groups) > 0 || s.B == 0,
        std::string(fn) + ": empty reduction");
  dispatch_dtype(d, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    ChannelForwardParams<T> p;
    const std::vector<int64_t> shape = {x.shape(0), x.shape(1), x.shape(2)};
    p.x = data_in<T>(x, d, shape, fn, "x");
    p.y = data_out<T>(y, d, shape, fn, "y");
    check_out_alias(y, x, fn, "y", "x");
    p.weight = acc_array<A>(weight, d, s.C, false, fn, "weight");
    p.bias = acc_array<A>(bias, d, s.C, false, fn, "bias");
    p.mean = acc_array<A>(mean, d, n_stats, true, fn, "mean");
    p.rstd = acc_array<A>(rstd, d, n_stats, true, fn, "rstd");
    check(p.mean && p.rstd, std::string(fn) + ": mean and rstd are required");
    p.running_mean = acc_strided<A>(running_mean, d, s.C, p.running_mean_stride, fn, "running_mean");
    p.running_var = acc_strided<A>(running_var, d, s.C, p.running_var_stride, fn, "running_var");
    p.B = s.B;
    p.C = s.C;
    p.S = s.S;
    p.eps = eps;
    p.momentum = momentum;
    p.G = per_sample ? groups : s.C;
    p.training = training;
    p.channels_last = channels_last;
    p.per_sample = per_sample;
    p.activation = activation;
    p.omega = acc_array<A>(omega, d, s.B * s.S, false, fn, "omega");
    if (double* m = acc_array<double>(moments, DType::kFloat64, 3 * n_stats, true, fn, "moments")) {
      p.group_w64 = m;
      p.group_mean64 = m + n_stats;
      p.group_m2_64 = m + 2 * n_stats;
    }
    {
      py::gil_scoped_release nogil;  // no Python objects touched here
      cpu::channel_norm_forward(p);
    }
  });
}

// Moments of the columns of a float32/float64 matrix, in double: x (n, F) with
// rows_are_samples (each column a feature over n samples: channels-last BatchNorm statistics),
// or x (F, n) without (each row a feature: channels-first, B = 1). Returns (mean, m2), float64
// (F,). The BatchNorm statistics kernel with no output (y null). For normkit.sklearn, whose
// float32 fit needs the float64 moments that the float32 mean/rstd outputs would round away.
py::tuple column_moments(const py::array& x, bool rows_are_samples) {
  const char* fn = "column_moments";
  const DType d = data_dtype(x, fn, "x");
  check(d == DType::kFloat32 || d == DType::kFloat64,
        std::string(fn) + ": x must be float32 or float64, got " + dtype_name(x));
  check(x.ndim() == 2, std::string(fn) + ": x must be 2-D, got shape " + shape_str(x));
  check(is_c_contiguous(x), std::string(fn) + ": x must be C-contiguous and aligned");
  const int64_t n = rows_are_samples ? x.shape(0) : x.shape(1);
  const int64_t F = rows_are_samples ? x.shape(1) : x.shape(0);
  check(n > 0, std::string(fn) + ": no samples");
  py::array_t<double> mean(F), m2(F);
  dispatch_dtype(d, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      std::vector<T> mean_acc(static_cast<size_t>(F)), rstd_acc(static_cast<size_t>(F));
      ChannelForwardParams<T> p;
      p.x = static_cast<const T*>(x.data());
      p.y = nullptr;  // statistics only
      p.mean = mean_acc.data();
      p.rstd = rstd_acc.data();
      p.group_mean64 = mean.mutable_data();
      p.group_m2_64 = m2.mutable_data();
      p.B = rows_are_samples ? n : 1;
      p.S = rows_are_samples ? 1 : n;
      p.C = p.G = F;
      p.training = true;
      p.channels_last = rows_are_samples;
      py::gil_scoped_release nogil;  // no Python objects touched here
      cpu::channel_norm_forward(p);
    }
  });
  return py::make_tuple(mean, m2);
}

void channel_backward(const py::array& dy, const py::array& x, bool channels_last,
                      const py::object& mean, const py::object& rstd, const py::object& weight,
                      bool training, py::array& dx, const py::object& dweight,
                      const py::object& dbias, int64_t groups, const py::object& bias,
                      int activation, const py::object& omega, const py::object& group_w) {
  const char* fn = "channel_norm_backward";
  const DType d = data_dtype(x, fn, "x");
  const ChannelShape s = channel_shape(x, channels_last, fn);
  const bool per_sample = groups > 0;
  check_rule(rules::groups_divide(s.C, groups), fn,
             " (C = " + std::to_string(s.C) + ", num_groups = " + std::to_string(groups) + ")");
  const int64_t n_stats = per_sample ? s.B * groups : s.C;
  check_rule(rules::activation(activation, !weight.is_none(), !bias.is_none()), fn);
  check(omega.is_none() == group_w.is_none(), std::string(fn) + ": omega and group_w go together");
  check(omega.is_none() || (training && !weight.is_none()),
        std::string(fn) + ": weighted statistics need training=True and weight (pass ones)");
  dispatch_dtype(d, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    ChannelBackwardParams<T> p;
    const std::vector<int64_t> shape = {x.shape(0), x.shape(1), x.shape(2)};
    p.x = data_in<T>(x, d, shape, fn, "x");
    p.dy = data_in<T>(dy, d, shape, fn, "dy");
    p.dx = data_out<T>(dx, d, shape, fn, "dx");
    check_out_alias(dx, x, fn, "dx", "x");
    check_out_alias(dx, dy, fn, "dx", "dy");
    p.mean = acc_array<A>(mean, d, n_stats, false, fn, "mean");
    p.rstd = acc_array<A>(rstd, d, n_stats, false, fn, "rstd");
    p.weight = acc_array<A>(weight, d, s.C, false, fn, "weight");
    p.bias = acc_array<A>(bias, d, s.C, false, fn, "bias");
    p.activation = activation;
    p.omega = acc_array<A>(omega, d, s.B * s.S, false, fn, "omega");
    p.group_w = acc_array<double>(group_w, DType::kFloat64, n_stats, false, fn, "group_w");
    p.dweight = acc_array<A>(dweight, d, s.C, true, fn, "dweight");
    p.dbias = acc_array<A>(dbias, d, s.C, true, fn, "dbias");
    check(p.mean && p.rstd && p.dweight && p.dbias,
          std::string(fn) + ": mean, rstd, dweight and dbias are required");
    p.B = s.B;
    p.C = s.C;
    p.S = s.S;
    p.G = per_sample ? groups : s.C;
    p.training = training;
    p.channels_last = channels_last;
    p.per_sample = per_sample;
    {
      py::gil_scoped_release nogil;  // no Python objects touched here
      cpu::channel_norm_backward(p);
    }
  });
}

}  // namespace

void bind_channel_norm(py::module_& m) {
  m.def("column_moments", &column_moments, py::arg("x"), py::arg("rows_are_samples"));
  m.def("channel_norm_forward", &channel_forward, py::arg("x"), py::arg("channels_last"),
        py::arg("weight"), py::arg("bias"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("training"), py::arg("momentum"), py::arg("eps"), py::arg("y"), py::arg("mean"),
        py::arg("rstd"), py::arg("groups") = 0, py::arg("activation") = 0,
        py::arg("omega") = py::none(), py::arg("moments") = py::none(),
        "Channel view forward. groups=0: BatchNorm (statistics per channel, (C,)); groups=G > 0: "
        "GroupNorm (statistics per sample and group, (B, G)). Writes y, mean, rstd; updates "
        "running statistics in place when training. activation: 0 none, 1 relu, 2 silu "
        "(y = act(xhat * w + b); weight and bias then required). omega: (B * S,) weight per "
        "position (statistics dtype), shared by the channels: weighted statistics, whose "
        "(total weight, mean, M2) per group are written to moments, float64 (3 * n_stats,).");
  m.def("channel_norm_backward", &channel_backward, py::arg("dy"), py::arg("x"),
        py::arg("channels_last"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
        py::arg("training"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"),
        py::arg("groups") = 0, py::arg("bias") = py::none(), py::arg("activation") = 0,
        py::arg("omega") = py::none(), py::arg("group_w") = py::none(),
        "Channel view backward (groups as in the forward). Writes dx, dweight, dbias in place. "
        "activation as in the forward (dy is then the gradient of the activation's output; "
        "weight and bias required). omega, group_w: the forward's weights and each group's total "
        "weight, for weighted statistics.");
}

}  // namespace nk::bind

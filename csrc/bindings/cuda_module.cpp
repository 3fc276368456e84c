// normkit bindings: the private CUDA extension module normkit._cuda (built only with CUDA).
//
// Entry points take device pointers, sizes and a stream as Python ints; python/normkit/
// _cuda_dispatch.py validates the user's arrays (with functional.py's rules), allocates the
// outputs and the workspace with the array's own library (CuPy), then calls these. Each entry
// re-checks sizes and required pointers (ValueError), fills the params struct, releases the GIL
// and launches asynchronously on the given stream.
//
// The module links the CUDA runtime statically, so importing it needs no driver: device_count()
// is then 0. Test hooks (_row_launch, _channel_view, _locate, _partial_range, _workspace) expose
// the launch arithmetic of csrc/cuda/launch.h to tests/test_cuda_host.py on machines without a GPU.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/dispatch.h"
#include "core/rules.h"
#include "cuda/kernels.h"
#include "cuda/launch.h"

namespace py = pybind11;

namespace {

using nk::DType;

DType dtype_of(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float64") return DType::kFloat64;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw py::type_error("normkit._cuda: unsupported dtype " + name +
                       " (expected float32, float64, float16 or bfloat16)");
}

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

using nk::rules::check_rule;

template <class P> P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

void row_forward(const std::string& dtype, uintptr_t x, uintptr_t y, uintptr_t weight,
                 uintptr_t bias, uintptr_t mean, uintptr_t rstd, int64_t M, int64_t N, double eps,
                 uintptr_t stream, uintptr_t residual, uintptr_t h) {
  const std::string fn = "_cuda.row_forward";
  check(M >= 0 && N >= 1, fn + ": need M >= 0 and N >= 1");
  check_rule(nk::rules::eps(eps), fn);
  check(M == 0 || (x && y && rstd), fn + ": x, y and rstd are required");
  check((residual == 0) == (h == 0), fn + ": residual and h go together (fused add)");
  nk::dispatch_dtype(dtype_of(dtype), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = nk::acc_t<T>;
    nk::RowForwardParams<T> p;
    p.x = ptr<const T>(x);
    p.y = ptr<T>(y);
    p.weight = ptr<const A>(weight);
    p.bias = ptr<const A>(bias);
    p.mean = ptr<A>(mean);
    p.rstd = ptr<A>(rstd);
    p.M = M;
    p.N = N;
    p.eps = eps;
    p.residual = ptr<const T>(residual);
    p.h = ptr<T>(h);
    py::gil_scoped_release nogil;  // no Python objects touched here
    nk::cuda::row_norm_forward(p, stream);
  });
}

void row_backward(const std::string& dtype, uintptr_t dy, uintptr_t x, uintptr_t mean,
                  uintptr_t rstd, uintptr_t weight, uintptr_t dx, uintptr_t dweight,
                  uintptr_t dbias, int64_t M, int64_t N, uintptr_t workspace, uintptr_t stream) {
  const std::string fn = "_cuda.row_backward";
  check(M >= 0 && N >= 1, fn + ": need M >= 0 and N >= 1");
  check(dweight && workspace, fn + ": dweight and workspace are required");
  check(M == 0 || (dy && x && rstd && dx), fn + ": dy, x, rstd and dx are required");
  nk::dispatch_dtype(dtype_of(dtype), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = nk::acc_t<T>;
    nk::RowBackwardParams<T> p;
    p.dy = ptr<const T>(dy);
    p.x = ptr<const T>(x);
    p.mean = ptr<const A>(mean);
    p.rstd = ptr<const A>(rstd);
    p.weight = ptr<const A>(weight);
    p.dx = ptr<T>(dx);
    p.dweight = ptr<A>(dweight);
    p.dbias = ptr<A>(dbias);
    p.M = M;
    p.N = N;
    py::gil_scoped_release nogil;  // no Python objects touched here
    nk::cuda::row_norm_backward(p, ptr<void>(workspace), stream);
  });
}

// The channel params' shape fields, checked.
template <class P> void channel_shape(P& p, int64_t B, int64_t C, int64_t S, int64_t groups,
                                      bool channels_last, const std::string& fn) {
  check(B >= 0 && C >= 0 && S >= 0, fn + ": sizes must be >= 0");
  const bool per_sample = groups > 0;
  check_rule(nk::rules::groups_divide(C, groups), fn,
             " (C = " + std::to_string(C) + ", num_groups = " + std::to_string(groups) + ")");
  p.B = B;
  p.C = C;
  p.S = S;
  p.G = per_sample ? groups : C;
  p.channels_last = channels_last;
  p.per_sample = per_sample;
}

nk::cuda::ChannelView view_of(int64_t B, int64_t C, int64_t S, int64_t groups, bool channels_last) {
  nk::ChannelBackwardParams<float> p;
  channel_shape(p, B, C, S, groups, channels_last, "_cuda.channel_view");
  return nk::cuda::channel_view(p);
}

void channel_forward(const std::string& dtype, uintptr_t x, uintptr_t y, uintptr_t weight,
                     uintptr_t bias, uintptr_t running_mean, uintptr_t running_var,
                     int64_t running_mean_stride, int64_t running_var_stride, uintptr_t mean,
                     uintptr_t rstd, int64_t B, int64_t C, int64_t S, int64_t groups,
                     bool channels_last, bool training, double momentum, double eps,
                     uintptr_t workspace, uintptr_t stream, int activation) {
  const std::string fn = "_cuda.channel_forward";
  check_rule(nk::rules::activation(activation, weight != 0, bias != 0), fn);
  check_rule(nk::rules::eps(eps), fn);
  check_rule(nk::rules::momentum(momentum), fn);
  check_rule(nk::rules::running_pair(running_mean != 0, running_var != 0), fn);
  check_rule(nk::rules::eval_needs_running(training, running_mean != 0), fn);
  check(groups == 0 || training, fn + ": per-sample statistics require training=True");
  check(groups == 0 || !running_mean || groups == C,
        fn + ": running statistics with per-sample groups need one group per channel");
  check(workspace, fn + ": workspace is required");
  nk::dispatch_dtype(dtype_of(dtype), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = nk::acc_t<T>;
    nk::ChannelForwardParams<T> p;
    channel_shape(p, B, C, S, groups, channels_last, fn);
    // empty arrays (CuPy gives them a null pointer) are allowed where nothing is written
    check((mean && rstd) || (groups > 0 ? B * groups : C) == 0, fn + ": mean and rstd are required");
    check(B * C * S == 0 || (x && y), fn + ": x and y are required");
    p.x = ptr<const T>(x);
    p.y = ptr<T>(y);
    p.weight = ptr<const A>(weight);
    p.bias = ptr<const A>(bias);
    p.running_mean = ptr<A>(running_mean);
    p.running_var = ptr<A>(running_var);
    p.running_mean_stride = running_mean_stride;
    p.running_var_stride = running_var_stride;
    p.mean = ptr<A>(mean);
    p.rstd = ptr<A>(rstd);
    p.eps = eps;
    p.momentum = momentum;
    p.training = training;
    p.activation = activation;
    py::gil_scoped_release nogil;  // no Python objects touched here
    nk::cuda::channel_norm_forward(p, ptr<void>(workspace), stream);
  });
}

void channel_backward(const std::string& dtype, uintptr_t dy, uintptr_t x, uintptr_t mean,
                      uintptr_t rstd, uintptr_t weight, uintptr_t dx, uintptr_t dweight,
                      uintptr_t dbias, int64_t B, int64_t C, int64_t S, int64_t groups,
                      bool channels_last, bool training, uintptr_t workspace, uintptr_t stream,
                      uintptr_t bias, int activation) {
  const std::string fn = "_cuda.channel_backward";
  check_rule(nk::rules::activation(activation, weight != 0, bias != 0), fn);
  check(workspace && ((dweight && dbias) || C == 0), fn + ": dweight, dbias and workspace are required");
  nk::dispatch_dtype(dtype_of(dtype), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = nk::acc_t<T>;
    nk::ChannelBackwardParams<T> p;
    channel_shape(p, B, C, S, groups, channels_last, fn);
    check(B * C * S == 0 || (dy && x && mean && rstd && dx), fn + ": dy, x, mean, rstd and dx are required");
    p.dy = ptr<const T>(dy);
    p.x = ptr<const T>(x);
    p.mean = ptr<const A>(mean);
    p.rstd = ptr<const A>(rstd);
    p.weight = ptr<const A>(weight);
    p.dx = ptr<T>(dx);
    p.dweight = ptr<A>(dweight);
    p.dbias = ptr<A>(dbias);
    p.training = training;
    p.bias = ptr<const A>(bias);
    p.activation = activation;
    py::gil_scoped_release nogil;  // no Python objects touched here
    nk::cuda::channel_norm_backward(p, ptr<void>(workspace), stream);
  });
}

// Workspace bytes for an entry point: kind "row_backward" (a = M, b = N), "channel_forward" or
// "channel_backward" (a = B, b = C, S, groups, channels_last).
int64_t workspace(const std::string& kind, const std::string& dtype, int64_t a, int64_t b,
                  int64_t S, int64_t groups, bool channels_last) {
  return nk::dispatch_dtype(dtype_of(dtype), [&](auto tag) -> int64_t {
    using T = typename decltype(tag)::type;
    if (kind == "row_backward") return nk::cuda::row_backward_workspace<T>(a, b);
    const nk::cuda::ChannelView v = view_of(a, b, S, groups, channels_last);
    if (kind == "channel_forward") return nk::cuda::channel_forward_workspace<T>(v);
    if (kind == "channel_backward") return nk::cuda::channel_backward_workspace<T>(v);
    throw std::invalid_argument("_cuda.workspace: unknown kind " + kind);
  });
}

py::dict row_launch_dict(int64_t M, int64_t N) {
  const nk::cuda::RowLaunch l = nk::cuda::row_launch(M, N);
  py::dict d;
  d["warp_per_row"] = l.warp_per_row;
  d["threads"] = l.threads;
  d["blocks"] = l.blocks;
  d["chunks"] = l.chunks;
  d["partial_blocks"] = l.partial_blocks;
  d["combine_blocks"] = l.combine_blocks;
  return d;
}

py::dict channel_view_dict(int64_t B, int64_t C, int64_t S, int64_t groups, bool channels_last) {
  const nk::cuda::ChannelView v = view_of(B, C, S, groups, channels_last);
  py::dict d;
  d["samples"] = v.samples;
  d["O"] = v.O;
  d["C"] = v.C;
  d["I"] = v.I;
  d["G"] = v.G;
  d["D"] = v.D;
  d["units"] = v.units();
  d["groups"] = v.groups();
  d["group_size"] = v.group_size();
  d["total"] = v.total();
  d["use_runs"] = v.use_runs();
  d["chunks"] = v.chunks();
  d["partials"] = v.partials();
  return d;
}

py::tuple locate(int64_t B, int64_t C, int64_t S, int64_t groups, bool channels_last, int64_t e) {
  const nk::cuda::ChannelView v = view_of(B, C, S, groups, channels_last);
  int64_t c, t;
  v.locate(e, c, t);
  return py::make_tuple(c, t);
}

py::tuple partial_range(int64_t B, int64_t C, int64_t S, int64_t groups, bool channels_last,
                        int64_t s, int64_t c0, int64_t width) {
  const nk::cuda::ChannelView v = view_of(B, C, S, groups, channels_last);
  const nk::cuda::PartialRange r = nk::cuda::partial_range(v, s, c0, width);
  return py::make_tuple(r.base, r.A, r.stride, r.Bn);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "normkit's private CUDA kernels; use the normkit package (normkit.cuda) instead.";
  m.def("device_count", &nk::cuda::device_count, "Usable CUDA devices; 0 without a driver or GPU.");
  m.def("device_error", &nk::cuda::device_error, "Why device_count() is 0, or ''.");
  m.def("runtime_version", &nk::cuda::runtime_version);
  m.def("synchronize", &nk::cuda::synchronize, py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("row_forward", &row_forward);
  m.def("row_backward", &row_backward);
  m.def("channel_forward", &channel_forward);
  m.def("channel_backward", &channel_backward);
  m.def("workspace", &workspace, py::arg("kind"), py::arg("dtype"), py::arg("a"), py::arg("b"),
        py::arg("S") = 0, py::arg("groups") = 0, py::arg("channels_last") = false);
  // test hooks: launch arithmetic of csrc/cuda/launch.h
  m.def("_row_launch", &row_launch_dict);
  m.def("_channel_view", &channel_view_dict);
  m.def("_locate", &locate);
  m.def("_partial_range", &partial_range);
  m.def("_grid_for", &nk::cuda::grid_for);
  m.attr("_constants") = py::dict(
      py::arg("warp") = nk::cuda::kWarp, py::arg("block") = nk::cuda::kBlock,
      py::arg("row_block") = nk::cuda::kRowBlock, py::arg("warp_row_max") = nk::cuda::kWarpRowMax,
      py::arg("max_blocks") = nk::cuda::kMaxBlocks, py::arg("rows_per_chunk") = nk::cuda::kRowsPerChunk,
      py::arg("chunk_elements") = nk::cuda::kChunkElements, py::arg("min_run") = nk::cuda::kMinRun,
      py::arg("column_rows") = nk::cuda::kColumnRows);
}

// normkit bindings: row norms (LayerNorm; RMSNorm when mean is None).
// Each entry: check everything, fill the params struct, release the GIL, run the kernel.
#include <cmath>

#include "bindings/arrays.h"
#include "cpu/kernels.h"

namespace nk::bind {

namespace {

void row_forward(const py::array& x, const py::object& weight, const py::object& bias, double eps,
                 py::array& y, const py::object& mean, const py::object& rstd,
                 const py::object& residual, const py::object& h) {
  const char* fn = "row_norm_forward";
  const DType d = data_dtype(x, fn, "x");
  check(x.ndim() == 2, std::string(fn) + ": x must be 2-D (M, N), got shape " + shape_str(x));
  const int64_t M = x.shape(0), N = x.shape(1);
  check(N > 0, std::string(fn) + ": empty reduction (N = 0)");
  check_rule(rules::eps(eps), fn);
  check(!rstd.is_none(), std::string(fn) + ": rstd is required");
  dispatch_dtype(d, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    RowForwardParams<T> p;
    p.x = data_in<T>(x, d, {M, N}, fn, "x");
    p.y = data_out<T>(y, d, {M, N}, fn, "y");
    check_out_alias(y, x, fn, "y", "x");
    p.weight = acc_array<A>(weight, d, N, false, fn, "weight");
    p.bias = acc_array<A>(bias, d, N, false, fn, "bias");
    p.mean = acc_array<A>(mean, d, M, true, fn, "mean");
    p.rstd = acc_array<A>(rstd, d, M, true, fn, "rstd");
    p.M = M;
    p.N = N;
    p.eps = eps;
    check(residual.is_none() == h.is_none(), std::string(fn) + ": residual and h go together");
    if (!residual.is_none()) {  // fused residual add; h may be x or residual, nothing else
      const auto res = py::reinterpret_borrow<py::array>(residual);
      auto ha = py::reinterpret_borrow<py::array>(h);
      p.residual = data_in<T>(res, d, {M, N}, fn, "residual");
      p.h = data_out<T>(ha, d, {M, N}, fn, "h");
      check_out_alias(ha, x, fn, "h", "x");
      check_out_alias(ha, res, fn, "h", "residual");
      check_out_alias(y, res, fn, "y", "residual");
      check(y.data() == ha.data() || !overlaps(y, ha), std::string(fn) + ": y partially overlaps h");
    }
    {
      py::gil_scoped_release nogil;  // no Python objects touched here
      cpu::row_norm_forward(p);
    }
  });
}

void row_backward(const py::array& dy, const py::array& x, const py::object& mean,
                  const py::object& rstd, const py::object& weight, py::array& dx,
                  const py::object& dweight, const py::object& dbias) {
  const char* fn = "row_norm_backward";
  const DType d = data_dtype(x, fn, "x");
  check(x.ndim() == 2, std::string(fn) + ": x must be 2-D (M, N), got shape " + shape_str(x));
  const int64_t M = x.shape(0), N = x.shape(1);
  check(N > 0, std::string(fn) + ": empty reduction (N = 0)");
  check(!rstd.is_none() && !dweight.is_none(), std::string(fn) + ": rstd and dweight are required");
  dispatch_dtype(d, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    RowBackwardParams<T> p;
    p.x = data_in<T>(x, d, {M, N}, fn, "x");
    p.dy = data_in<T>(dy, d, {M, N}, fn, "dy");
    p.dx = data_out<T>(dx, d, {M, N}, fn, "dx");
    check_out_alias(dx, x, fn, "dx", "x");
    check_out_alias(dx, dy, fn, "dx", "dy");
    p.mean = acc_array<A>(mean, d, M, false, fn, "mean");
    p.rstd = acc_array<A>(rstd, d, M, false, fn, "rstd");
    p.weight = acc_array<A>(weight, d, N, false, fn, "weight");
    p.dweight = acc_array<A>(dweight, d, N, true, fn, "dweight");
    p.dbias = acc_array<A>(dbias, d, N, true, fn, "dbias");
    p.M = M;
    p.N = N;
    {
      py::gil_scoped_release nogil;  // no Python objects touched here
      cpu::row_norm_backward(p);
    }
  });
}

}  // namespace

void bind_row_norm(py::module_& m) {
  m.def("row_norm_forward", &row_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("eps"), py::arg("y"), py::arg("mean"), py::arg("rstd"),
        py::arg("residual") = py::none(), py::arg("h") = py::none(),
        "Row view (M, N): normalize each row; mean=None means RMSNorm (no centring). "
        "Writes y, mean, rstd in place.");
  m.def("row_norm_backward", &row_backward, py::arg("dy"), py::arg("x"), py::arg("mean"),
        py::arg("rstd"), py::arg("weight"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"),
        "Row view backward; mean=None means RMSNorm. Writes dx, dweight, dbias in place.");
}

}  // namespace nk::bind

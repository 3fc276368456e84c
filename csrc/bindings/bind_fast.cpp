// normkit bindings: fast paths for the common forward calls.
//
// A call from Python through functional.py's full validation costs ~10 us, which dominates small
// problems. These entry points take the user's arguments unchanged and handle only the plain
// case: a C-contiguous ndarray of a supported dtype, weight/bias/running statistics that are
// already dense arrays of the statistics dtype, plain Python numbers for the options, and `out`
// either absent or a dense array of x's shape and dtype that is x itself or overlaps nothing the
// kernel reads. Anything else — including every invalid input — returns None, and functional.py then
// takes its general path, which validates and raises the documented errors. So these functions
// never raise for bad input and never write before everything they need has been checked.
#include <cmath>

#include "bindings/arrays.h"
#include "bindings/buffer_cache.h"
#include "cpu/kernels.h"

namespace nk::bind {

namespace {

py::object g_norm_output;  // normkit.functional.NormOutput, set at import
py::object g_norm_grads;   // normkit.functional.NormGrads, set at import

// A dense array of exactly the statistics dtype and the given shape (None -> nullptr, ok).
template <class A>
bool fast_array(py::handle h, DType d, const py::ssize_t* shape, py::ssize_t ndim, bool writeable,
                A*& out) {
  out = nullptr;
  if (h.is_none()) return true;
  if (!py::isinstance<py::array>(h)) return false;
  const auto a = py::reinterpret_borrow<py::array>(h);
  if (!is_acc_dtype(a, d) || a.ndim() != ndim || !is_c_contiguous(a)) return false;
  for (py::ssize_t i = 0; i < ndim; ++i)
    if (a.shape(i) != shape[i]) return false;
  if (writeable && !a.writeable()) return false;
  out = static_cast<A*>(const_cast<void*>(a.data()));
  return true;
}

template <class A> bool fast_vector(py::handle h, DType d, int64_t n, bool writeable, A*& out) {
  const py::ssize_t shape[1] = {static_cast<py::ssize_t>(n)};
  return fast_array(h, d, shape, 1, writeable, out);
}

// Whether [p, p + n) overlaps the bytes of array a.
template <class A> bool overlaps_ptr(const py::array& a, const A* p, int64_t n) {
  if (!p || n == 0 || a.size() == 0) return false;
  const char *lo, *hi;
  byte_range(a, lo, hi);
  const char* q = reinterpret_cast<const char*>(p);
  return q < hi && lo < q + n * static_cast<int64_t>(sizeof(A));
}

// `out`: None, or a dense writeable array of x's shape and dtype that is x itself or does not
// overlap it. Sets `out` and `has_out` (note: a default py::array is an empty array, not null).
bool fast_out(py::handle h, const py::array& x, py::array& out, bool& has_out) {
  has_out = !h.is_none();
  if (!has_out) return true;
  if (!py::isinstance<py::array>(h)) return false;
  out = py::reinterpret_borrow<py::array>(h);
  if (!is_c_contiguous(out) || !out.writeable() || out.ndim() != x.ndim()) return false;
  for (py::ssize_t i = 0; i < x.ndim(); ++i)
    if (out.shape(i) != x.shape(i)) return false;
  if (!out.dtype().is(x.dtype()) && !out.dtype().equal(x.dtype())) return false;
  return out.data() == x.data() || !overlaps(out, x);
}

// Runs a kernel, releasing the GIL unless the problem is so small that releasing and taking it
// back would cost more than the kernel itself (a few microseconds at most are held).
template <class F> void run_kernel(int64_t elements, F&& f) {
  if (elements < 16384) {
    f();
    return;
  }
  py::gil_scoped_release nogil;  // no Python objects touched here
  f();
}

// A Python int as int64_t; false (no exception pending) when it is not an exact int or does
// not fit, so the general path raises the documented ValueError instead.
bool fast_int(py::handle h, int64_t& v) {
  if (!PyLong_CheckExact(h.ptr())) return false;
  int overflow = 0;
  const long long r = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  if (overflow != 0 || (r == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  v = static_cast<int64_t>(r);
  return true;
}

bool fast_double(py::handle h, double& v) {
  if (!PyFloat_CheckExact(h.ptr())) return false;
  v = PyFloat_AS_DOUBLE(h.ptr());
  return !std::isnan(v);
}

bool fast_input(py::handle h, py::array& x, DType& d) {
  if (!py::isinstance<py::array>(h)) return false;
  x = py::reinterpret_borrow<py::array>(h);
  return is_c_contiguous(x) && try_data_dtype(x, d);
}

std::vector<py::ssize_t> shape_of(const py::array& a, py::ssize_t drop_last = 0) {
  std::vector<py::ssize_t> s(a.shape(), a.shape() + a.ndim() - drop_last);
  return s;
}

// dtype objects of the statistics, looked up once (pybind11 otherwise builds them from a format
// string on every call). Deliberately leaked: they live as long as the interpreter.
template <class A> const py::dtype& acc_dtype() {
  static const py::dtype* dt = new py::dtype(py::dtype::of<A>());
  return *dt;
}

// A NormOutput built directly (a namedtuple is a tuple subclass without a __dict__), which
// saves the Python-level __new__ call.
py::object make_result(const py::object& result_type, py::object a, py::object b, py::object c) {
  auto* type = reinterpret_cast<PyTypeObject*>(result_type.ptr());
  PyObject* t = type->tp_alloc(type, 3);
  if (!t) throw py::error_already_set();
  PyTuple_SET_ITEM(t, 0, a.release().ptr());
  PyTuple_SET_ITEM(t, 1, b.release().ptr());
  PyTuple_SET_ITEM(t, 2, c.release().ptr());
  return py::reinterpret_steal<py::object>(t);
}

py::object make_output(py::object y, py::object mean, py::object rstd) {
  return make_result(g_norm_output, std::move(y), std::move(mean), std::move(rstd));
}

py::object row_fast(py::handle x_h, py::handle ns_h, py::handle w_h, py::handle b_h,
                    py::handle eps_h, py::handle out_h, bool center) {
  py::array x, out;
  bool has_out = false;
  DType d;
  if (!fast_input(x_h, x, d) || x.ndim() < 1 || !fast_out(out_h, x, out, has_out)) return py::none();
  // normalized_shape: an int, or a tuple of ints equal to x's trailing axes
  py::ssize_t k = 1;
  int64_t N = 0;
  if (PyLong_CheckExact(ns_h.ptr())) {
    if (!fast_int(ns_h, N) || x.shape(x.ndim() - 1) != N) return py::none();
  } else if (PyTuple_CheckExact(ns_h.ptr())) {
    k = PyTuple_GET_SIZE(ns_h.ptr());
    if (k < 1 || k > x.ndim()) return py::none();
    N = 1;
    for (py::ssize_t i = 0; i < k; ++i) {
      PyObject* item = PyTuple_GET_ITEM(ns_h.ptr(), i);
      int64_t extent = 0;
      if (!fast_int(item, extent) || extent != x.shape(x.ndim() - k + i)) return py::none();
      N *= extent;
    }
  } else {
    return py::none();
  }
  if (N <= 0) return py::none();
  double eps;
  if (eps_h.is_none() && !center)
    eps = rules::rms_default_eps(d);
  else if (!fast_double(eps_h, eps) || rules::eps(eps))
    return py::none();
  if (rules::needs_wide_statistics(d, eps)) return py::none();
  const int64_t M = static_cast<int64_t>(x.size()) / N;
  return dispatch_dtype(d, [&](auto tag) -> py::object {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    RowForwardParams<T> p;
    A *w, *b;
    const py::ssize_t* ns = x.shape() + x.ndim() - k;
    if (!fast_array<A>(w_h, d, ns, k, false, w) || !fast_array<A>(b_h, d, ns, k, false, b))
      return py::none();
    if (has_out && (overlaps_ptr(out, w, N) || overlaps_ptr(out, b, N))) return py::none();
    py::array y = out;
    if (!has_out) {
      py::object fresh = cached_empty(x.dtype(), shape_of(x));
      if (fresh.is_none()) return py::none();  // the general path lets NumPy raise MemoryError
      y = py::reinterpret_steal<py::array>(fresh.release());
    }
    const auto lead = shape_of(x, k);
    py::array rstd(acc_dtype<A>(), lead);
    py::object mean = py::none();
    if (center) mean = py::array(acc_dtype<A>(), lead);
    p.x = static_cast<const T*>(x.data());
    p.y = static_cast<T*>(y.mutable_data());
    p.weight = w;
    p.bias = b;
    p.mean = center ? static_cast<A*>(py::reinterpret_borrow<py::array>(mean).mutable_data()) : nullptr;
    p.rstd = static_cast<A*>(rstd.mutable_data());
    p.M = M;
    p.N = N;
    p.eps = eps;
    run_kernel(M * N, [&] { cpu::row_norm_forward(p); });
    return make_output(std::move(y), std::move(mean), std::move(rstd));
  });
}

py::object batch_fast(py::handle x_h, py::handle w_h, py::handle b_h, py::handle rm_h,
                      py::handle rv_h, py::handle training_h, py::handle momentum_h,
                      py::handle eps_h, py::handle ca_h, py::handle out_h) {
  py::array x, out;
  bool has_out = false;
  DType d;
  if (!fast_input(x_h, x, d) || x.ndim() < 2 || !fast_out(out_h, x, out, has_out)) return py::none();
  int64_t ca = 0;
  if (!PyBool_Check(training_h.ptr()) || !fast_int(ca_h, ca)) return py::none();
  const bool training = training_h.ptr() == Py_True;
  if (ca != 1 && ca != -1) return py::none();
  double eps, momentum;
  if (!fast_double(eps_h, eps) || rules::eps(eps) || !fast_double(momentum_h, momentum) ||
      rules::momentum(momentum) || rules::needs_wide_statistics(d, eps))
    return py::none();
  const bool channels_last = ca == -1 && x.ndim() > 2;
  const int64_t B = x.shape(0), C = x.shape(ca == 1 ? 1 : x.ndim() - 1);
  const int64_t S = C && B ? static_cast<int64_t>(x.size()) / (B * C) : 0;
  if (C == 0 || rules::batch_count(training, C, B * S) ||
      rules::running_pair(!rm_h.is_none(), !rv_h.is_none()) ||
      rules::eval_needs_running(training, !rm_h.is_none()))
    return py::none();
  return dispatch_dtype(d, [&](auto tag) -> py::object {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    ChannelForwardParams<T> p;
    A *w, *b, *rm, *rv;
    if (!fast_vector<A>(w_h, d, C, false, w) || !fast_vector<A>(b_h, d, C, false, b) ||
        !fast_vector<A>(rm_h, d, C, true, rm) || !fast_vector<A>(rv_h, d, C, true, rv))
      return py::none();
    if (has_out && (overlaps_ptr(out, w, C) || overlaps_ptr(out, b, C) || overlaps_ptr(out, rm, C) ||
                overlaps_ptr(out, rv, C)))
      return py::none();
    if (rm) {
      const auto rma = py::reinterpret_borrow<py::array>(rm_h);
      const auto rva = py::reinterpret_borrow<py::array>(rv_h);
      if (overlaps(rma, rva) || overlaps(rma, x) || overlaps(rva, x) || overlaps_ptr(rma, w, C) ||
          overlaps_ptr(rma, b, C) || overlaps_ptr(rva, w, C) || overlaps_ptr(rva, b, C))
        return py::none();
      if (!training)
        for (int64_t c = 0; c < C; ++c)
          if (rv[c] < 0) return py::none();
    }
    py::array y = out;
    if (!has_out) {
      py::object fresh = cached_empty(x.dtype(), shape_of(x));
      if (fresh.is_none()) return py::none();  // the general path lets NumPy raise MemoryError
      y = py::reinterpret_steal<py::array>(fresh.release());
    }
    py::array mean(acc_dtype<A>(), std::vector<py::ssize_t>{C}), rstd(acc_dtype<A>(), std::vector<py::ssize_t>{C});
    p.x = static_cast<const T*>(x.data());
    p.y = static_cast<T*>(y.mutable_data());
    p.weight = w;
    p.bias = b;
    p.mean = static_cast<A*>(mean.mutable_data());
    p.rstd = static_cast<A*>(rstd.mutable_data());
    p.running_mean = rm;
    p.running_var = rv;
    p.B = B;
    p.C = C;
    p.S = S;
    p.G = C;
    p.eps = eps;
    p.momentum = momentum;
    p.training = training;
    p.channels_last = channels_last;
    run_kernel(B * C * S, [&] { cpu::channel_norm_forward(p); });
    return make_output(std::move(y), std::move(mean), std::move(rstd));
  });
}

// dy: a dense array of x's dtype and shape (the backwards' fast paths).
bool fast_grad(py::handle h, const py::array& x, py::array& dy) {
  if (!py::isinstance<py::array>(h)) return false;
  dy = py::reinterpret_borrow<py::array>(h);
  if (!is_c_contiguous(dy) || dy.ndim() != x.ndim()) return false;
  if (!dy.dtype().is(x.dtype()) && !dy.dtype().equal(x.dtype())) return false;
  for (py::ssize_t i = 0; i < x.ndim(); ++i)
    if (dy.shape(i) != x.shape(i)) return false;
  return true;
}

// dx of x's shape and dtype (from the buffer cache); None when NumPy should raise MemoryError.
py::object fresh_like(const py::array& x) { return cached_empty(x.dtype(), shape_of(x)); }

// Fast path of layer_norm_backward (center) / rms_norm_backward: the statistics' shape gives k
// (the normalized axes are x's trailing x.ndim - rstd.ndim axes).
py::object row_backward_fast(py::handle dy_h, py::handle x_h, py::handle mean_h, py::handle rstd_h,
                             py::handle w_h, bool center) {
  py::array x, dy;
  DType d;
  if (!fast_input(x_h, x, d) || !fast_grad(dy_h, x, dy)) return py::none();
  if (!py::isinstance<py::array>(rstd_h)) return py::none();
  const py::ssize_t k = x.ndim() - py::reinterpret_borrow<py::array>(rstd_h).ndim();
  if (k < 1) return py::none();
  int64_t N = 1;
  for (py::ssize_t i = x.ndim() - k; i < x.ndim(); ++i) N *= x.shape(i);
  if (N <= 0) return py::none();
  const int64_t M = static_cast<int64_t>(x.size()) / N;
  return dispatch_dtype(d, [&](auto tag) -> py::object {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    A *mean = nullptr, *rstd = nullptr, *w = nullptr;
    const py::ssize_t* lead = x.shape();
    const py::ssize_t* ns = x.shape() + x.ndim() - k;
    if (!fast_array<A>(rstd_h, d, lead, x.ndim() - k, false, rstd) || !rstd) return py::none();
    if (center && (!fast_array<A>(mean_h, d, lead, x.ndim() - k, false, mean) || !mean))
      return py::none();
    if (!center && !mean_h.is_none()) return py::none();
    if (!fast_array<A>(w_h, d, ns, k, false, w)) return py::none();
    py::object fresh = fresh_like(x);
    if (fresh.is_none()) return py::none();
    auto dx = py::reinterpret_steal<py::array>(fresh.release());
    const std::vector<py::ssize_t> nshape(ns, ns + k);
    py::array dweight(acc_dtype<A>(), nshape);
    py::object dbias = py::none();
    if (center) dbias = py::array(acc_dtype<A>(), nshape);
    RowBackwardParams<T> p;
    p.dy = static_cast<const T*>(dy.data());
    p.x = static_cast<const T*>(x.data());
    p.mean = mean;
    p.rstd = rstd;
    p.weight = w;
    p.dx = static_cast<T*>(dx.mutable_data());
    p.dweight = static_cast<A*>(dweight.mutable_data());
    p.dbias = center ? static_cast<A*>(py::reinterpret_borrow<py::array>(dbias).mutable_data())
                     : nullptr;
    p.M = M;
    p.N = N;
    run_kernel(M * N, [&] { cpu::row_norm_backward(p); });
    return make_result(g_norm_grads, std::move(dx), std::move(dweight), std::move(dbias));
  });
}

// Fast path of batch_norm_backward (one statistic per channel over the whole batch).
py::object batch_backward_fast(py::handle dy_h, py::handle x_h, py::handle mean_h,
                               py::handle rstd_h, py::handle w_h, py::handle training_h,
                               py::handle ca_h) {
  py::array x, dy;
  DType d;
  int64_t ca = 0;
  if (!fast_input(x_h, x, d) || x.ndim() < 2 || !fast_grad(dy_h, x, dy)) return py::none();
  if (!PyBool_Check(training_h.ptr()) || !fast_int(ca_h, ca) || (ca != 1 && ca != -1))
    return py::none();
  const bool training = training_h.ptr() == Py_True;
  const bool channels_last = ca == -1 && x.ndim() > 2;
  const int64_t B = x.shape(0), C = x.shape(ca == 1 ? 1 : x.ndim() - 1);
  const int64_t S = C && B ? static_cast<int64_t>(x.size()) / (B * C) : 0;
  if (C == 0 || B * S == 0) return py::none();
  return dispatch_dtype(d, [&](auto tag) -> py::object {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    A *mean = nullptr, *rstd = nullptr, *w = nullptr;
    if (!fast_vector<A>(mean_h, d, C, false, mean) || !mean ||
        !fast_vector<A>(rstd_h, d, C, false, rstd) || !rstd || !fast_vector<A>(w_h, d, C, false, w))
      return py::none();
    py::object fresh = fresh_like(x);
    if (fresh.is_none()) return py::none();
    auto dx = py::reinterpret_steal<py::array>(fresh.release());
    py::array dweight(acc_dtype<A>(), std::vector<py::ssize_t>{C});
    py::array dbias(acc_dtype<A>(), std::vector<py::ssize_t>{C});
    ChannelBackwardParams<T> p;
    p.dy = static_cast<const T*>(dy.data());
    p.x = static_cast<const T*>(x.data());
    p.mean = mean;
    p.rstd = rstd;
    p.weight = w;
    p.dx = static_cast<T*>(dx.mutable_data());
    p.dweight = static_cast<A*>(dweight.mutable_data());
    p.dbias = static_cast<A*>(dbias.mutable_data());
    p.B = B;
    p.C = C;
    p.S = S;
    p.G = C;
    p.training = training;
    p.channels_last = channels_last;
    p.per_sample = false;
    run_kernel(B * C * S, [&] { cpu::channel_norm_backward(p); });
    return make_result(g_norm_grads, std::move(dx), std::move(dweight), std::move(dbias));
  });
}

}  // namespace

void bind_fast(py::module_& m) {
  m.def("_set_result_types", [](py::object norm_output, py::object norm_grads) {
    for (const py::object* t : {&norm_output, &norm_grads})
      if (!PyType_Check(t->ptr()) ||
          !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(t->ptr()), &PyTuple_Type))
        throw py::type_error("_set_result_types: expected tuple subclasses");
    g_norm_output = std::move(norm_output);
    g_norm_grads = std::move(norm_grads);
  }, py::arg("norm_output"), py::arg("norm_grads"));
  m.def("row_norm_backward_fast", &row_backward_fast, py::arg("dy"), py::arg("x"),
        py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("center"),
        "Fast path of layer_norm_backward (center=True) / rms_norm_backward: NormGrads, or None "
        "when the arguments need the general path.");
  m.def("batch_norm_backward_fast", &batch_backward_fast, py::arg("dy"), py::arg("x"),
        py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("training"),
        py::arg("channel_axis"),
        "Fast path of batch_norm_backward: NormGrads, or None when the arguments need the "
        "general path.");
  m.def("row_norm_fast", &row_fast, py::arg("x"), py::arg("normalized_shape"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("out"), py::arg("center"),
        "Fast path of layer_norm (center=True) / rms_norm: NormOutput, or None when the "
        "arguments need the general path.");
  m.def("batch_norm_fast", &batch_fast, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("training"),
        py::arg("momentum"), py::arg("eps"), py::arg("channel_axis"), py::arg("out"),
        "Fast path of batch_norm: NormOutput, or None when the arguments need the general path.");
  // Drop the reference before the interpreter finalizes (the type may already be gone then).
  auto atexit = py::module_::import("atexit");
  atexit.attr("register")(py::cpp_function([]() {
    g_norm_output = py::object();
    g_norm_grads = py::object();
  }));
}

}  // namespace nk::bind

// normkit bindings: the private extension module normkit._core.
// Runtime settings, build information, and small entry points that expose the shared math of
// csrc/core to the tests (conversions, moment merges), so it is tested on the CPU.
#include <cstdint>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "bindings/arrays.h"
#include "core/types.h"
#include "core/welford.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

#ifndef NORMKIT_VERSION
#define NORMKIT_VERSION "unknown"
#endif
#ifndef NORMKIT_CXX_COMPILER
#define NORMKIT_CXX_COMPILER "unknown"
#endif

namespace nk::bind {
void bind_row_norm(py::module_& m);
void bind_channel_norm(py::module_& m);
void bind_fast(py::module_& m);
void bind_buffer_cache(py::module_& m);
}  // namespace nk::bind

namespace {

namespace py = pybind11;

const char* simd_level() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__SSE2__) || defined(_M_X64)
  return "sse2";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "scalar";
#endif
}

py::dict build_info() {
  py::dict d;
  d["version"] = NORMKIT_VERSION;
  d["compiler"] = NORMKIT_CXX_COMPILER;
  d["simd"] = nk::cpu::isa_name(nk::cpu::active_isa());
  d["simd_best"] = nk::cpu::isa_name(nk::cpu::best_supported_isa());
  d["simd_compiled"] = nk::cpu::compiled_isas();
  d["simd_baseline_flags"] = simd_level();
  d["threading"] = nk::cpu::threading_backend();
  d["default_num_threads"] = nk::cpu::default_num_threads();
#if defined(NORMKIT_WITH_CUDA)
  d["cuda_compiled"] = true;
#else
  d["cuda_compiled"] = false;
#endif
  return d;
}

py::array_t<uint16_t> float_to_half_array(const py::array_t<float, py::array::c_style>& a) {
  py::array_t<uint16_t> out(a.size());
  const float* src = a.data();
  uint16_t* dst = out.mutable_data();
  for (py::ssize_t i = 0; i < a.size(); ++i) dst[i] = nk::float_to_half(src[i]);
  return out;
}

py::array_t<float> half_to_float_array(const py::array_t<uint16_t, py::array::c_style>& a) {
  py::array_t<float> out(a.size());
  for (py::ssize_t i = 0; i < a.size(); ++i) out.mutable_data()[i] = nk::half_to_float(a.data()[i]);
  return out;
}

py::array_t<uint16_t> float_to_bfloat16_array(const py::array_t<float, py::array::c_style>& a) {
  py::array_t<uint16_t> out(a.size());
  for (py::ssize_t i = 0; i < a.size(); ++i)
    out.mutable_data()[i] = nk::float_to_bfloat16(a.data()[i]);
  return out;
}

// Moments of `values` built by Welford pushes inside pieces cut at `cuts`, pieces merged in
// order with Chan's formula: returns (count, mean, population variance).
py::tuple moments_by_pieces(const py::array_t<double, py::array::c_style>& values,
                            const std::vector<int64_t>& cuts) {
  nk::Moments<double> total;
  int64_t start = 0;
  std::vector<int64_t> ends = cuts;
  ends.push_back(values.size());
  for (int64_t end : ends) {
    nk::Moments<double> piece;
    for (int64_t i = start; i < end; ++i) nk::welford_push(piece, values.data()[i]);
    nk::welford_merge(total, piece);
    start = end;
  }
  return py::make_tuple(total.count, total.mean, nk::population_var(total));
}

// The row kernels on rows [first, first + k) of a virtual (first + k, N) float32 tensor whose
// rows from `first` on are the k rows of x / dy: every row offset the kernels form is past
// first * N elements (past 2^31 when the tests ask), yet only k rows exist. The virtual base
// pointers are formed as integers; the kernels only dereference rows that exist. Returns
// (y, mean, rstd, dx, dweight, dbias), mean and dbias None without centring (RMSNorm).
template <class T> T* shifted(T* p, int64_t elements) {
  const auto addr = reinterpret_cast<std::uintptr_t>(p) -
                    static_cast<std::uintptr_t>(elements) * sizeof(T);
  return reinterpret_cast<T*>(addr);
}

py::tuple row_norm_rows_from(const py::array_t<float, py::array::c_style>& x,
                             const py::array_t<float, py::array::c_style>& dy, int64_t first,
                             bool center, double eps) {
  if (x.ndim() != 2 || dy.ndim() != 2 || x.shape(0) != dy.shape(0) || x.shape(1) != dy.shape(1))
    throw std::invalid_argument("_row_norm_rows_from: x and dy must be (k, N) of one shape");
  if (first < 0) throw std::invalid_argument("_row_norm_rows_from: first must be >= 0");
  const int64_t k = x.shape(0), N = x.shape(1), off = first * N;
  py::array_t<float> y({k, N}), mean(k), rstd(k), dx({k, N}), dweight(N), dbias(N);
  nk::RowForwardParams<float> f;
  f.x = shifted(x.data(), off);
  f.y = shifted(y.mutable_data(), off);
  f.mean = center ? shifted(mean.mutable_data(), first) : nullptr;
  f.rstd = shifted(rstd.mutable_data(), first);
  f.M = first + k;
  f.N = N;
  f.row_begin = first;
  f.eps = eps;
  nk::RowBackwardParams<float> b;
  b.dy = shifted(dy.data(), off);
  b.x = f.x;
  b.mean = f.mean;
  b.rstd = f.rstd;
  b.dx = shifted(dx.mutable_data(), off);
  b.dweight = dweight.mutable_data();
  b.dbias = center ? dbias.mutable_data() : nullptr;
  b.M = f.M;
  b.N = N;
  b.row_begin = first;
  {
    py::gil_scoped_release release;
    nk::cpu::row_norm_forward(f);
    nk::cpu::row_norm_backward(b);
  }
  py::object none = py::none();
  return py::make_tuple(y, center ? py::object(mean) : none, rstd, dx, dweight,
                        center ? py::object(dbias) : none);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "normkit's private native core; use the normkit package instead.";
  nk::bind::bind_row_norm(m);
  nk::bind::bind_channel_norm(m);
  nk::bind::bind_fast(m);
  nk::bind::bind_buffer_cache(m);
  m.def("set_num_threads", [](py::object n_obj) {
    // Any Python int: out-of-range values are a ValueError here, never a conversion error.
    if (!PyLong_Check(n_obj.ptr()) || PyBool_Check(n_obj.ptr()))
      throw py::type_error("set_num_threads: n must be an int");
    int overflow = 0;
    const long long n = PyLong_AsLongLongAndOverflow(n_obj.ptr(), &overflow);
    if (n == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (overflow != 0 || n < 1 || n > nk::cpu::kMaxThreads)
      throw std::invalid_argument("set_num_threads: n must be between 1 and " +
                                  std::to_string(nk::cpu::kMaxThreads) + ", got " +
                                  py::str(n_obj).cast<std::string>());
    nk::cpu::set_num_threads(static_cast<int>(n));
  }, py::arg("n"));
  m.attr("MAX_THREADS") = nk::cpu::kMaxThreads;
  m.def("get_num_threads", &nk::cpu::num_threads);
  m.def("build_info", &build_info);
  m.def("_float_to_half", &float_to_half_array);
  m.def("_half_to_float", &half_to_float_array);
  m.def("_float_to_bfloat16", &float_to_bfloat16_array);
  m.def("_moments_by_pieces", &moments_by_pieces);
  m.def("_row_norm_rows_from", &row_norm_rows_from, py::arg("x"), py::arg("dy"),
        py::arg("first"), py::arg("center"), py::arg("eps"));
}

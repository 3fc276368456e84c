// normkit bindings: checks on NumPy arrays before any kernel touches them.
//
// The kernels trust their params structs completely; everything they assume (dtype, rank,
// shape, C-contiguity, writeability, no partial overlap of outputs with inputs) is verified here
// first. Failures raise TypeError (py::type_error) or ValueError (std::invalid_argument) with a
// message of the form "<function>: <argument> ...", and nothing has been written yet.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/dispatch.h"
#include "core/rules.h"

namespace nk::bind {

namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += std::to_string(a.shape(i));
    if (a.ndim() == 1 || i + 1 < a.ndim()) s += ",";
    if (i + 1 < a.ndim()) s += " ";
  }
  return s + ")";
}

// Whether a dtype's bytes are in this machine's order ('=' native, '|' not applicable, or the
// explicit character of the host's order). The kernels read and write native values only.
inline bool is_native(const py::dtype& dt) {
  const char order = dt.byteorder();
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  return order == '=' || order == '|' || order == '>';
#else
  return order == '=' || order == '|' || order == '<';
#endif
}

// "float32", or the dtype's string with its byte order ("'>f4'") when that is not native.
inline std::string dtype_name(const py::array& a) {
  const py::dtype dt = a.dtype();
  if (!is_native(dt)) return "'" + py::str(dt.attr("str")).cast<std::string>() + "'";
  return py::str(dt.attr("name")).cast<std::string>();
}

// The storage dtype of a data array (x, y, dy, dx).
inline DType data_dtype(const py::array& a, const char* fn, const char* arg) {
  const py::dtype dt = a.dtype();
  if (!is_native(dt))
    throw py::type_error(std::string(fn) + ": " + arg + " has dtype " + dtype_name(a) +
                         " in non-native byte order (convert it with "
                         "a.astype(a.dtype.newbyteorder('=')))");
  const auto size = dt.itemsize();
  if (dt.kind() == 'f') {
    if (size == 4) return DType::kFloat32;
    if (size == 8) return DType::kFloat64;
    if (size == 2) return DType::kFloat16;
  } else if (size == 2 && dtype_name(a) == "bfloat16") {
    return DType::kBFloat16;
  }
  throw py::type_error(std::string(fn) + ": " + arg + " has unsupported dtype " + dtype_name(a) +
                       " (expected float32, float64, float16 or bfloat16)");
}

// Non-throwing form for fast paths: false when the dtype is not a supported data dtype.
inline bool try_data_dtype(const py::array& a, DType& d) {
  const py::dtype dt = a.dtype();
  if (!is_native(dt)) return false;
  const auto size = dt.itemsize();
  if (dt.kind() == 'f') {
    if (size == 4) { d = DType::kFloat32; return true; }
    if (size == 8) { d = DType::kFloat64; return true; }
    if (size == 2) { d = DType::kFloat16; return true; }
    return false;
  }
  if (size == 2 && dtype_name(a) == "bfloat16") { d = DType::kBFloat16; return true; }
  return false;
}

// Statistics / parameter dtype for a data dtype: float64 for float64, float32 otherwise.
inline bool is_acc_dtype(const py::array& a, DType d) {
  const py::dtype dt = a.dtype();
  return dt.kind() == 'f' && dt.itemsize() == (d == DType::kFloat64 ? 8 : 4) && is_native(dt);
}

// C-contiguous and aligned to its element size: what the kernels read and write (an element at
// a misaligned address is undefined behaviour for them; functional.py copies such arrays, and
// the fast paths decline them).
inline bool is_c_contiguous(const py::array& a) {
  constexpr int kAligned = 0x0100;  // NPY_ARRAY_ALIGNED
  return (a.flags() & py::array::c_style) != 0 && (a.flags() & kAligned) != 0;
}

inline void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}
using rules::check_rule;

inline void check_shape(const py::array& a, const std::vector<int64_t>& shape, const char* fn,
                        const char* arg) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(static_cast<py::ssize_t>(i)) == shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i)
      want += std::to_string(shape[i]) + (shape.size() == 1 || i + 1 < shape.size() ? "," : "") +
              (i + 1 < shape.size() ? " " : "");
    throw std::invalid_argument(std::string(fn) + ": " + arg + " has shape " + shape_str(a) +
                                " but expected " + want + ")");
  }
}

// An input array of the data dtype d, dense, with the given shape.
template <class T>
const T* data_in(const py::array& a, DType d, const std::vector<int64_t>& shape, const char* fn,
                 const char* arg) {
  if (data_dtype(a, fn, arg) != d)
    throw py::type_error(std::string(fn) + ": " + arg + " has dtype " + dtype_name(a) +
                         " but x has another dtype");
  check_shape(a, shape, fn, arg);
  check(is_c_contiguous(a), std::string(fn) + ": " + arg + " must be C-contiguous and aligned");
  return static_cast<const T*>(a.data());
}

template <class T>
T* data_out(py::array& a, DType d, const std::vector<int64_t>& shape, const char* fn, const char* arg) {
  const T* p = data_in<T>(a, d, shape, fn, arg);
  check(a.writeable(), std::string(fn) + ": " + arg + " is read-only");
  return const_cast<T*>(p);
}

// Optional per-group array of the accumulation dtype (None -> nullptr).
template <class A>
A* acc_array(const py::object& o, DType d, int64_t n, bool writeable, const char* fn, const char* arg) {
  if (o.is_none()) return nullptr;
  if (!py::isinstance<py::array>(o))
    throw py::type_error(std::string(fn) + ": " + arg + " must be a NumPy array or None");
  py::array a = py::reinterpret_borrow<py::array>(o);
  if (!is_acc_dtype(a, d))
    throw py::type_error(std::string(fn) + ": " + arg + " has dtype " + dtype_name(a) + " but " +
                         (d == DType::kFloat64 ? "float64" : "float32") + " is required");
  check_shape(a, {n}, fn, arg);
  check(is_c_contiguous(a), std::string(fn) + ": " + arg + " must be contiguous and aligned");
  if (writeable) check(a.writeable(), std::string(fn) + ": " + arg + " is read-only");
  return static_cast<A*>(const_cast<void*>(a.data()));
}

// Optional 1-D array of the accumulation dtype with any stride (running statistics, updated in
// place); returns the pointer and sets stride_elems.
template <class A>
A* acc_strided(const py::object& o, DType d, int64_t n, int64_t& stride_elems, const char* fn,
               const char* arg) {
  if (o.is_none()) return nullptr;
  if (!py::isinstance<py::array>(o))
    throw py::type_error(std::string(fn) + ": " + arg + " must be a NumPy array or None");
  py::array a = py::reinterpret_borrow<py::array>(o);
  if (!is_acc_dtype(a, d))
    throw py::type_error(std::string(fn) + ": " + arg + " has dtype " + dtype_name(a) + " but " +
                         (d == DType::kFloat64 ? "float64" : "float32") + " is required");
  check_shape(a, {n}, fn, arg);
  check(a.writeable(), std::string(fn) + ": " + arg + " is read-only");
  const auto st = n > 1 ? a.strides(0) : a.itemsize();
  check(st % a.itemsize() == 0, std::string(fn) + ": " + arg + " has a misaligned stride");
  stride_elems = st / a.itemsize();
  return static_cast<A*>(const_cast<void*>(a.data()));
}

// Byte range [lo, hi) an array spans, for overlap checks.
inline void byte_range(const py::array& a, const char*& lo, const char*& hi) {
  lo = hi = static_cast<const char*>(a.data());
  if (a.size() == 0) return;
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    const auto extent = (a.shape(i) - 1) * a.strides(i);
    if (extent < 0) lo += extent; else hi += extent;
  }
  hi += a.itemsize();
}

inline bool overlaps(const py::array& a, const py::array& b) {
  const char *a0, *a1, *b0, *b1;
  byte_range(a, a0, a1);
  byte_range(b, b0, b1);
  return a0 < b1 && b0 < a1;
}

// An output may be exactly its input (in place) but may not overlap it any other way.
inline void check_out_alias(const py::array& out, const py::array& in, const char* fn,
                            const char* out_name, const char* in_name) {
  if (out.data() == in.data()) return;  // same dense shape and dtype already checked: in place
  check(!overlaps(out, in), std::string(fn) + ": " + out_name + " partially overlaps " + in_name);
}

}  // namespace nk::bind

// normkit core: one mapping from a runtime dtype to a template type, and one from runtime
// booleans to template parameters, so that inner loops never branch on options.
#pragma once

#include <type_traits>

#include "core/types.h"

namespace nk {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

template <class T> struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the storage type of d.
template <class F> decltype(auto) dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat64: return f(TypeTag<double>{});
    case DType::kFloat16: return f(TypeTag<half>{});
    case DType::kBFloat16: return f(TypeTag<bfloat16>{});
    case DType::kFloat32:
    default: return f(TypeTag<float>{});
  }
}

// Calls f(std::integral_constant<bool, b>{}).
template <class F> decltype(auto) bool_switch(bool b, F&& f) {
  if (b) return f(std::true_type{});
  return f(std::false_type{});
}

}  // namespace nk

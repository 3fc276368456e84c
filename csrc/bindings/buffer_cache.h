// normkit bindings: a bounded cache of large output buffers (see buffer_cache.cpp).
#pragma once

#include <vector>

#include "bindings/arrays.h"

namespace nk::bind {

// An uninitialized C-contiguous array of `shape` and `dt`. Arrays of at least 256 KiB take their
// memory from the cache and give it back when they are freed; smaller ones are plain NumPy arrays.
// None when the size overflows, the memory cannot be allocated (never throws for that), or the
// buffer is larger than the cache would keep: the caller then uses NumPy's allocator.
py::object cached_empty(const py::dtype& dt, const std::vector<py::ssize_t>& shape);

void bind_buffer_cache(py::module_& m);

}  // namespace nk::bind

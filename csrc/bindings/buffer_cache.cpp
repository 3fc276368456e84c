// normkit bindings: a bounded cache of large output buffers.
//
// Why: a fresh multi-megabyte NumPy array is mapped page by page on its first write. On the
// machines we measure, those page faults (and the kernel zeroing every page) cost as much as the
// normalization itself: 7-9 ms for a 32 MiB dx, against 16 ms for the whole LayerNorm backward.
// Outputs that no `out=` can receive (every gradient, and forward outputs when `out` is None) are
// therefore taken from this cache: when an array it handed out is freed, its memory comes back
// here instead of going to the operating system, and the next call of the same size reuses the
// already mapped pages. Training loops call the same shapes every step, so after the first step
// the faults are gone.
//
// Bounds: only buffers of at least kMinBytes go through the cache; it keeps at most `limit`
// bytes of free buffers (set_buffer_cache_limit; 0 turns caching off), dropping the oldest
// first; a buffer handed out is the caller's until its array is freed, like any NumPy array.
// Buffers are page-aligned and deliberately not marked for transparent huge pages: with dx on
// 2 MiB pages the LayerNorm backward ran at 10-13 ms in some processes and 23-27 ms in others
// (8192 x 1024 float32, one thread; presumably cache-set conflicts between x, dy and dx rows that
// share their low 21 address bits), while 4 KiB pages gave 13-17 ms every time. Since buffers
// are reused, huge pages would only make the first call of a size cheaper.
//
// All operations run with the GIL held (allocation from the bindings, release from the array's
// base capsule); the mutex guards against callers that do not.
#include "bindings/buffer_cache.h"

#include <cstdlib>
#include <mutex>

#include <pybind11/stl.h>
#include <cstdint>
#include <new>
#include <vector>


namespace nk::bind {

namespace {

constexpr size_t kMinBytes = size_t{256} << 10;
constexpr size_t kAlign = 4096;
// Sizes are rounded up to this, so that shapes of nearly the same size share buffers.
constexpr size_t kRound = size_t{64} << 10;
constexpr size_t kDefaultLimit = size_t{256} << 20;

void* allocate_aligned(size_t bytes) {
  void* p = nullptr;
#if defined(_WIN32)
  p = _aligned_malloc(bytes, kAlign);
#else
  if (posix_memalign(&p, kAlign, bytes) != 0) p = nullptr;
#endif
  return p;  // nullptr when the memory is not available
}

void free_aligned(void* p) {
#if defined(_WIN32)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

struct Block {
  void* ptr;
  size_t bytes;
};

class BufferCache {
 public:
  // A buffer of `bytes` (already rounded to a multiple of kRound): the most recently returned
  // free one of that size, or a new one.
  void* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = free_.size(); i-- > 0;) {
        if (free_[i].bytes != bytes) continue;
        void* p = free_[i].ptr;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        cached_ -= bytes;
        ++hits_;
        return p;
      }
      ++misses_;
    }
    return allocate_aligned(bytes);
  }

  void release(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes > limit_) {
        drop.push_back(p);
      } else {
        free_.push_back({p, bytes});
        cached_ += bytes;
        trim(drop);
      }
    }
    for (void* q : drop) free_aligned(q);
  }

  // Whether a freed buffer of `bytes` would be kept (it fits within the limit).
  bool keeps(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    return bytes <= limit_;
  }

  size_t set_limit(size_t limit) {
    std::vector<void*> drop;
    size_t old;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = limit_;
      limit_ = limit;
      trim(drop);
    }
    for (void* q : drop) free_aligned(q);
    return old;
  }

  py::dict info() {
    std::lock_guard<std::mutex> lock(mu_);
    py::dict d;
    d["limit"] = limit_;
    d["cached_bytes"] = cached_;
    d["cached_buffers"] = free_.size();
    d["hits"] = hits_;
    d["misses"] = misses_;
    d["min_bytes"] = kMinBytes;
    return d;
  }

 private:
  // Drops the oldest free buffers until the cache is within its limit (mu_ held).
  void trim(std::vector<void*>& drop) {
    size_t k = 0;
    while (k < free_.size() && cached_ > limit_) {
      cached_ -= free_[k].bytes;
      drop.push_back(free_[k].ptr);
      ++k;
    }
    free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(k));
  }

  std::mutex mu_;
  std::vector<Block> free_;  // oldest first
  size_t cached_ = 0;
  size_t limit_ = kDefaultLimit;
  uint64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: arrays may be freed during interpreter shutdown, after static destructors.
BufferCache& cache() {
  static BufferCache* c = new BufferCache();
  return *c;
}

struct Handout {
  void* ptr;
  size_t bytes;
};

}  // namespace

py::object cached_empty(const py::dtype& dt, const std::vector<py::ssize_t>& shape) {
  // Size in bytes, or None on overflow (NumPy then reports the impossible shape itself).
  size_t nbytes = static_cast<size_t>(dt.itemsize());
  for (py::ssize_t s : shape) {
    const auto e = static_cast<size_t>(s);
    if (e != 0 && nbytes > SIZE_MAX / e) return py::none();
    nbytes *= e;
  }
  if (nbytes < kMinBytes) return py::array(dt, shape);
  if (nbytes > SIZE_MAX - kRound) return py::none();
  const size_t bytes = (nbytes + kRound - 1) / kRound * kRound;
  // A buffer the cache would not keep gains nothing from it: None sends the caller to NumPy's
  // allocator, which asks for transparent huge pages on large arrays and so maps fresh memory
  // faster (a 400 MB float32 output: 67 ms to first-touch from np.empty, 154 ms from this cache's
  // 4-KiB pages; Xeon, THP in madvise mode). Cached buffers stay on 4-KiB pages (above).
  if (!cache().keeps(bytes)) return py::none();
  // Failures return None instead of throwing: the caller then asks NumPy, which raises
  // MemoryError in Python (a C++ exception from a failed allocation is avoided on purpose).
  void* p = cache().acquire(bytes);
  if (!p) return py::none();
  auto* h = new (std::nothrow) Handout{p, bytes};
  if (!h) {
    cache().release(p, bytes);
    return py::none();
  }
  PyObject* cap = PyCapsule_New(h, nullptr, [](PyObject* c) {
    auto* hh = static_cast<Handout*>(PyCapsule_GetPointer(c, nullptr));
    cache().release(hh->ptr, hh->bytes);
    delete hh;
  });
  if (!cap) {
    PyErr_Clear();
    delete h;
    cache().release(p, bytes);
    return py::none();
  }
  // From here on the capsule owns the buffer: if the array cannot be made, dropping the capsule
  // returns it to the cache.
  py::capsule owner = py::reinterpret_steal<py::capsule>(cap);
  return py::array(dt, shape, p, owner);
}

void bind_buffer_cache(py::module_& m) {
  m.def("empty", [](const std::vector<py::ssize_t>& shape, const py::dtype& dt) {
    for (py::ssize_t s : shape)
      if (s < 0) throw std::invalid_argument("empty: negative dimension");
    return cached_empty(dt, shape);
  }, py::arg("shape"), py::arg("dtype"),
     "An uninitialized C-contiguous array (buffers of at least 256 KiB come from the cache), or "
     "None when the memory cannot be had (the caller then asks NumPy, which raises).");
  m.def("set_buffer_cache_limit", [](int64_t limit) {
    if (limit < 0) throw std::invalid_argument("set_buffer_cache_limit: limit must be >= 0");
    return cache().set_limit(static_cast<size_t>(limit));
  }, py::arg("nbytes"));
  m.def("buffer_cache_info", [] { return cache().info(); });
}

}  // namespace nk::bind

// normkit CPU: the one place threads are started.
//
// parallel_for splits [0, n) statically into at most num_threads() contiguous ranges of at least
// `grain` items (one range when n < 2 * grain) and calls f(begin, end) once per range. Kernels built on it only ever split work
// into fixed chunks whose size is a constant of the kernel (never derived from the thread count),
// and combine chunk results in chunk order afterwards, so results are bitwise identical whatever
// the thread count (SPEC section 5). OpenMP is used when the build found it, otherwise serial.
// f must not throw: allocate before calling parallel_for.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(NORMKIT_WITH_OPENMP)
#include <omp.h>
#endif

namespace nk::cpu {

// Work below this many elements per thread is not worth waking a thread for.
constexpr int64_t kMinElementsPerThread = 32768;

// Upper bound for set_num_threads: far above any core count this library targets, low enough
// that a mistaken huge value cannot make a parallel region try to start that many threads.
constexpr int kMaxThreads = 1024;

int num_threads();
void set_num_threads(int n);  // 1 <= n <= kMaxThreads
int default_num_threads();
const char* threading_backend();

// Items per range so that each thread gets at least kMinElementsPerThread elements, given the
// number of elements one item stands for.
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(1, elements_per_item));
}

template <class F> void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t useful = std::max<int64_t>(1, n / grain);  // every thread gets >= grain items
  const int nt = static_cast<int>(std::min<int64_t>(num_threads(), useful));
#if defined(NORMKIT_WITH_OPENMP)
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    {
      const int64_t t = omp_get_thread_num();
      const int64_t team = omp_get_num_threads();
      const int64_t base = n / team, rem = n % team;
      const int64_t begin = t * base + std::min(t, rem);
      const int64_t end = begin + base + (t < rem ? 1 : 0);
      if (begin < end) f(begin, end);
    }
    return;
  }
#else
  (void)nt;  // serial build (no OpenMP): one range
#endif
  f(int64_t{0}, n);
}

}  // namespace nk::cpu

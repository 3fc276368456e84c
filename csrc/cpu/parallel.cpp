// normkit CPU: thread-count setting shared by every kernel (see parallel.h).
#include "cpu/parallel.h"

#include <atomic>
#include <thread>

namespace nk::cpu {

namespace {
std::atomic<int> g_num_threads{0};  // 0: not set yet, use the default
}

int default_num_threads() {
#if defined(NORMKIT_WITH_OPENMP)
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

int num_threads() {
  const int n = g_num_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : default_num_threads();
}

void set_num_threads(int n) { g_num_threads.store(std::max(1, n), std::memory_order_relaxed); }

const char* threading_backend() {
#if defined(NORMKIT_WITH_OPENMP)
  return "openmp";
#else
  return "serial";
#endif
}

}  // namespace nk::cpu

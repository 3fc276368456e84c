// normkit CPU: run-time choice of the kernels' instruction set.
//
// The best version the CPU supports is chosen once, at first use. The environment variable
// NORMKIT_ISA (baseline, avx2, avx512) can lower that choice, e.g. to compare versions; asking
// for more than the CPU supports falls back to the best supported one.
#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

namespace nk::cpu {

Isa best_supported_isa() {
#if defined(NORMKIT_MULTI_ISA)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

namespace {
Isa choose_isa() {
  Isa isa = best_supported_isa();
  if (const char* env = std::getenv("NORMKIT_ISA")) {
    Isa want = isa;
    if (std::strcmp(env, "baseline") == 0) want = Isa::kBaseline;
    else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
    else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
    if (static_cast<int>(want) < static_cast<int>(isa)) isa = want;
  }
  return isa;
}
}  // namespace

Isa active_isa() {
  static const Isa isa = choose_isa();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

const char* compiled_isas() {
#if defined(NORMKIT_MULTI_ISA)
  return "baseline,avx2,avx512";
#else
  return "baseline";
#endif
}

#if defined(NORMKIT_MULTI_ISA)
#define NK_DISPATCH(name, Params)                                         \
  template <class T> void name(const Params<T>& p) {                      \
    switch (active_isa()) {                                               \
      case Isa::kAvx512: return isa_avx512::name(p);                      \
      case Isa::kAvx2: return isa_avx2::name(p);                          \
      default: return isa_baseline::name(p);                              \
    }                                                                     \
  }
#else
#define NK_DISPATCH(name, Params) \
  template <class T> void name(const Params<T>& p) { isa_baseline::name(p); }
#endif
NK_DISPATCH(row_norm_forward, RowForwardParams)
NK_DISPATCH(row_norm_backward, RowBackwardParams)
NK_DISPATCH(channel_norm_forward, ChannelForwardParams)
NK_DISPATCH(channel_norm_backward, ChannelBackwardParams)
#undef NK_DISPATCH

#define NK_INSTANTIATE(T)                                                    \
  template void row_norm_forward<T>(const RowForwardParams<T>&);             \
  template void row_norm_backward<T>(const RowBackwardParams<T>&);           \
  template void channel_norm_forward<T>(const ChannelForwardParams<T>&);     \
  template void channel_norm_backward<T>(const ChannelBackwardParams<T>&);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(half)
NK_INSTANTIATE(bfloat16)
#undef NK_INSTANTIATE

}  // namespace nk::cpu

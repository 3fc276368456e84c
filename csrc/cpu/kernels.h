// normkit CPU: entry points of the two kernel families.
//
// row_norm.cpp and channel_norm.cpp are compiled once per instruction set (namespaces
// isa_baseline, isa_avx2, isa_avx512; see CMakeLists.txt), each instantiated for float, double,
// nk::half and nk::bfloat16. The functions in nk::cpu itself (isa.cpp) pick the best version the
// running CPU supports, so one build runs on any x86-64. Every version sums in the same fixed
// order and is compiled with -ffp-contract=off, so all of them give the same bits.
#pragma once

#include "core/dispatch.h"
#include "core/params.h"

namespace nk::cpu {

#define NK_DECLARE_KERNELS                                                   \
  template <class T> void row_norm_forward(const RowForwardParams<T>& p);     \
  template <class T> void row_norm_backward(const RowBackwardParams<T>& p);   \
  template <class T> void channel_norm_forward(const ChannelForwardParams<T>& p); \
  template <class T> void channel_norm_backward(const ChannelBackwardParams<T>& p);

namespace isa_baseline { NK_DECLARE_KERNELS }
namespace isa_avx2 { NK_DECLARE_KERNELS }
namespace isa_avx512 { NK_DECLARE_KERNELS }
NK_DECLARE_KERNELS  // dispatchers
#undef NK_DECLARE_KERNELS

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_supported_isa();        // what this CPU (and this build) can run
Isa active_isa();                // what the kernels use: best, or lower via NORMKIT_ISA
const char* isa_name(Isa isa);   // "baseline", "avx2", "avx512"
const char* compiled_isas();     // e.g. "baseline,avx2,avx512"

}  // namespace nk::cpu

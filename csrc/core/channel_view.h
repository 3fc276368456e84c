// normkit core: the one index map of the channel norms (BatchNorm, GroupNorm, InstanceNorm),
// shared by the CPU kernels (csrc/cpu/channel_norm.cpp) and the CUDA kernels (csrc/cuda/launch.h
// adds its launch arithmetic on top). Plain C++17, host + device.
//
// Every layout of core/params.h, (B, C, S) or channels-last (B, S, C), is seen as x[s][o][c][i],
// dense and row-major:
//   s < samples: independent sample blocks (1 for BatchNorm, B for GroupNorm / InstanceNorm),
//   o < O:       rows within a block that share statistics,
//   c < C:       channels, in G groups of D = C / G (BatchNorm: G = C, D = 1),
//   i < I:       innermost positions.
//                     channels-first (B, C, S)      channels-last (B, S, C)
//   BatchNorm         samples 1, O = B, I = S       samples 1, O = B * S, I = 1
//   GroupNorm         samples B, O = 1, I = S       samples B, O = S,     I = 1
// A unit (s, c) is one channel of one sample: O runs of I contiguous elements. A statistics group
// (s, g) is D consecutive units, n = O * D * I elements; its statistics live at s * G + g.
#pragma once

#include <cstdint>

#include "core/macros.h"

namespace nk {

struct ChannelView {
  int64_t samples = 0, O = 0, C = 0, I = 0, G = 0, D = 0;
  int64_t S = 0;  // spatial size of the original layout (for the flat index map)
  bool channels_last = false, per_sample = false;

  NK_HOST_DEVICE NK_INLINE int64_t units() const { return samples * C; }
  NK_HOST_DEVICE NK_INLINE int64_t groups() const { return samples * G; }
  NK_HOST_DEVICE NK_INLINE int64_t unit_size() const { return O * I; }
  NK_HOST_DEVICE NK_INLINE int64_t group_size() const { return O * D * I; }
  NK_HOST_DEVICE NK_INLINE int64_t cols() const { return C * I; }
  NK_HOST_DEVICE NK_INLINE int64_t total() const { return samples * O * C * I; }
  NK_HOST_DEVICE NK_INLINE int64_t offset(int64_t s, int64_t o, int64_t c) const {
    return ((s * O + o) * C + c) * I;
  }
  // Flat dense index e -> channel c and statistics slot t (group for per_sample, else channel).
  NK_HOST_DEVICE NK_INLINE void locate(int64_t e, int64_t& c, int64_t& t) const {
    int64_t b;
    if (channels_last) {
      c = e % C;
      b = e / (S * C);
    } else {
      const int64_t plane = e / S;
      c = plane % C;
      b = plane / C;
    }
    t = per_sample ? b * G + c / D : c;
  }
};

// The view of a ChannelForwardParams / ChannelBackwardParams (B, C, S, G, channels_last,
// per_sample).
template <class P> NK_HOST_DEVICE NK_INLINE ChannelView channel_view_of(const P& p) {
  ChannelView v;
  v.samples = p.per_sample ? p.B : 1;
  v.C = p.C;
  v.G = p.per_sample ? p.G : p.C;
  v.D = v.G > 0 ? p.C / v.G : 0;
  v.O = p.channels_last ? (p.per_sample ? p.S : p.B * p.S) : (p.per_sample ? 1 : p.B);
  v.I = p.channels_last ? 1 : p.S;
  v.S = p.S;
  v.channels_last = p.channels_last;
  v.per_sample = p.per_sample;
  return v;
}

}  // namespace nk

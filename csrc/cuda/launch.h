// normkit CUDA: launch-configuration arithmetic and the channel view's index maps.
//
// Plain C++ (host + device, no CUDA headers), so that the same functions decide the launches in
// csrc/cuda/*.cu and are tested on the CPU through normkit._cuda's test hooks
// (tests/test_cuda_host.py), including sizes past 2^31 elements and the grid limits.
//
// Every kernel loops grid-stride over its work items, so any grid is correct; the grid is only
// clamped to kMaxBlocks (well inside CUDA's 2^31 - 1 limit on gridDim.x) so that a launch is
// always legal. grid.y and grid.z are never used. All offsets and counts are int64_t.
//
// Chunk sizes are constants (never derived from the device or its SM count): they fix the
// summation order, so results are the same on every GPU (SPEC section 5).
#pragma once

#include <cstdint>

#include "core/channel_view.h"
#include "core/macros.h"
#include "core/types.h"
#include "core/welford.h"

namespace nk::cuda {

constexpr int kWarp = 32;
constexpr int kBlock = 256;           // threads per block for every kernel but block-per-row
constexpr int kRowBlock = 512;        // threads per block, row norms with one block per row
constexpr int64_t kWarpRowMax = 1024; // rows up to this long: one warp per row
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride loops cover the rest
constexpr int64_t kRowsPerChunk = 32;   // row norms: rows per dweight/dbias partial
constexpr int64_t kChunkElements = 4096;  // channel norms, run scheme: elements per partial
constexpr int64_t kMinRun = 32;         // channel norms: runs shorter than this use columns
constexpr int64_t kColumnRows = 64;     // channel norms, column scheme: rows per partial

NK_HOST_DEVICE NK_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for `items` work items handled `per_block` at a time: at least 1, at most kMaxBlocks.
NK_HOST_DEVICE NK_INLINE int64_t grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = ceil_div(items, per_block);
  return blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

// ---- row norms (M, N) ----
NK_HOST_DEVICE NK_INLINE bool row_uses_warp(int64_t N) { return N <= kWarpRowMax; }
NK_HOST_DEVICE NK_INLINE int64_t row_chunks(int64_t M) { return ceil_div(M, kRowsPerChunk); }

struct RowLaunch {
  bool warp_per_row;
  int64_t threads, blocks;     // row kernels
  int64_t chunks;              // dweight/dbias partials: chunks * N values each
  int64_t partial_blocks;      // partial kernel: (chunk, column tile) items
  int64_t combine_blocks;      // combine kernel: one thread per column
};

NK_HOST_DEVICE NK_INLINE RowLaunch row_launch(int64_t M, int64_t N) {
  RowLaunch l;
  l.warp_per_row = row_uses_warp(N);
  l.threads = l.warp_per_row ? kBlock : kRowBlock;
  l.blocks = l.warp_per_row ? grid_for(M, kBlock / kWarp) : grid_for(M, 1);
  l.chunks = row_chunks(M);
  l.partial_blocks = grid_for(l.chunks * ceil_div(N, kBlock), 1);
  l.combine_blocks = grid_for(N, kBlock);
  return l;
}

// ---- channel norms ----
// The index map is core/channel_view.h's (the same as csrc/cpu's); this adds how the CUDA kernels
// split the work. A unit (s, c) is one channel of one sample: O runs of I contiguous elements;
// partial sums are kept per unit and merged per group.
struct ChannelView : nk::ChannelView {
  // Runs of at least kMinRun elements: blocks walk each unit's runs (coalesced); otherwise
  // threads own columns j = c * I + i of each sample's (O, C * I) matrix and walk down rows.
  NK_HOST_DEVICE NK_INLINE bool use_runs() const { return I >= kMinRun; }
  // Partials per unit: run scheme chunks of kChunkElements; column scheme chunks of kColumnRows.
  NK_HOST_DEVICE NK_INLINE int64_t chunks() const {
    return use_runs() ? ceil_div(unit_size(), kChunkElements) : ceil_div(O, kColumnRows);
  }
  NK_HOST_DEVICE NK_INLINE int64_t partials() const {
    return use_runs() ? units() * chunks() : samples * chunks() * cols();
  }
};

template <class P> NK_HOST_DEVICE NK_INLINE ChannelView channel_view(const P& p) {
  ChannelView v;
  static_cast<nk::ChannelView&>(v) = nk::channel_view_of(p);
  return v;
}

// Where the partials of a unit range live: base + a * stride + b for a < A, b < Bn, merged in
// that (a-major) order. Run scheme layout [s][c][chunk]; column scheme [s][chunk][j].
struct PartialRange {
  int64_t base, A, stride, Bn;
};

// Partials of `width` consecutive units starting at unit (s, c0).
NK_HOST_DEVICE NK_INLINE PartialRange partial_range(const ChannelView& v, int64_t s, int64_t c0,
                                                    int64_t width) {
  PartialRange r;
  const int64_t K = v.chunks();
  if (v.use_runs()) {
    r.base = (s * v.C + c0) * K;
    r.A = 1;
    r.stride = 0;
    r.Bn = width * K;
  } else {
    r.base = s * K * v.cols() + c0 * v.I;
    r.A = K;
    r.stride = v.cols();
    r.Bn = width * v.I;
  }
  return r;
}

// Two sums reduced together (backward: sum(g * xhat) and sum(g)).
template <class A> struct SumPair {
  A a, b;
};

// ---- workspaces: device scratch the Python side allocates with the array's own library ----
// Segments are rounded up to kAlign bytes so that each starts aligned for any element type.
constexpr int64_t kAlign = 256;
NK_HOST_DEVICE NK_INLINE int64_t aligned(int64_t bytes) { return ceil_div(bytes, kAlign) * kAlign; }

// Row backward: partial dweight and dbias, chunks x N each.
template <class T> NK_HOST_DEVICE NK_INLINE int64_t row_backward_workspace(int64_t M, int64_t N) {
  return 2 * aligned(row_chunks(M) * N * static_cast<int64_t>(sizeof(acc_t<T>)));
}

// Channel forward: Moments partials; per group (mean, rstd, unbiased var) in double; per group
// merged Moments<double>.
template <class T> NK_HOST_DEVICE NK_INLINE int64_t channel_forward_workspace(const ChannelView& v) {
  return aligned(v.partials() * static_cast<int64_t>(sizeof(Moments<acc_t<T>>))) +
         aligned(v.groups() * 3 * static_cast<int64_t>(sizeof(double))) +
         aligned(v.groups() * static_cast<int64_t>(sizeof(Moments<double>)));
}

// Channel backward: (sum dy*xhat, sum dy) partials, per unit sums in double, per group c1, c2.
template <class T> NK_HOST_DEVICE NK_INLINE int64_t channel_backward_workspace(const ChannelView& v) {
  return aligned(v.partials() * static_cast<int64_t>(sizeof(SumPair<acc_t<T>>))) +
         aligned(v.units() * static_cast<int64_t>(sizeof(SumPair<double>))) +
         aligned(v.groups() * static_cast<int64_t>(sizeof(SumPair<compute_t<T>>)));
}

}  // namespace nk::cuda

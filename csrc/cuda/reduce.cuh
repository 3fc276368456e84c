// normkit CUDA: the one reduction helper (STYLE section 3) — a "team" of threads that owns one
// piece of work (a warp, or a whole block) and all-reduces a value over its members with CUB.
//
// CUB's warp reduction and raking block reduction combine values in a fixed tree for a fixed
// team size, so results are deterministic; no atomics are used anywhere.
//   WarpTeam:     blocks of kBlock threads, one team per warp (rows up to kWarpRowMax).
//   BlockTeam<n>: one team per block of n threads.
// Both broadcast the result to every member through shared memory and synchronize before and
// after, so a team may call all_reduce repeatedly (the temporaries are reused).
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

#include "core/welford.h"
#include "cuda/launch.h"

namespace nk::cuda {

// Sum of a pair (row/channel backward: sum(g * xhat), sum(g)).
struct PairSum {
  template <class A> __device__ __forceinline__ SumPair<A> operator()(const SumPair<A>& x, const SumPair<A>& y) const {
    return SumPair<A>{x.a + y.a, x.b + y.b};
  }
};

struct Plus {
  template <class V> __device__ __forceinline__ V operator()(const V& x, const V& y) const { return x + y; }
};

// Chan's merge (core/welford.h) as a reduction operator; the tree order is fixed.
struct ChanMerge {
  template <class A> __device__ __forceinline__ Moments<A> operator()(Moments<A> x, const Moments<A>& y) const {
    welford_merge(x, y);
    return x;
  }
};

struct WarpTeam {
  static constexpr int kThreads = kBlock;
  static constexpr int kPerBlock = kBlock / kWarp;
  __device__ __forceinline__ static int rank() { return static_cast<int>(threadIdx.x) % kWarp; }
  __device__ __forceinline__ static int size() { return kWarp; }
  __device__ __forceinline__ static int64_t first() {
    return static_cast<int64_t>(blockIdx.x) * kPerBlock + static_cast<int64_t>(threadIdx.x) / kWarp;
  }
  __device__ __forceinline__ static int64_t stride() { return static_cast<int64_t>(gridDim.x) * kPerBlock; }

  template <class V, class Op> __device__ __forceinline__ static V all_reduce(V v, Op op) {
    using R = cub::WarpReduce<V>;
    __shared__ typename R::TempStorage tmp[kPerBlock];
    __shared__ cub::Uninitialized<V> result[kPerBlock];
    const int w = static_cast<int>(threadIdx.x) / kWarp;
    __syncwarp();
    const V r = R(tmp[w]).Reduce(v, op);
    if (rank() == 0) result[w].Alias() = r;
    __syncwarp();
    const V out = result[w].Alias();
    __syncwarp();
    return out;
  }
};

template <int kN> struct BlockTeam {
  static constexpr int kThreads = kN;
  __device__ __forceinline__ static int rank() { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ static int size() { return kN; }
  __device__ __forceinline__ static int64_t first() { return static_cast<int64_t>(blockIdx.x); }
  __device__ __forceinline__ static int64_t stride() { return static_cast<int64_t>(gridDim.x); }

  template <class V, class Op> __device__ __forceinline__ static V all_reduce(V v, Op op) {
    using R = cub::BlockReduce<V, kN, cub::BLOCK_REDUCE_RAKING>;
    __shared__ typename R::TempStorage tmp;
    __shared__ cub::Uninitialized<V> result;
    __syncthreads();
    const V r = R(tmp).Reduce(v, op);
    if (threadIdx.x == 0) result.Alias() = r;
    __syncthreads();
    return result.Alias();
  }
};

}  // namespace nk::cuda

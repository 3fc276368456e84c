// normkit CUDA: row norms — LayerNorm, and RMSNorm as the same kernels with centring compiled out.
//
// View: x is (M, N) row-major, one statistics group per row (STYLE section 2); weight/bias (N,).
// Launch (cuda/launch.h row_launch): rows of N <= kWarpRowMax get one warp each (8 rows per
// block of 256 threads), longer rows one block of 512 threads; rows are walked grid-stride.
// Forward per row:
//   1) stats: two passes over the row (the second hits L1/L2): mean = sum(x) / N, then
//      var = sum((x - mean)^2) / N, per-thread sums in acc_t then one CUB all-reduce each.
//      RMSNorm: mean = 0, var = sum(x^2) / N.
//   2) normalize + affine: y = xhat * w + b (core/norm_math.h).
//   3) write y, mean, rstd. Every member of the team has read the whole row (the all-reduce
//      synchronizes) before any y is written, so y may be x (in place).
// Backward: row_backward_kernel computes c1, c2 with one all-reduce of a pair, then dx.
// dweight/dbias are sums over rows: row_param_partials sums kRowsPerChunk rows per (chunk,
// column) and row_param_combine adds the chunks in chunk order, in double (deterministic).
#include "core/dispatch.h"
#include "core/norm_math.h"
#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"
#include "cuda/reduce.cuh"

namespace nk::cuda {

namespace {

// Assumptions: blockDim.x == Team::kThreads; x, y dense (M, N); N >= 1.
template <class T, class Team, bool kCenter, bool kHasWeight, bool kHasBias>
__global__ void NK_BOUNDS(Team::kThreads) row_forward_kernel(RowForwardParams<T> p) {
  using C = compute_t<T>;
  const int64_t N = p.N;
  const C inv_n = C(1) / static_cast<C>(N);
  for (int64_t r = Team::first(); r < p.M; r += Team::stride()) {
    const T* x = p.x + r * N;
    T* y = p.y + r * N;
    if (p.residual) {  // 0) fused residual add: h = x + residual rounded to T, then normalize h
      const T* res = p.residual + r * N;
      T* h = p.h + r * N;
      // each thread reads back only the h elements it wrote itself (the same j below)
      for (int64_t j = Team::rank(); j < N; j += Team::size())
        h[j] = store<T>(static_cast<C>(load(x[j])) + static_cast<C>(load(res[j])));
      x = h;
    }
    // 1) stats
    C mean = C(0);
    if constexpr (kCenter) {
      C sum = C(0);
      for (int64_t j = Team::rank(); j < N; j += Team::size()) sum += load(x[j]);
      mean = Team::all_reduce(sum, Plus()) * inv_n;
    }
    C sq = C(0);
    for (int64_t j = Team::rank(); j < N; j += Team::size()) {
      const C d = load(x[j]) - mean;
      sq += d * d;
    }
    const C var = Team::all_reduce(sq, Plus()) * inv_n;
    const double rstd = rstd_from_var(static_cast<double>(var), p.eps);
    // 2) normalize + affine, 3) write y
    const GroupStats<C> st = make_group_stats<C>(static_cast<double>(mean), rstd);
    for (int64_t j = Team::rank(); j < N; j += Team::size())
      y[j] = store<T>(affine(xhat_of(load(x[j]), st), param<kHasWeight>(p.weight, j, C(1)),
                             param<kHasBias>(p.bias, j, C(0))));
    // 3) write mean, rstd
    if (Team::rank() == 0) {
      if constexpr (kCenter) p.mean[r] = static_cast<acc_t<T>>(mean);
      p.rstd[r] = static_cast<acc_t<T>>(rstd);
    }
  }
}

// Assumptions: blockDim.x == Team::kThreads; dy, x, dx dense (M, N); N >= 1.
template <class T, class Team, bool kCenter, bool kHasWeight>
__global__ void NK_BOUNDS(Team::kThreads) row_backward_kernel(RowBackwardParams<T> p) {
  using C = compute_t<T>;
  const int64_t N = p.N;
  const C inv_n = C(1) / static_cast<C>(N);
  for (int64_t r = Team::first(); r < p.M; r += Team::stride()) {
    const T* x = p.x + r * N;
    const T* dy = p.dy + r * N;
    T* dx = p.dx + r * N;
    const double mean = kCenter ? static_cast<double>(p.mean[r]) : 0.0;
    const GroupStats<C> st = make_group_stats<C>(mean, static_cast<double>(p.rstd[r]));
    // c1, c2
    SumPair<C> s{C(0), C(0)};
    for (int64_t j = Team::rank(); j < N; j += Team::size()) {
      const C g = load(dy[j]) * param<kHasWeight>(p.weight, j, C(1));
      s.a += g * xhat_of(load(x[j]), st);
      s.b += g;
    }
    s = Team::all_reduce(s, PairSum());
    const C c1 = s.a * inv_n;
    const C c2 = kCenter ? s.b * inv_n : C(0);
    // dx
    for (int64_t j = Team::rank(); j < N; j += Team::size()) {
      const C g = load(dy[j]) * param<kHasWeight>(p.weight, j, C(1));
      dx[j] = store<T>(input_grad(g, xhat_of(load(x[j]), st), st.rstd, c1, c2));
    }
  }
}

// Partial dweight, dbias: work item (chunk k, column tile); thread j sums rows of chunk k.
// Assumptions: blockDim.x == kBlock; pdw, pdb hold row_chunks(M) * N values each.
template <class T, bool kCenter>
__global__ void NK_BOUNDS(kBlock) row_param_partials(RowBackwardParams<T> p, acc_t<T>* pdw,
                                                             acc_t<T>* pdb) {
  using C = compute_t<T>;
  const int64_t N = p.N, tiles = ceil_div(N, kBlock), items = row_chunks(p.M) * tiles;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t k = item / tiles;
    const int64_t j = (item % tiles) * kBlock + threadIdx.x;
    if (j >= N) continue;
    const int64_t r1 = (k + 1) * kRowsPerChunk < p.M ? (k + 1) * kRowsPerChunk : p.M;
    C dw = C(0), db = C(0);
    for (int64_t r = k * kRowsPerChunk; r < r1; ++r) {
      const double mean = kCenter ? static_cast<double>(p.mean[r]) : 0.0;
      const GroupStats<C> st = make_group_stats<C>(mean, static_cast<double>(p.rstd[r]));
      // partial dweight, dbias
      const C d = load(p.dy[r * N + j]);
      dw += d * xhat_of(load(p.x[r * N + j]), st);
      db += d;
    }
    pdw[k * N + j] = dw;
    pdb[k * N + j] = db;
  }
}

// out[j] = sum over chunks k (in order, in double) of partial[k * N + j]; 0 when chunks == 0.
template <class A>
__global__ void NK_BOUNDS(kBlock) row_param_combine(const A* partial, int64_t chunks,
                                                            int64_t N, A* out) {
  for_each_index(N, [&](int64_t j) {
    double sum = 0.0;
    for (int64_t k = 0; k < chunks; ++k) sum += static_cast<double>(partial[k * N + j]);
    out[j] = static_cast<A>(sum);
  });
}

}  // namespace

template <class T> void row_norm_forward(const RowForwardParams<T>& p, uintptr_t stream) {
  if (p.M <= 0 || p.N <= 0) return;  // nothing to launch on an empty input
  const RowLaunch l = row_launch(p.M, p.N);
  const dim3 grid(static_cast<unsigned>(l.blocks)), block(static_cast<unsigned>(l.threads));
  bool_switch(p.mean != nullptr, [&](auto center) {
    bool_switch(p.weight != nullptr, [&](auto has_w) {
      bool_switch(p.bias != nullptr, [&](auto has_b) {
        constexpr bool kC = decltype(center)::value, kW = decltype(has_w)::value,
                       kB = decltype(has_b)::value;
        if (l.warp_per_row)
          row_forward_kernel<T, WarpTeam, kC, kW, kB><<<grid, block, 0, as_stream(stream)>>>(p);
        else
          row_forward_kernel<T, BlockTeam<kRowBlock>, kC, kW, kB>
              <<<grid, block, 0, as_stream(stream)>>>(p);
        NK_CUDA_LAUNCHED();
      });
    });
  });
}

template <class T>
void row_norm_backward(const RowBackwardParams<T>& p, void* workspace, uintptr_t stream) {
  using A = acc_t<T>;
  if (p.N <= 0) return;
  const RowLaunch l = row_launch(p.M, p.N);
  A* pdw = static_cast<A*>(workspace);
  A* pdb = reinterpret_cast<A*>(static_cast<char*>(workspace) + row_backward_workspace<T>(p.M, p.N) / 2);
  const cudaStream_t s = as_stream(stream);
  bool_switch(p.mean != nullptr, [&](auto center) {
    constexpr bool kC = decltype(center)::value;
    if (p.M > 0) {
      bool_switch(p.weight != nullptr, [&](auto has_w) {
        constexpr bool kW = decltype(has_w)::value;
        const dim3 grid(static_cast<unsigned>(l.blocks)), block(static_cast<unsigned>(l.threads));
        if (l.warp_per_row)
          row_backward_kernel<T, WarpTeam, kC, kW><<<grid, block, 0, s>>>(p);
        else
          row_backward_kernel<T, BlockTeam<kRowBlock>, kC, kW><<<grid, block, 0, s>>>(p);
        NK_CUDA_LAUNCHED();
      });
      row_param_partials<T, kC><<<static_cast<unsigned>(l.partial_blocks), kBlock, 0, s>>>(p, pdw, pdb);
      NK_CUDA_LAUNCHED();
    }
  });
  const unsigned cb = static_cast<unsigned>(l.combine_blocks);
  row_param_combine<A><<<cb, kBlock, 0, s>>>(pdw, l.chunks, p.N, p.dweight);
  NK_CUDA_LAUNCHED();
  if (p.dbias) {
    row_param_combine<A><<<cb, kBlock, 0, s>>>(pdb, l.chunks, p.N, p.dbias);
    NK_CUDA_LAUNCHED();
  }
}

#define NK_INSTANTIATE(T)                                                          \
  template void row_norm_forward<T>(const RowForwardParams<T>&, uintptr_t);        \
  template void row_norm_backward<T>(const RowBackwardParams<T>&, void*, uintptr_t);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(half)
NK_INSTANTIATE(bfloat16)
#undef NK_INSTANTIATE

}  // namespace nk::cuda

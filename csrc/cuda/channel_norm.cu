// normkit CUDA: channel norms — BatchNorm, GroupNorm (and InstanceNorm, GroupNorm with G = C).
//
// View (cuda/launch.h ChannelView, the same as csrc/cpu): x[s][o][c][i], dense, with
//   samples (1 for BatchNorm, B for GroupNorm), O rows, C channels in G groups of D, I inner.
// A unit (s, c) is one channel of one sample; a statistics group (s, g) is D consecutive units.
// Reductions are two-stage and deterministic (fixed chunks, fixed merge order, no atomics):
//   partials  one value per (unit, chunk), by one of two schemes chosen from the shape alone:
//     runs    (I >= kMinRun): a block per (unit, chunk of kChunkElements), threads stride
//             along the unit's contiguous runs, CUB block reduction of the per-thread values;
//     columns (I < kMinRun, e.g. channels-last, BatchNorm1d): per sample, the (O, C * I)
//             matrix; a thread per column j and chunk of kColumnRows rows walks down the rows
//             (adjacent threads read adjacent addresses).
//   combine   a block per group (forward) or unit (backward) merges its partials in a fixed
//             order per thread, then one CUB block reduction, in double.
// Forward (training): 1) stats — per-thread Welford pushes in acc_t, Chan merges
// (core/welford.h) up the tree and across chunks; rstd = 1 / sqrt(var + eps). Evaluation: the
// running statistics. Running statistics updated on the device with the unbiased variance
// (InstanceNorm: batch averages of per-sample means and unbiased variances, in sample order).
// 2) normalize + affine, 3) write y: one elementwise kernel, y = xhat * w + b, after every
// statistic is final, so y may be x (in place).
// Backward: per unit S1 = sum(dy * xhat), S2 = sum(dy) (partials + combine); dweight = sum_s S1,
// dbias = sum_s S2 (sample order); per group c1 = sum_c w_c S1 / n, c2 = sum_c w_c S2 / n
// (0 with training=False); dx = rstd * (w dy - c2 - xhat c1) elementwise.
#include "core/activation.h"
#include "core/dispatch.h"
#include "core/norm_math.h"
#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"
#include "cuda/reduce.cuh"

namespace nk::cuda {

namespace {

// ---- the two reductions the partial/combine kernels run ----

// Forward statistics: Moments of x per unit.
template <class T> struct MomentsOp {
  using A = acc_t<T>;
  using Acc = Moments<A>;
  using Total = Moments<double>;
  using Merge = ChanMerge;
  struct Unit {};
  const T* x;
  __device__ __forceinline__ Unit unit(int64_t, int64_t) const { return Unit{}; }
  __device__ __forceinline__ void push(Acc& acc, const Unit&, int64_t off) const {
    welford_push(acc, static_cast<A>(load(x[off])));
  }
  __device__ __forceinline__ static Total widen(const Acc& a) {
    return moments_from_two_pass<double>(a.count, static_cast<double>(a.mean), static_cast<double>(a.m2));
  }
};

// g = dy * act'(z), z = xhat * w + b (core/activation.h); dy itself without an activation.
template <class C>
__device__ __forceinline__ C grad_of(int act, C dy, C xh, C w, C b) {
  if (act == kActRelu) return activation_grad<kActRelu, ScalarOps, C>(dy, affine(xh, w, b));
  if (act == kActSilu) return activation_grad<kActSilu, ScalarOps, C>(dy, affine(xh, w, b));
  return dy;
}

// Backward sums per unit: (sum g * xhat, sum g), with the unit's saved statistics, g as grad_of.
template <class T> struct GradOp {
  using A = acc_t<T>;
  using C = compute_t<T>;
  using Acc = SumPair<A>;
  using Total = SumPair<double>;
  using Merge = PairSum;
  struct Unit {
    GroupStats<C> st;
    C w, b;  // the channel's weight and bias (read with an activation only)
  };
  const T* x;
  const T* dy;
  const A* mean;
  const A* rstd;
  const A* weight;
  const A* bias;
  int64_t G, D;
  bool per_sample;
  int activation;
  __device__ __forceinline__ Unit unit(int64_t s, int64_t c) const {
    const int64_t t = per_sample ? s * G + c / D : c;
    Unit u;
    u.st = make_group_stats<C>(static_cast<double>(mean[t]), static_cast<double>(rstd[t]));
    u.w = activation ? static_cast<C>(weight[c]) : C(1);
    u.b = activation ? static_cast<C>(bias[c]) : C(0);
    return u;
  }
  __device__ __forceinline__ void push(Acc& acc, const Unit& u, int64_t off) const {
    const C xh = xhat_of(load(x[off]), u.st);
    const C d = grad_of(activation, C(load(dy[off])), xh, u.w, u.b);
    acc.a += d * xh;
    acc.b += d;
  }
  __device__ __forceinline__ static Total widen(const Acc& a) {
    return Total{static_cast<double>(a.a), static_cast<double>(a.b)};
  }
};

// Run scheme. Work item (unit u, chunk k) -> partial[u * K + k] (layout [s][c][k]).
// Assumptions: blockDim.x == kBlock; v.I >= kMinRun (so the inner while loop is short).
template <class Op>
__global__ void NK_BOUNDS(kBlock) partials_runs(ChannelView v, Op op, typename Op::Acc* partial) {
  const int64_t K = v.chunks(), items = v.units() * K, I = v.I, n = v.unit_size();
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t u = item / K, k = item % K, s = u / v.C, c = u % v.C;
    const typename Op::Unit st = op.unit(s, c);
    const int64_t e1 = (k + 1) * kChunkElements < n ? (k + 1) * kChunkElements : n;
    int64_t e = k * kChunkElements + threadIdx.x;
    int64_t o = e / I, i = e % I;
    typename Op::Acc acc{};
    for (; e < e1; e += kBlock) {
      op.push(acc, st, v.offset(s, o, c) + i);
      i += kBlock;
      while (i >= I) {
        i -= I;
        ++o;
      }
    }
    acc = BlockTeam<kBlock>::all_reduce(acc, typename Op::Merge());
    if (threadIdx.x == 0) partial[item] = acc;
  }
}

// Column scheme. Work item (s, chunk k, column tile); thread column j = c * I + i sums rows
// [k * kColumnRows, ...) -> partial[(s * K + k) * J + j] (layout [s][k][j]).
// Assumptions: blockDim.x == kBlock.
template <class Op>
__global__ void NK_BOUNDS(kBlock) partials_columns(ChannelView v, Op op, typename Op::Acc* partial) {
  const int64_t K = v.chunks(), J = v.cols(), tiles = ceil_div(J, kBlock);
  const int64_t items = v.samples * K * tiles;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t sk = item / tiles, s = sk / K, k = sk % K;
    const int64_t j = (item % tiles) * kBlock + threadIdx.x;
    if (j >= J) continue;
    const int64_t c = j / v.I, i = j % v.I;
    const typename Op::Unit st = op.unit(s, c);
    const int64_t o1 = (k + 1) * kColumnRows < v.O ? (k + 1) * kColumnRows : v.O;
    typename Op::Acc acc{};
    for (int64_t o = k * kColumnRows; o < o1; ++o) op.push(acc, st, v.offset(s, o, c) + i);
    partial[sk * J + j] = acc;
  }
}

// Combine: item = s * (C / width) + c0 / width merges the partials of units [c0, c0 + width)
// of sample s (cuda/launch.h partial_range), each thread a fixed strided subset in order, then
// a block reduction; finish(item, total) stores the result.
// Assumptions: blockDim.x == kBlock; width divides C.
template <class Op, class Finish>
__global__ void NK_BOUNDS(kBlock) combine(ChannelView v, const typename Op::Acc* partial,
                                                  int64_t width, Finish finish) {
  const int64_t per_sample = v.C / width, items = v.samples * per_sample;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const PartialRange r = partial_range(v, item / per_sample, (item % per_sample) * width, width);
    typename Op::Total acc{};
    for (int64_t q = threadIdx.x; q < r.A * r.Bn; q += kBlock)
      acc = typename Op::Merge()(acc, Op::widen(partial[r.base + (q / r.Bn) * r.stride + q % r.Bn]));
    acc = BlockTeam<kBlock>::all_reduce(acc, typename Op::Merge());
    if (threadIdx.x == 0) finish(item, acc);
  }
}

// The combine's result per item, stored as is.
template <class V> struct Store {
  V* out;
  __device__ __forceinline__ void operator()(int64_t item, const V& v) const { out[item] = v; }
};

// Group statistics from the merged moments, one thread per group: mean, rstd (outputs) and
// (mean, rstd, unbiased var) in double for the normalize and running-statistics kernels.
// (A separate kernel rather than the combine's last step: its double divisions and square root
// are subroutine calls that made the combine spill on sm_80.)
template <class A>
__global__ void NK_BOUNDS(kBlock) finish_stats(const Moments<double>* gm, int64_t groups, double eps,
                                                       A* mean, A* rstd, double* gstat) {
  for_each_index(groups, [&](int64_t t) {
    const Moments<double> m = gm[t];
    const double r = rstd_from_var(population_var(m), eps);
    mean[t] = static_cast<A>(m.mean);
    rstd[t] = static_cast<A>(r);
    gstat[3 * t] = m.mean;
    gstat[3 * t + 1] = r;
    gstat[3 * t + 2] = unbiased_var(m);
  });
}

// Evaluation: statistics from the running ones, one thread per channel.
template <class T> __global__ void NK_BOUNDS(kBlock) eval_stats(ChannelForwardParams<T> p, double* gstat) {
  for_each_index(p.C, [&](int64_t c) {
    const double m = static_cast<double>(p.running_mean[c * p.running_mean_stride]);
    const double r = rstd_from_var(static_cast<double>(p.running_var[c * p.running_var_stride]), p.eps);
    p.mean[c] = static_cast<acc_t<T>>(m);
    p.rstd[c] = static_cast<acc_t<T>>(r);
    gstat[3 * c] = m;
    gstat[3 * c + 1] = r;
  });
}

// Running statistics, one thread per channel: averages over samples (1 for BatchNorm) of the
// group means and unbiased variances, in sample order, then the momentum rule.
// Assumptions: G == C (BatchNorm, InstanceNorm).
template <class T>
__global__ void NK_BOUNDS(kBlock) update_running(ChannelForwardParams<T> p, int64_t samples,
                                                         const double* gstat) {
  for_each_index(p.C, [&](int64_t c) {
    double m = 0.0, uv = 0.0;
    for (int64_t s = 0; s < samples; ++s) {
      m += gstat[3 * (s * p.C + c)];
      uv += gstat[3 * (s * p.C + c) + 2];
    }
    m /= static_cast<double>(samples);
    uv /= static_cast<double>(samples);
    acc_t<T>& rm = p.running_mean[c * p.running_mean_stride];
    acc_t<T>& rv = p.running_var[c * p.running_var_stride];
    rm = running_update(rm, m, p.momentum);
    rv = running_update(rv, uv, p.momentum);
  });
}

// 2) normalize + affine, 3) write y: one thread per element, grid-stride over the dense array.
template <class T, bool kHasWeight, bool kHasBias, int kAct>
__global__ void NK_BOUNDS(kBlock) normalize(ChannelView v, ChannelForwardParams<T> p,
                                                    const double* gstat) {
  using C = compute_t<T>;
  const int64_t n = v.total();
  for_each_index(n, [&](int64_t e) {
    int64_t c, t;
    v.locate(e, c, t);
    const GroupStats<C> st = make_group_stats<C>(gstat[3 * t], gstat[3 * t + 1]);
    p.y[e] = store<T>(activate<kAct, ScalarOps, C>(affine(
        xhat_of(load(p.x[e]), st), param<kHasWeight>(p.weight, c, C(1)), param<kHasBias>(p.bias, c, C(0)))));
  });
}

// dweight, dbias per channel: sums over samples (in order) of the unit sums.
template <class T>
__global__ void NK_BOUNDS(kBlock) param_grads(ChannelBackwardParams<T> p, int64_t samples,
                                                      const SumPair<double>* sums) {
  for_each_index(p.C, [&](int64_t c) {
    double dw = 0.0, db = 0.0;
    for (int64_t s = 0; s < samples; ++s) {
      dw += sums[s * p.C + c].a;
      db += sums[s * p.C + c].b;
    }
    p.dweight[c] = static_cast<acc_t<T>>(dw);
    p.dbias[c] = static_cast<acc_t<T>>(db);
  });
}

// c1, c2 per group t = (s, g) from its D units' sums; 0 with training=False.
template <class T>
__global__ void NK_BOUNDS(kBlock) group_coefficients(ChannelBackwardParams<T> p, ChannelView v,
                                                             const SumPair<double>* sums,
                                                             SumPair<compute_t<T>>* coef) {
  using C = compute_t<T>;
  for_each_index(v.groups(), [&](int64_t t) {
    double a = 0.0, b = 0.0;
    if (p.training) {
      const int64_t s = t / v.G, g = t % v.G;
      for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c) {
        const double w = p.weight ? static_cast<double>(p.weight[c]) : 1.0;
        a += w * sums[s * v.C + c].a;
        b += w * sums[s * v.C + c].b;
      }
      const double n = static_cast<double>(v.group_size());
      a /= n;
      b /= n;
    }
    coef[t] = SumPair<C>{static_cast<C>(a), static_cast<C>(b)};
  });
}

// dx: one thread per element.
template <class T, bool kHasWeight>
__global__ void NK_BOUNDS(kBlock) input_grads(ChannelView v, ChannelBackwardParams<T> p,
                                                      const SumPair<compute_t<T>>* coef) {
  using C = compute_t<T>;
  const int64_t n = v.total();
  for_each_index(n, [&](int64_t e) {
    int64_t c, t;
    v.locate(e, c, t);
    const GroupStats<C> st =
        make_group_stats<C>(static_cast<double>(p.mean[t]), static_cast<double>(p.rstd[t]));
    const C w = param<kHasWeight>(p.weight, c, C(1));
    C g = load(p.dy[e]);
    if (p.activation == kActNone) {
      g = g * w;
      p.dx[e] = store<T>(p.training ? input_grad(g, xhat_of(load(p.x[e]), st), st.rstd, coef[t].a,
                                                 coef[t].b)
                                    : input_grad_const(g, st.rstd));
    } else {
      const C xh = xhat_of(load(p.x[e]), st);
      g = grad_of(p.activation, g, xh, w, static_cast<C>(p.bias[c])) * w;
      p.dx[e] = store<T>(p.training ? input_grad(g, xh, st.rstd, coef[t].a, coef[t].b)
                                    : input_grad_const(g, st.rstd));
    }
  });
}

unsigned blocks(int64_t items, int64_t per_block) { return static_cast<unsigned>(grid_for(items, per_block)); }

// Partials of op over every unit, then one combine per `width` units.
template <class Op, class Finish>
void reduce_units(const ChannelView& v, const Op& op, typename Op::Acc* partial, int64_t width,
                  const Finish& finish, cudaStream_t s) {
  if (v.partials() > 0) {
    if (v.use_runs())
      partials_runs<Op><<<blocks(v.units() * v.chunks(), 1), kBlock, 0, s>>>(v, op, partial);
    else
      partials_columns<Op><<<blocks(v.samples * v.chunks() * ceil_div(v.cols(), kBlock), 1), kBlock, 0, s>>>(
          v, op, partial);
    NK_CUDA_LAUNCHED();
  }
  combine<Op, Finish><<<blocks(v.samples * (v.C / width), 1), kBlock, 0, s>>>(v, partial, width, finish);
  NK_CUDA_LAUNCHED();
}

}  // namespace

template <class T>
void channel_norm_forward(const ChannelForwardParams<T>& p, void* workspace, uintptr_t stream) {
  using A = acc_t<T>;
  const ChannelView v = channel_view(p);
  if (v.C <= 0 || v.samples <= 0) return;  // nothing to launch on an empty input
  const cudaStream_t s = as_stream(stream);
  char* ws = static_cast<char*>(workspace);
  auto* partial = reinterpret_cast<Moments<A>*>(ws);
  ws += aligned(v.partials() * static_cast<int64_t>(sizeof(Moments<A>)));
  auto* gstat = reinterpret_cast<double*>(ws);
  ws += aligned(v.groups() * 3 * static_cast<int64_t>(sizeof(double)));
  auto* gm = reinterpret_cast<Moments<double>*>(ws);
  // 1) stats
  if (p.training) {
    reduce_units(v, MomentsOp<T>{p.x}, partial, v.D, Store<Moments<double>>{gm}, s);
    finish_stats<A><<<blocks(v.groups(), kBlock), kBlock, 0, s>>>(gm, v.groups(), p.eps, p.mean, p.rstd, gstat);
    NK_CUDA_LAUNCHED();
    if (p.running_mean) {
      update_running<T><<<blocks(v.C, kBlock), kBlock, 0, s>>>(p, v.samples, gstat);
      NK_CUDA_LAUNCHED();
    }
  } else {
    eval_stats<T><<<blocks(v.C, kBlock), kBlock, 0, s>>>(p, gstat);
    NK_CUDA_LAUNCHED();
  }
  if (v.total() == 0) return;
  // 2) normalize + affine, 3) write y
  const auto launch = [&](auto has_w, auto has_b, auto act) {
    normalize<T, decltype(has_w)::value, decltype(has_b)::value, decltype(act)::value>
        <<<blocks(v.total(), kBlock), kBlock, 0, s>>>(v, p, gstat);
    NK_CUDA_LAUNCHED();
  };
  using Relu = std::integral_constant<int, kActRelu>;
  using Silu = std::integral_constant<int, kActSilu>;
  if (p.activation == kActRelu)  // weight and bias set (params.h)
    launch(std::true_type{}, std::true_type{}, Relu{});
  else if (p.activation == kActSilu)
    launch(std::true_type{}, std::true_type{}, Silu{});
  else
    bool_switch(p.weight != nullptr, [&](auto has_w) {
      bool_switch(p.bias != nullptr, [&](auto has_b) {
        launch(has_w, has_b, std::integral_constant<int, kActNone>{});
      });
    });
}

template <class T>
void channel_norm_backward(const ChannelBackwardParams<T>& p, void* workspace, uintptr_t stream) {
  using A = acc_t<T>;
  using C = compute_t<T>;
  const ChannelView v = channel_view(p);
  if (v.C <= 0) return;
  const cudaStream_t s = as_stream(stream);
  char* ws = static_cast<char*>(workspace);
  auto* partial = reinterpret_cast<SumPair<A>*>(ws);
  ws += aligned(v.partials() * static_cast<int64_t>(sizeof(SumPair<A>)));
  auto* sums = reinterpret_cast<SumPair<double>*>(ws);
  ws += aligned(v.units() * static_cast<int64_t>(sizeof(SumPair<double>)));
  auto* coef = reinterpret_cast<SumPair<C>*>(ws);
  // c1, c2 (and partial dweight, dbias): unit sums
  if (v.units() > 0)
    reduce_units(v, GradOp<T>{p.x, p.dy, p.mean, p.rstd, p.weight, p.bias, v.G, v.D, v.per_sample, p.activation}, partial, 1,
                 Store<SumPair<double>>{sums}, s);
  param_grads<T><<<blocks(v.C, kBlock), kBlock, 0, s>>>(p, v.samples, sums);
  NK_CUDA_LAUNCHED();
  if (v.total() == 0) return;
  group_coefficients<T><<<blocks(v.groups(), kBlock), kBlock, 0, s>>>(p, v, sums, coef);
  NK_CUDA_LAUNCHED();
  // dx
  bool_switch(p.weight != nullptr, [&](auto has_w) {
    input_grads<T, decltype(has_w)::value><<<blocks(v.total(), kBlock), kBlock, 0, s>>>(v, p, coef);
    NK_CUDA_LAUNCHED();
  });
}

#define NK_INSTANTIATE(T)                                                                     \
  template void channel_norm_forward<T>(const ChannelForwardParams<T>&, void*, uintptr_t);    \
  template void channel_norm_backward<T>(const ChannelBackwardParams<T>&, void*, uintptr_t);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(half)
NK_INSTANTIATE(bfloat16)
#undef NK_INSTANTIATE

}  // namespace nk::cuda

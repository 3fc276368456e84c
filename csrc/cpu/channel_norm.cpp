// normkit CPU: channel norms — BatchNorm (statistics per channel over batch and space).
//
// View: every layout is reduced to (O, C, I) row-major, one statistic group per channel c over
// O * I elements:
//   channels-first (B, C, S):  O = B,     I = S
//   channels-last  (B, S, C):  O = B * S, I = 1
// Two traversals of that one view, chosen from the shape alone (never from the thread count):
//   planes (I >= kMinPlane): threads own channels; a channel's planes (o, c, :) are reduced in
//     pieces of at most kPiece elements and then normalized right away, while still in cache.
//   rows   (I <  kMinPlane): x is a matrix (O, C * I); threads own fixed chunks of rows and keep
//     per-column partials, which are merged per channel in (chunk, i) order.
// Forward: 1) stats — two passes per piece in double, pieces merged with Chan's formula
// (core/welford.h); running statistics updated with the unbiased variance. 2) normalize +
// affine with core/norm_math.h. 3) write y, mean, rstd. A channel is fully reduced before any y
// is written, so y may be x (in place).
// Backward: per channel sum(dy) and sum(dy * xhat) (= dbias, dweight), then
//   dx = rstd * (g - c2 - xhat * c1), g = w * dy, c1 = w * dweight / n, c2 = w * dbias / n;
//   training=False: statistics are constants, c1 = c2 = 0.
#include <algorithm>
#include <vector>

#include "core/norm_math.h"
#include "core/welford.h"
#include "cpu/kernels.h"
#include "cpu/lanes.h"
#include "cpu/parallel.h"

namespace nk::cpu {

namespace {

constexpr int64_t kMinPlane = 64;         // planes shorter than this use the row traversal
constexpr int64_t kPiece = 4096;          // elements per two-pass piece in the plane traversal
constexpr int64_t kChunkElements = 65536; // elements per row chunk in the row traversal

struct View {
  int64_t O, C, I;
};

template <class P> View view_of(const P& p) {
  return p.channels_last ? View{p.B * p.S, p.C, 1} : View{p.B, p.C, p.S};
}

int64_t rows_per_chunk(const View& v) {
  return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, v.C * v.I));
}

// Two-pass moments of a contiguous piece.
template <class T> Moments<double> piece_moments(const T* x, int64_t len) {
  const double mean = lane_sum(len, [&](int64_t i) { return static_cast<double>(load(x[i])); }) /
                      static_cast<double>(len);
  const double m2 = lane_sum(len, [&](int64_t i) {
    const double d = static_cast<double>(load(x[i])) - mean;
    return d * d;
  });
  return moments_from_two_pass(len, mean, m2);
}

// Statistics of channel c: from the batch (training; running statistics updated) or from the
// running statistics (evaluation). Writes p.mean[c], p.rstd[c] and returns them in double.
template <class T>
GroupStats<compute_t<T>> finish_channel(const ChannelForwardParams<T>& p, int64_t c,
                                        const Moments<double>& m) {
  using A = acc_t<T>;
  double mean, var;
  if (p.training) {
    mean = m.mean;
    var = population_var(m);
    if (p.running_mean) {
      A& rm = p.running_mean[c * p.running_stride];
      A& rv = p.running_var[c * p.running_stride];
      rm = running_update(rm, mean, p.momentum);
      rv = running_update(rv, unbiased_var(m), p.momentum);
    }
  } else {
    mean = static_cast<double>(p.running_mean[c * p.running_stride]);
    var = static_cast<double>(p.running_var[c * p.running_stride]);
  }
  const double rstd = rstd_from_var(var, p.eps);
  p.mean[c] = static_cast<A>(mean);
  p.rstd[c] = static_cast<A>(rstd);
  return make_group_stats<compute_t<T>>(mean, rstd);
}

template <class T, bool kHasWeight, bool kHasBias>
void forward_planes(const ChannelForwardParams<T>& p, const View& v) {
  using C = compute_t<T>;
  // Assumptions: I >= 1; threads own whole channels, so no partials are shared.
  parallel_for(v.C, grain_for(v.O * v.I), [&](int64_t ch0, int64_t ch1) {
    for (int64_t c = ch0; c < ch1; ++c) {
      // 1) stats
      Moments<double> m;
      if (p.training) {
        for (int64_t o = 0; o < v.O; ++o) {
          const T* plane = p.x + (o * v.C + c) * v.I;
          for (int64_t s = 0; s < v.I; s += kPiece)
            welford_merge(m, piece_moments(plane + s, std::min(kPiece, v.I - s)));
        }
      }
      const GroupStats<C> st = finish_channel(p, c, m);
      // 2) normalize + affine, 3) write y
      const C w = kHasWeight ? static_cast<C>(p.weight[c]) : C(1);
      const C b = kHasBias ? static_cast<C>(p.bias[c]) : C(0);
      for (int64_t o = 0; o < v.O; ++o) {
        const T* xp = p.x + (o * v.C + c) * v.I;
        T* yp = p.y + (o * v.C + c) * v.I;
        for (int64_t i = 0; i < v.I; ++i)
          yp[i] = store<T>(affine(xhat_of(static_cast<C>(load(xp[i])), st), w, b));
      }
    }
  });
}

template <class T, bool kHasWeight, bool kHasBias>
void forward_rows(const ChannelForwardParams<T>& p, const View& v) {
  using C = compute_t<T>;
  const int64_t cols = v.C * v.I;
  const int64_t rpc = rows_per_chunk(v);
  const int64_t n_chunks = (v.O + rpc - 1) / rpc;
  std::vector<GroupStats<C>> st(static_cast<size_t>(v.C));
  // 1) stats: per-column (mean, M2) of each chunk, by two passes over the chunk.
  std::vector<double> partial;
  if (p.training) partial.assign(static_cast<size_t>(n_chunks * 2 * cols), 0.0);
  if (p.training) {
    parallel_for(n_chunks, grain_for(rpc * cols), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * rpc, r1 = std::min(v.O, r0 + rpc);
        double* mean = partial.data() + k * 2 * cols;
        double* m2 = mean + cols;
        for (int64_t r = r0; r < r1; ++r) {
          const T* xr = p.x + r * cols;
          for (int64_t j = 0; j < cols; ++j) mean[j] += static_cast<double>(load(xr[j]));
        }
        const double inv = 1.0 / static_cast<double>(r1 - r0);
        for (int64_t j = 0; j < cols; ++j) mean[j] *= inv;
        for (int64_t r = r0; r < r1; ++r) {
          const T* xr = p.x + r * cols;
          for (int64_t j = 0; j < cols; ++j) {
            const double d = static_cast<double>(load(xr[j])) - mean[j];
            m2[j] += d * d;
          }
        }
      }
    });
  }
  for (int64_t c = 0; c < v.C; ++c) {
    Moments<double> m;
    if (p.training) {
      for (int64_t k = 0; k < n_chunks; ++k) {
        const int64_t len = std::min(v.O, (k + 1) * rpc) - k * rpc;
        const double* mean = partial.data() + k * 2 * cols;
        for (int64_t i = 0; i < v.I; ++i)
          welford_merge(m, moments_from_two_pass(len, mean[c * v.I + i], mean[cols + c * v.I + i]));
      }
    }
    st[static_cast<size_t>(c)] = finish_channel(p, c, m);
  }
  // 2) normalize + affine, 3) write y
  std::vector<C> wcol(static_cast<size_t>(cols)), bcol(static_cast<size_t>(cols));
  std::vector<GroupStats<C>> scol(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j) {
    const int64_t c = j / v.I;
    wcol[static_cast<size_t>(j)] = kHasWeight ? static_cast<C>(p.weight[c]) : C(1);
    bcol[static_cast<size_t>(j)] = kHasBias ? static_cast<C>(p.bias[c]) : C(0);
    scol[static_cast<size_t>(j)] = st[static_cast<size_t>(c)];
  }
  parallel_for(v.O, grain_for(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = p.x + r * cols;
      T* yr = p.y + r * cols;
      for (int64_t j = 0; j < cols; ++j)
        yr[j] = store<T>(affine(xhat_of(static_cast<C>(load(xr[j])), scol[static_cast<size_t>(j)]),
                                wcol[static_cast<size_t>(j)], bcol[static_cast<size_t>(j)]));
    }
  });
}

// Backward, plane traversal. Assumptions as forward_planes.
template <class T, bool kHasWeight>
void backward_planes(const ChannelBackwardParams<T>& p, const View& v) {
  using C = compute_t<T>;
  const double n = static_cast<double>(v.O * v.I);
  parallel_for(v.C, grain_for(v.O * v.I), [&](int64_t ch0, int64_t ch1) {
    for (int64_t c = ch0; c < ch1; ++c) {
      const GroupStats<C> st =
          make_group_stats<C>(static_cast<double>(p.mean[c]), static_cast<double>(p.rstd[c]));
      // partial dweight, dbias: per plane, added in plane order
      double sum_dy_xhat = 0.0, sum_dy = 0.0;
      for (int64_t o = 0; o < v.O; ++o) {
        const T* xp = p.x + (o * v.C + c) * v.I;
        const T* dyp = p.dy + (o * v.C + c) * v.I;
        double a, b;
        lane_sum2(v.I, a, b, [&](int64_t i, double& acc_a, double& acc_b) {
          const double d = static_cast<double>(load(dyp[i]));
          acc_a += d * static_cast<double>(xhat_of(static_cast<C>(load(xp[i])), st));
          acc_b += d;
        });
        sum_dy_xhat += a;
        sum_dy += b;
      }
      p.dweight[c] = static_cast<acc_t<T>>(sum_dy_xhat);
      p.dbias[c] = static_cast<acc_t<T>>(sum_dy);
      // c1, c2
      const C w = kHasWeight ? static_cast<C>(p.weight[c]) : C(1);
      const C c1 = p.training ? static_cast<C>(static_cast<double>(w) * sum_dy_xhat / n) : C(0);
      const C c2 = p.training ? static_cast<C>(static_cast<double>(w) * sum_dy / n) : C(0);
      // dx
      for (int64_t o = 0; o < v.O; ++o) {
        const T* xp = p.x + (o * v.C + c) * v.I;
        const T* dyp = p.dy + (o * v.C + c) * v.I;
        T* dxp = p.dx + (o * v.C + c) * v.I;
        for (int64_t i = 0; i < v.I; ++i)
          dxp[i] = store<T>(input_grad(static_cast<C>(load(dyp[i])) * w,
                                       xhat_of(static_cast<C>(load(xp[i])), st), st.rstd, c1, c2));
      }
    }
  });
}

// Backward, row traversal. Assumptions as forward_rows.
template <class T, bool kHasWeight>
void backward_rows(const ChannelBackwardParams<T>& p, const View& v) {
  using C = compute_t<T>;
  const int64_t cols = v.C * v.I;
  const int64_t rpc = rows_per_chunk(v);
  const int64_t n_chunks = (v.O + rpc - 1) / rpc;
  const double n = static_cast<double>(v.O * v.I);
  std::vector<GroupStats<C>> scol(static_cast<size_t>(cols));
  std::vector<C> wcol(static_cast<size_t>(cols)), c1col(static_cast<size_t>(cols)),
      c2col(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j) {
    const int64_t c = j / v.I;
    scol[static_cast<size_t>(j)] =
        make_group_stats<C>(static_cast<double>(p.mean[c]), static_cast<double>(p.rstd[c]));
    wcol[static_cast<size_t>(j)] = kHasWeight ? static_cast<C>(p.weight[c]) : C(1);
  }
  // partial dweight, dbias: per chunk and column
  std::vector<double> partial(static_cast<size_t>(n_chunks * 2 * cols), 0.0);
  parallel_for(n_chunks, grain_for(rpc * cols), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      double* s_dy_xhat = partial.data() + k * 2 * cols;
      double* s_dy = s_dy_xhat + cols;
      const int64_t r1 = std::min(v.O, (k + 1) * rpc);
      for (int64_t r = k * rpc; r < r1; ++r) {
        const T* xr = p.x + r * cols;
        const T* dyr = p.dy + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          const double d = static_cast<double>(load(dyr[j]));
          s_dy_xhat[j] +=
              d * static_cast<double>(xhat_of(static_cast<C>(load(xr[j])), scol[static_cast<size_t>(j)]));
          s_dy[j] += d;
        }
      }
    }
  });
  for (int64_t c = 0; c < v.C; ++c) {
    double sum_dy_xhat = 0.0, sum_dy = 0.0;
    for (int64_t k = 0; k < n_chunks; ++k)
      for (int64_t i = 0; i < v.I; ++i) {
        sum_dy_xhat += partial[static_cast<size_t>(k * 2 * cols + c * v.I + i)];
        sum_dy += partial[static_cast<size_t>(k * 2 * cols + cols + c * v.I + i)];
      }
    p.dweight[c] = static_cast<acc_t<T>>(sum_dy_xhat);
    p.dbias[c] = static_cast<acc_t<T>>(sum_dy);
    // c1, c2
    const double w = kHasWeight ? static_cast<double>(p.weight[c]) : 1.0;
    for (int64_t i = 0; i < v.I; ++i) {
      c1col[static_cast<size_t>(c * v.I + i)] = p.training ? static_cast<C>(w * sum_dy_xhat / n) : C(0);
      c2col[static_cast<size_t>(c * v.I + i)] = p.training ? static_cast<C>(w * sum_dy / n) : C(0);
    }
  }
  // dx
  parallel_for(v.O, grain_for(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = p.x + r * cols;
      const T* dyr = p.dy + r * cols;
      T* dxr = p.dx + r * cols;
      for (int64_t j = 0; j < cols; ++j) {
        const size_t u = static_cast<size_t>(j);
        dxr[j] = store<T>(input_grad(static_cast<C>(load(dyr[j])) * wcol[u],
                                     xhat_of(static_cast<C>(load(xr[j])), scol[u]), scol[u].rstd,
                                     c1col[u], c2col[u]));
      }
    }
  });
}

}  // namespace

template <class T> void channel_norm_forward(const ChannelForwardParams<T>& p) {
  const View v = view_of(p);
  if (v.C <= 0) return;
  bool_switch(p.weight != nullptr, [&](auto has_w) {
    bool_switch(p.bias != nullptr, [&](auto has_b) {
      constexpr bool kW = decltype(has_w)::value, kB = decltype(has_b)::value;
      if (v.I >= kMinPlane)
        forward_planes<T, kW, kB>(p, v);
      else
        forward_rows<T, kW, kB>(p, v);
    });
  });
}

template <class T> void channel_norm_backward(const ChannelBackwardParams<T>& p) {
  const View v = view_of(p);
  if (v.C <= 0) return;
  bool_switch(p.weight != nullptr, [&](auto has_w) {
    constexpr bool kW = decltype(has_w)::value;
    if (v.I >= kMinPlane)
      backward_planes<T, kW>(p, v);
    else
      backward_rows<T, kW>(p, v);
  });
}

#define NK_INSTANTIATE(T)                                                     \
  template void channel_norm_forward<T>(const ChannelForwardParams<T>&);     \
  template void channel_norm_backward<T>(const ChannelBackwardParams<T>&);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(half)
NK_INSTANTIATE(bfloat16)
#undef NK_INSTANTIATE

}  // namespace nk::cpu

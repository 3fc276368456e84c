// normkit CPU: row norms — LayerNorm, and RMSNorm as the same kernel with centring compiled out.
//
// View: x is (M, N) row-major, one group per row (STYLE section 2); weight/bias (N,).
// Forward per row:
//   1) stats in double with fixed-order lanes (cpu/lanes.h): float/half/bfloat16 rows in one
//      pass of shifted sums in pieces (kShiftedStats in cpu/lanes.h); double rows in two
//      passes (the row is in L1/L2 after the first): mean = sum(x) / N, then
//      var = sum((x - mean)^2) / N.
//      RMSNorm: mean = 0, var = sum(x^2) / N.
//   2) normalize + affine: y = xhat * w + b (core/norm_math.h).
//   3) write y, mean, rstd. The row is fully reduced before any of its y is written, so y may
//      be x itself (in place).
// Backward per row: one pass in double forms c1, c2 (both sums) and adds the row to the partial
// dweight/dbias, then dx in the compute type; dweight/dbias are sums over rows, accumulated per
// fixed chunk of kRowsPerChunk rows and combined in chunk order (determinism).
//
// Threads: rows are independent; parallel_for over rows (forward) or row chunks (backward).
// Memory: y / dx of at least kStreamBytes are written with streaming stores (cpu/simd.h).
#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/norm_math.h"
#include "cpu/kernels.h"
#include "cpu/lanes.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

#ifndef NK_ISA_NS
#define NK_ISA_NS isa_baseline
#endif

namespace nk::cpu::NK_ISA_NS {

namespace {

// Rows per dweight/dbias partial in the backward: a constant, so the summation order of
// dweight and dbias never depends on the thread count.
constexpr int64_t kRowsPerChunk = 64;

// Outputs at least this large are written with streaming stores (they cannot stay in cache).
constexpr int64_t kStreamBytes = int64_t{8} << 20;

// Rows of at least kPrefetchRowBytes (cpu/simd.h) have the next row (forward: x, and residual
// and h with a fused add; backward: the next group's x and dy rows) prefetched while the current
// one is written, one cache line per line written. Such a row starts on a new page, where the
// hardware prefetchers start cold, and its statistics pass waited on memory. Xeon (second host),
// float32, 2026-12-07, ms, interleaved runs, x in L3 (the benchmark's case), 1 / 2 threads:
// - forward, AVX-512: LayerNorm (8192, 1024) 5.8-6.0 -> 4.2-4.5 (1 thread), (4096, 4096)
//   11.3-11.5 -> 8.6-8.8 / 6.0 -> 4.1-4.2; RMSNorm alike; add_layer_norm (8192, 1024)
//   11.7-12.1 -> 10.3-10.9 / 6.0 -> 4.8-5.0;
// - backward, AVX-512 | AVX2: LayerNorm (8192, 1024) 10.2-10.6 -> 8.8-8.9 / 5.1-5.2 -> 4.0-4.4
//   | 11.6-12.9 -> 9.7 / 5.8-6.3 -> 4.5-4.9, (4096, 4096) 21.3-22.0 -> 17.9-18.5 | 24.3-25.6
//   -> 19.7-21.2; RMSNorm alike.
// Shorter rows share pages and the hardware prefetch serves them: with the threshold at 2 KiB,
// the (512, 768) backward was 6-13 % slower on AVX-512 (and 5-10 % faster on AVX2).

// Per-column parameter w (or the constant 1) as a block or scalar.
template <bool kHas, class A, class W> NK_INLINE auto param(const A* p, int64_t j, W w, A dflt) {
  if constexpr (kHas) {
    return loadw(p + j, w);
  } else {
    (void)p;
    (void)j;
    (void)w;
    return dflt;
  }
}

// Assumptions: x, y dense (M, N); N >= 1; rows [r0, r1) owned by the caller.
template <class T, bool kCenter, bool kHasWeight, bool kHasBias>
void row_forward_rows(const RowForwardParams<T>& p, int64_t r0, int64_t r1, bool stream) {
  using C = compute_t<T>;
  const int64_t N = p.N;
  const double inv_n = 1.0 / static_cast<double>(N);
  // The loops read locals only: values reached through p would be reloaded after every store
  // (a vector store may alias anything).
  const T* const xb = p.x;
  T* const yb = p.y;
  const T* const resb = p.residual;
  T* const hb = p.h;
  const acc_t<T>* const wb = p.weight;
  const acc_t<T>* const bb = p.bias;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = xb + r * N;
    T* y = yb + r * N;
    // 1) stats
    double mean = 0.0, var = 0.0;
    bool done = false;
    if (resb) {  // 0) fused residual add: h = x + residual (same index read, then written)
      const T* res = resb + r * N;
      T* h = hb + r * N;
      if constexpr (kCenter && std::is_same_v<T, float>) {
        // float32 LayerNorm: the statistics summed from the registers as h is written (the
        // same values in the same order as from h read back: the same bits), so they no longer
        // wait for h's lines, which the stores are still fetching. add_layer_norm (512, 768)
        // float32, 1 thread, AMD EPYC (Zen 4), 2026-12-08, ms, interleaved processes: AVX-512
        // 0.19-0.29 -> 0.155-0.165, AVX2 0.19-0.30 -> 0.17-0.18 (PyTorch's add + LayerNorm
        // 0.18-0.20; ours as np.add + layer_norm 0.16); (8192, 1024) AVX-512 7.2 -> 6.0, AVX2
        // 7.4 either way; add_rms_norm (512, 768) (the branch below) 0.16-0.24 -> 0.136-0.143
        // on both levels. (Prefetching the next 3 KiB row of x, residual and h instead was 5 %
        // slower.)
        const Moments<double> m = piecewise_shifted_moments(
            N, [x, res](int64_t i) { return static_cast<double>(x[i] + res[i]); },
            [x, res, h](int64_t i, int64_t len, double shift, double& s1, double& s2) {
              lane_sum2(len, s1, s2, [&](int64_t k, auto w) {
                const auto v = loadw(x + i + k, w) + loadw(res + i + k, w);
                storew(h + i + k, v, w);
                const auto d = widen(v) - shift;
                return two(d, d * d);
              });
            });
        mean = m.mean;
        var = m.m2 * inv_n;
        done = true;
      } else if constexpr (!kCenter && std::is_same_v<T, float>) {  // RMSNorm alike
        var = lane_sum(N, [x, res, h](int64_t j, auto w) {
                const auto v = loadw(x + j, w) + loadw(res + j, w);
                storew(h + j, v, w);
                const auto d = widen(v);
                return d * d;
              }) * inv_n;
        done = true;
      } else {
        elementwise(N, h, false, [&](int64_t j, auto w) { return loadw(x + j, w) + loadw(res + j, w); });
      }
      x = h;
    }
    if (done) {
    } else if constexpr (kCenter && kShiftedStats<T>) {
      const Moments<double> m = shifted_moments(x, N);
      mean = m.mean;
      var = m.m2 * inv_n;
    } else if constexpr (kCenter) {
      mean = lane_sum(N, [&](int64_t j, auto w) { return load_wide(x + j, w); }) * inv_n;
      var = lane_sum(N, [&](int64_t j, auto w) {
              const auto d = load_wide(x + j, w) - mean;
              return d * d;
            }) * inv_n;
    } else {
      var = lane_sum(N, [&](int64_t j, auto w) {
              const auto v = load_wide(x + j, w);
              return v * v;
            }) * inv_n;
    }
    const double rstd = rstd_from_var(var, p.eps);
    // 2) normalize + affine, 3) write y
    const GroupStats<C> st = make_group_stats<C>(mean, rstd);
    // the next row's x (and residual, and h to be written) prefetched (kPrefetchRowBytes);
    // rows without it run a loop without the prefetch code
    const bool ahead = r + 1 < r1 && N * static_cast<int64_t>(sizeof(T)) >= kPrefetchRowBytes;
    bool_switch(ahead, [&](auto prefetch) {
      elementwise(N, y, stream, [&](int64_t j, auto w) {
        if constexpr (decltype(prefetch)::value) {
          prefetch_line_once(xb + (r + 1) * N + j, w);
          if (resb) {
            prefetch_line_once(resb + (r + 1) * N + j, w);
            prefetch_line_once<true>(hb + (r + 1) * N + j, w);
          }
        }
        return affine(xhat_of(loadw(x + j, w), st), param<kHasWeight>(wb, j, w, C(1)),
                      param<kHasBias>(bb, j, w, C(0)));
      });
    });
    // 3) write mean, rstd
    if constexpr (kCenter) p.mean[r] = static_cast<acc_t<T>>(mean);
    p.rstd[r] = static_cast<acc_t<T>>(rstd);
  }
  if (stream) stream_fence();
}

// Assumptions: dy, x, dx dense (M, N); rows [r0, r1) lie in one chunk whose partial dweight and
// dbias rows are pdw, pdb (N doubles each, zeroed by the caller); wd is the weight in double
// (null without weight). Per row:
//   1) one pass in double over dy and x - mean (each widened once): the row's sums
//      sum(g * (x - mean)) and sum(g) with g = dy * w (fixed lanes, cpu/lanes.h), and the
//      chunk's partials dweight += dy * xhat, dbias += dy (rows added in row order);
//   2) dx in the compute type from the row again (now in L1): no conversion at all.
// The partials used to be formed in the dx pass from widened dy and float xhat, so dy and x were
// widened twice; the conversions (four vcvtps2pd and two vextractf128 per 8 floats a pass on
// AVX2) bound the cache-resident case. LayerNorm float32 backward, 1 thread, AMD EPYC (Zen 4),
// 2026-12-08, ms, interleaved processes (the build before against this one), AVX2 | AVX-512 |
// SSE2: (512, 768) 0.224 -> 0.178 | 0.177 -> 0.168 | 0.40 -> 0.38; (8192, 1024) 10.2-10.6 ->
// 6.4-6.8 | 8.6-9.1 -> 5.8-6.0 | 16.7 -> 9.8; (4096, 4096) 21-24 -> 16 | 21 -> 15; RMSNorm
// (8192, 1024) 10.9 -> 5.2 | 8.1 -> 4.9 | 12.2 -> 6.9. Bits: dx and dweight change in the last
// places (g = dy * w and x - mean now formed in double, dweight from a double xhat: closer to a
// float64 reference); still the same on every level and thread count.
template <class T, bool kCenter, bool kHasWeight, bool kHasBias>
void row_backward_rows(const RowBackwardParams<T>& p, const double* wd, int64_t r0, int64_t r1,
                       double* pdw, double* pdb, bool stream) {
  using C = compute_t<T>;
  const int64_t N = p.N;
  const double inv_n = 1.0 / static_cast<double>(N);
  const bool ahead_rows = N * static_cast<int64_t>(sizeof(T)) >= kPrefetchRowBytes;
  // The loops read locals only: values reached through p would be reloaded after every store
  // (a vector store may alias anything).
  const T* const xb = p.x;
  const T* const dyb = p.dy;
  T* const dxb = p.dx;
  const acc_t<T>* const wb = p.weight;
  for (int64_t r = r0; r < r1; ++r) {
    const T* const x = xb + r * N;
    const T* const dy = dyb + r * N;
    const double mean = kCenter ? static_cast<double>(p.mean[r]) : 0.0;
    const double rstd = static_cast<double>(p.rstd[r]);
    const GroupStats<C> st = make_group_stats<C>(mean, rstd);
    double sum_gx = 0.0, sum_g = 0.0;
    lane_sum2(N, sum_gx, sum_g, [&](int64_t j, auto w) {
      const auto d = load_wide(dy + j, w);
      auto xc = load_wide(x + j, w);
      if constexpr (kCenter) xc = xc - mean;
      storew(pdw + j, loadw(pdw + j, w) + d * (xc * rstd), w);
      if constexpr (kHasBias) storew(pdb + j, loadw(pdb + j, w) + d, w);
      const auto g = d * param<kHasWeight>(wd, j, w, 1.0);
      return two(g * xc, g);
    });
    const C c1 = static_cast<C>(rstd * sum_gx * inv_n);
    const C c2 = kCenter ? static_cast<C>(sum_g * inv_n) : C(0);
    // the next row's x and dy prefetched meanwhile (kPrefetchRowBytes)
    bool_switch(ahead_rows && r + 1 < r1, [&](auto prefetch) {
      elementwise(N, dxb + r * N, stream, [&](int64_t j, auto w) {
        if constexpr (decltype(prefetch)::value) {
          prefetch_line_once(x + N + j, w);
          prefetch_line_once(dy + N + j, w);
        }
        const auto xh = xhat_of(loadw(x + j, w), st);
        return input_grad(loadw(dy + j, w) * param<kHasWeight>(wb, j, w, C(1)), xh, st.rstd, c1, c2);
      });
    });
  }
  if (stream) stream_fence();
}

}  // namespace

template <class T> void row_norm_forward(const RowForwardParams<T>& p) {
  const int64_t rows = p.M - p.row_begin;
  if (rows <= 0 || p.N <= 0) return;
  bool_switch(p.mean != nullptr, [&](auto center) {
    bool_switch(p.weight != nullptr, [&](auto has_w) {
      bool_switch(p.bias != nullptr, [&](auto has_b) {
        const bool stream = rows * p.N * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
        parallel_for(rows, grain_for(p.N), [&](int64_t r0, int64_t r1) {
          row_forward_rows<T, decltype(center)::value, decltype(has_w)::value,
                           decltype(has_b)::value>(p, p.row_begin + r0, p.row_begin + r1,
                                                   stream);
        });
      });
    });
  });
}

template <class T> void row_norm_backward(const RowBackwardParams<T>& p) {
  using A = acc_t<T>;
  const int64_t M = p.M, N = p.N, first = p.row_begin, rows = M - first;
  if (N <= 0) return;
  if (rows <= 0) {
    for (int64_t j = 0; j < N; ++j) {
      p.dweight[j] = A(0);
      if (p.dbias) p.dbias[j] = A(0);
    }
    return;
  }
  const int64_t n_chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  // Partial sums, one row pair per chunk; offset by 16 doubles so that the dweight and dbias
  // rows of a chunk do not start at the same offset within a page (4K aliasing).
  const int64_t stride = 2 * N + 16;
  std::vector<double> partial(static_cast<size_t>(n_chunks * stride), 0.0);
  const bool stream = rows * N * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  // the weight in double for the sums (float weights widened once here, not per row)
  std::vector<double> wide_w;
  const double* wd = nullptr;
  if constexpr (std::is_same_v<A, double>) {
    wd = p.weight;
  } else if (p.weight) {
    wide_w.assign(p.weight, p.weight + N);
    wd = wide_w.data();
  }
  bool_switch(p.mean != nullptr, [&](auto center) {
    bool_switch(p.weight != nullptr, [&](auto has_w) {
      bool_switch(p.dbias != nullptr, [&](auto has_b) {
        parallel_for(n_chunks, grain_for(kRowsPerChunk * N), [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            double* pdw = partial.data() + c * stride;
            const int64_t r0 = first + c * kRowsPerChunk, r1 = std::min(M, r0 + kRowsPerChunk);
            row_backward_rows<T, decltype(center)::value, decltype(has_w)::value,
                              decltype(has_b)::value>(p, wd, r0, r1, pdw, pdw + N + 16, stream);
          }
        });
      });
    });
  });
  // Combine the chunks' partials in chunk order, a block of columns at a time and each chunk's
  // row read sequentially (reading a column down the chunks would jump stride * 8 bytes per
  // load: a TLB and cache miss each, which cost more than the whole kernel when N is large).
  constexpr int64_t kCols = 256;
  parallel_for((N + kCols - 1) / kCols, grain_for(n_chunks * kCols), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kCols, n = std::min(kCols, N - j0);
      double dw[kCols], db[kCols];
      for (int64_t j = 0; j < n; ++j) dw[j] = db[j] = 0.0;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const double* pw = partial.data() + c * stride + j0;
        const double* pb = pw + N + 16;
        for (int64_t j = 0; j < n; ++j) {
          dw[j] += pw[j];
          db[j] += pb[j];
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        p.dweight[j0 + j] = static_cast<A>(dw[j]);
        if (p.dbias) p.dbias[j0 + j] = static_cast<A>(db[j]);
      }
    }
  });
}

#define NK_INSTANTIATE(T)                                              \
  template void row_norm_forward<T>(const RowForwardParams<T>&);       \
  template void row_norm_backward<T>(const RowBackwardParams<T>&);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(half)
NK_INSTANTIATE(bfloat16)
#undef NK_INSTANTIATE

}  // namespace nk::cpu::NK_ISA_NS

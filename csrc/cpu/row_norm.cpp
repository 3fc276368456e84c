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
// Backward per row: c1, c2 from one pass (both sums), then dx; dweight/dbias are sums over rows,
// accumulated per fixed chunk of kRowsPerChunk rows and combined in chunk order (determinism).
//
// Threads: rows are independent; parallel_for over rows (forward) or row chunks (backward).
// Memory: y / dx of at least kStreamBytes are written with streaming stores (cpu/simd.h).
#include <algorithm>
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
    if (resb) {  // 0) fused residual add: h = x + residual (same index read, then written)
      const T* res = resb + r * N;
      T* h = hb + r * N;
      elementwise(N, h, false, [&](int64_t j, auto w) { return loadw(x + j, w) + loadw(res + j, w); });
      x = h;
    }
    // 1) stats
    double mean = 0.0, var = 0.0;
    if constexpr (kCenter && kShiftedStats<T>) {
      const Moments<double> m = shifted_moments(x, N);
      mean = m.mean;
      var = m.m2 * inv_n;
    } else if constexpr (kCenter) {
      mean = lane_sum(N, [&](int64_t j, auto w) { return widen(loadw(x + j, w)); }) * inv_n;
      var = lane_sum(N, [&](int64_t j, auto w) {
              const auto d = widen(loadw(x + j, w)) - mean;
              return d * d;
            }) * inv_n;
    } else {
      var = lane_sum(N, [&](int64_t j, auto w) {
              const auto v = widen(loadw(x + j, w));
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
// dbias rows are pdw, pdb (N doubles each, zeroed by the caller). Rows are processed in groups
// of kRowGroup so that each partial is loaded and stored once per group rather than per row;
// within a group the rows are still added in row order, so the sums do not change.
constexpr int64_t kRowGroup = 4;

// The backward's dx pass takes two blocks of 8 floats (one cache line) of each row in turn when
// dx is streamed, so that a streamed line is written by two consecutive stores: one block of
// each of the group's rows in turn left four lines half written at a time. LayerNorm float32
// backward, AMD EPYC (Zen 4), 2026-12-07, ms, interleaved processes, (8192, 1024) | (4096, 4096),
// 1 thread: AVX2 13.7-14.3 -> 9.4-10.0 | 29.3-30.3 -> 20.0-21.9, AVX-512 11.9-12.5 -> 8.5-9.0 |
// 25.9-27.4 -> 17.8-18.6, baseline 15.4-15.6 -> 12.2-12.5 | 30.9-31.1 -> 24.3-25.1; 2 threads:
// AVX2 8.0 -> 6.3 | 15.7 -> 13.5, AVX-512 7.0 -> 5.4 | 15.1 -> 10.8 (unstreamed dx, for
// comparison: AVX2 11.0, AVX-512 9.4 on (8192, 1024)). Rows not streamed (in cache) keep one block
// at a time: (512, 768) was 2-4 % slower with two. Same bits (the same operations; each column's
// rows still added in order).
template <class T> constexpr bool kLineBlocks = sizeof(T) == 4;

template <class T, bool kCenter, bool kHasWeight>
void row_backward_rows(const RowBackwardParams<T>& p, int64_t r0, int64_t r1, double* pdw,
                       double* pdb, bool stream) {
  using C = compute_t<T>;
  const int64_t N = p.N;
  const double inv_n = 1.0 / static_cast<double>(N);
  // Streaming stores need every row of a group to start at the same cache-line phase.
  stream = stream && (N * static_cast<int64_t>(sizeof(T))) % 64 == 0;
  const bool ahead_rows = N * static_cast<int64_t>(sizeof(T)) >= kPrefetchRowBytes;
  // The dx loop reads locals only: values reached through p would be reloaded after every
  // store (a vector store may alias anything). LayerNorm (512, 768) float32 backward, 1 thread,
  // AMD EPYC (Zen 4), 2026-12-07, three interleaved pairs of processes (a noisy VM): AVX2
  // 0.25-0.37 -> 0.26-0.30 ms, AVX-512 0.24-0.25 -> 0.18-0.22 ms. Same bits.
  const T* const xb = p.x;
  const T* const dyb = p.dy;
  T* const dxb = p.dx;
  const acc_t<T>* const wb = p.weight;
  for (int64_t g0 = r0; g0 < r1; g0 += kRowGroup) {
    const int64_t rows = std::min(kRowGroup, r1 - g0);
    GroupStats<C> st[kRowGroup];
    C c1[kRowGroup], c2[kRowGroup];
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t r = g0 + k;
      const T* x = p.x + r * N;
      const T* dy = p.dy + r * N;
      const double mean = kCenter ? static_cast<double>(p.mean[r]) : 0.0;
      st[k] = make_group_stats<C>(mean, static_cast<double>(p.rstd[r]));
      // c1 = sum(g * xhat) / N = rstd * (sum(g * (x - hi)) - lo * sum(g)) / N, the sums in
      // double (x - hi is exact in float for x near the mean; no per-element xhat needed), and
      // c2 = sum(g) / N
      double sum_gx = 0.0, sum_g = 0.0;
      const C hi = st[k].mean_hi;
      lane_sum2(N, sum_gx, sum_g, [&](int64_t j, auto w) {
        const auto g = widen(loadw(dy + j, w) * param<kHasWeight>(p.weight, j, w, C(1)));
        return two(g * widen(loadw(x + j, w) - hi), g);
      });
      const double rstd = static_cast<double>(p.rstd[r]);
      const double lo = static_cast<double>(st[k].mean_lo);
      c1[k] = static_cast<C>(rstd * (sum_gx - lo * sum_g) * inv_n);
      c2[k] = kCenter ? static_cast<C>(sum_g * inv_n) : C(0);
    }
    // dx, and partial dweight, dbias (the group's rows are read once more, from cache)
    const Lines lines = stream_lines(dxb + g0 * N, N, stream);
    // the next group's rows of x and dy prefetched meanwhile (kPrefetchRowBytes)
    const int64_t ahead = ahead_rows ? std::min(kRowGroup, r1 - (g0 + rows)) : 0;
    bool_switch(ahead > 0, [&](auto prefetch) {
      // kParts consecutive blocks from column j, each row's blocks in turn: with two blocks of
      // 8 floats a row's cache line is written by two consecutive stores (kLineBlocks)
      const auto columns = [&](int64_t j, auto w, auto parts) {
        constexpr int kParts = decltype(parts)::value;
        constexpr int64_t W = decltype(w)::value;
        using D = decltype(loadw(pdw + j, w));
        D dw[kParts], db[kParts];
        for (int q = 0; q < kParts; ++q) {
          dw[q] = loadw(pdw + j + q * W, w);
          db[q] = loadw(pdb + j + q * W, w);
        }
        for (int64_t k = 0; k < rows; ++k)
          for (int q = 0; q < kParts; ++q) {
            const int64_t jq = j + q * W;
            const int64_t off = (g0 + k) * N + jq;
            if constexpr (decltype(prefetch)::value) {
              if (k < ahead) {
                prefetch_line_once(xb + off + rows * N, w);
                prefetch_line_once(dyb + off + rows * N, w);
              }
            }
            const auto d = loadw(dyb + off, w);
            const auto xh = xhat_of(loadw(xb + off, w), st[k]);
            dw[q] += widen(d) * widen(xh);
            db[q] += widen(d);
            put(dxb + off, input_grad(d * param<kHasWeight>(wb, jq, w, C(1)), xh, st[k].rstd, c1[k], c2[k]),
                w, jq < lines.end);
          }
        for (int q = 0; q < kParts; ++q) {
          storew(pdw + j + q * W, dw[q], w);
          storew(pdb + j + q * W, db[q], w);
        }
      };
      int64_t j = 0;
      for (; j < lines.head && j < N; ++j) columns(j, Width<1>{}, std::integral_constant<int, 1>{});
#if defined(NK_HAVE_VECTOR_EXT)
      if (kLineBlocks<T> && lines.end > lines.head)  // streamed lines only (kLineBlocks)
        for (; j + 2 * kBlock <= N; j += 2 * kBlock)
          columns(j, Width<8>{}, std::integral_constant<int, 2>{});
      for (; j + kBlock <= N; j += kBlock) columns(j, Width<8>{}, std::integral_constant<int, 1>{});
#endif
      for (; j < N; ++j) columns(j, Width<1>{}, std::integral_constant<int, 1>{});
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
  bool_switch(p.mean != nullptr, [&](auto center) {
    bool_switch(p.weight != nullptr, [&](auto has_w) {
      parallel_for(n_chunks, grain_for(kRowsPerChunk * N), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          double* pdw = partial.data() + c * stride;
          const int64_t r0 = first + c * kRowsPerChunk, r1 = std::min(M, r0 + kRowsPerChunk);
          row_backward_rows<T, decltype(center)::value, decltype(has_w)::value>(
              p, r0, r1, pdw, pdw + N + 16, stream);
        }
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

// normkit CPU: channel norms — BatchNorm, GroupNorm (and InstanceNorm, GroupNorm with G = C).
//
// View: every layout and op is reduced to x[s][o][c][i] (core/channel_view.h, the index map the
// CUDA kernels share):
//                     channels-first (B, C, S)      channels-last (B, S, C)
//   BatchNorm         samples 1, O = B, I = S       samples 1, O = B * S, I = 1
//   GroupNorm         samples B, O = 1, I = S       samples B, O = S,     I = 1
// A statistic group is (s, g): n = O * D * I elements. Statistics (s, g) are written at s * G + g.
//
// Two traversals of that one view, chosen from the shape alone (never from the thread count):
//   planes (I >= kMinPlane, rows too wide for kMinRowsPerChunk rows per chunk, or GroupNorm
//     blocks of fewer rows than that, such as channels-first GroupNorm's one row): threads own
//     groups; a group that fits in cache (kTwoPassElements) gets two exact passes (mean, then
//     squared deviations), a larger one is reduced in pieces of at most kPiece elements merged
//     with Chan's formula; then the group is normalized right away, while still in cache.
//   sample planes (BatchNorm whose planes are planes-eligible but shorter than kSamplePlane):
//     threads own rows o and walk memory in order, shifted sums per plane (o, c), added per
//     channel in row order over pieces of up to kShiftPiece elements that share a shift, the
//     pieces merged with Chan's formula (double: two-pass moments per plane, merged); a second
//     sweep normalizes (x is read twice, but sequentially, instead of in scattered pieces too
//     small for the prefetchers).
//   rows   (otherwise): each block is a matrix (O, C * I); threads own fixed chunks of rows
//     and keep per-column partials, merged per column in chunk order, then per group.
// Forward: 1) stats in double — one pass of shifted sums for float/half/bfloat16, two passes for
// double (kShiftedStats, cpu/lanes.h); pieces merged with Chan's formula (core/welford.h).
// 2) normalize + affine (core/norm_math.h). 3) write y, mean, rstd; running statistics updated
// with unbiased variances. A group is fully reduced before any of its y is written, so y may
// be x (in place). With y null the kernel stops after the statistics (normkit.sklearn's fit
// takes each group's moments in double: params.h, group_mean64).
// Backward: per (s, c) sums S1 = sum(dy * xhat), S2 = sum(dy); dweight = sum_s S1, dbias = sum_s S2;
// per group c1 = sum_c w_c S1 / n, c2 = sum_c w_c S2 / n; dx = rstd * (w dy - c2 - xhat c1);
// training=False: statistics are constants, c1 = c2 = 0.
#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

#include "core/channel_view.h"
#include "core/norm_math.h"
#include "core/welford.h"
#include "cpu/kernels.h"
#include "cpu/lanes.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

#ifndef NK_ISA_NS
#define NK_ISA_NS isa_baseline
#endif

namespace nk::cpu::NK_ISA_NS {

namespace {

constexpr int64_t kMinPlane = 64;          // planes shorter than this use the row traversal
constexpr int64_t kMinRowsPerChunk = 16;   // ... unless a chunk would hold fewer rows than this
constexpr int64_t kSamplePlane = 1024;    // shorter BatchNorm planes: sample-major order
constexpr int64_t kTwoPassElements = int64_t{1} << 18;  // groups up to this size: plain two-pass
constexpr int64_t kPiece = 4096;           // elements per two-pass piece in the plane traversal
constexpr int64_t kChunkElements = 65536;  // elements per row chunk in the row traversal
constexpr int64_t kStreamBytes = int64_t{8} << 20;  // outputs this large use streaming stores
// Rows of at least kPrefetchRowBytes (cpu/simd.h) have the rows ahead prefetched in the row
// traversal's apply and dx passes (the row after next): each row starts on a new page, where the
// hardware prefetchers start cold. The statistics passes prefetch the next-but-one block of
// kRowBlock rows from kPrefetchSumRowBytes (512) on: see column_sums.
// BatchNorm1d (4096, 1024) float32, 1 thread, AMD EPYC (Zen 4), 2026-12-07, ms, three or six
// interleaved pairs of processes (a noisy VM): forward AVX2 2.3-3.5 -> 1.8-2.2, AVX-512
// 2.1-2.8 -> 1.7-2.1, baseline 3.7-5.7 -> 3.3-4.8 (evaluation, the apply pass alone: AVX2
// 1.1-1.8 -> 0.8-1.2); backward AVX2 4.8-5.6 -> 3.6-4.1, AVX-512 4.6-5.8 -> 3.6-4.3, baseline
// 5.9-6.2 -> 4.5-5.3; 2 threads, forward AVX2 1.5-1.9 -> 1.25-1.5. The rows after the next
// block (or row) and the next alone gave about the same. Masked BatchNorm1d (4096, 1024), 80 %
// kept (its statistics pass prefetched too), masked / unmasked forward: AVX-512 1.06-1.11,
// AVX2 1.30-1.32. Same bits (prefetches only).

// The index map of core/channel_view.h, plus the row traversal's chunking.
struct View : ChannelView {
  int64_t rows_per_chunk() const {  // at most kShiftPiece: a chunk's column is a shifted piece
    return std::clamp<int64_t>(kChunkElements / std::max<int64_t>(1, cols()), 1, kShiftPiece);
  }
  int64_t chunks() const { return (O + rows_per_chunk() - 1) / rows_per_chunk(); }
  int64_t chunk_rows(int64_t k) const {
    return std::min(O, (k + 1) * rows_per_chunk()) - k * rows_per_chunk();
  }
};

template <class P> View view_of(const P& p) {
  View v;
  static_cast<ChannelView&>(v) = channel_view_of(p);
  return v;
}

inline size_t at(int64_t i) { return static_cast<size_t>(i); }

bool use_planes(const View& v);  // the traversal choices, defined with their measurements below
bool use_sample_planes(const View& v);

// The forward's output act(xhat * w + b), and the backward's g = dy * act'(z) (dy itself
// without an activation): core/activation.h on blocks or scalars of the compute type C.
template <int kAct, class C, class V, class W, class B> NK_INLINE V output_of(V xh, W w, B b) {
  return activate<kAct, BlockOps, C>(affine(xh, w, b));
}
template <int kAct, class C, class V, class W, class B>
NK_INLINE V grad_of(V dy, [[maybe_unused]] V xh, [[maybe_unused]] W w, [[maybe_unused]] B b) {
  if constexpr (kAct == kActNone)
    return dy;
  else
    return activation_grad<kAct, BlockOps, C>(dy, affine(xh, w, b));
}
// grad_of widened to double for the sums, dy read at dyp: without an activation g = dy is
// converted straight from memory (load_wide, cpu/simd.h; the same values, one shuffle fewer).
// Backward float32, 1 thread, AMD EPYC (Zen 4), 2026-12-08, ms, interleaved processes, AVX2:
// BatchNorm (32, 64, 56, 56) 5.2-5.3 -> 4.6-5.0, channels-last 5.3-5.5 -> 4.9; BatchNorm1d and
// GroupNorm within noise (as everything on AVX-512 and SSE2). Same bits.
template <int kAct, class C, class T, class V, class W, class B, class Wd>
NK_INLINE auto wide_grad_of(const T* dyp, [[maybe_unused]] V xh, [[maybe_unused]] W w,
                            [[maybe_unused]] B b, Wd width) {
  if constexpr (kAct == kActNone)
    return load_wide(dyp, width);
  else
    return widen(grad_of<kAct, C>(loadw(dyp, width), xh, w, b));
}

// Column sums over the rows [r0, r1) of a chunk: for every column j in [0, cols),
//   a[j] += f(r, j).first,  b[j] += f(r, j).second,  rows added in order,
// where f(r, j, width) gives a pair of double values or 8-double blocks (columns j .. j+7), and
// ahead(r, j, width), called on the wide path's rows 2 * kRowBlock ahead (r may be >= r1), may
// prefetch them (kPrefetchSumRowBytes).
// Narrow rows (kRegisterCols columns or fewer, as channels-last BatchNorm's) are summed a block
// of 32 columns at a time with the sums held in registers down the rows; wider rows a row at a
// time with the sums in memory (walking down 32 columns of rows that far apart would defeat the
// prefetchers). Both orders add the same terms in the same order: the same bits. (On AVX2 and
// SSE2 the 32 columns' sums do not all fit the registers; blocks of 16 / 8 columns that do were
// slower, 2026-12-07, Xeon: channels-last BatchNorm (32, 56, 56, 64) forward AVX2 6.5 -> 7.8 ms,
// backward baseline 13.7 -> 16.7 ms, since each block walks the chunk's rows again.)
// kRegisterCols was 256 until 2026-12-08: from 65 to 256 columns the register path walked each
// chunk's rows once per 32 columns with a row's length as stride, and the statistics of
// BatchNorm1d with 128-512 features ran at a third of the speed of 1024 features. Those rows now
// take the row-at-a-time path, whose statistics passes (forward, masked forward, backward sums)
// prefetch the rows 2 * kRowBlock ahead from kPrefetchSumRowBytes on (was kPrefetchRowBytes, a
// page). Float32, 1 thread, AMD EPYC (Zen 4), ms, old build against new, interleaved processes,
// AVX2 | AVX-512 | SSE2: BatchNorm1d training forward (32768, 256) 7.1-8.0 -> 3.6-3.7 | 6.1-6.5
// -> 3.2-3.9 | 15.8 -> 9.2 (PyTorch 5.2-5.7); (65536, 128) 5.7 -> 3.9-4.0 | 5.3-5.6 -> 3.5-3.9 |
// 14.9 -> 7.5; (8192, 512) 2.3-2.6 -> 1.6-1.7 | 2.1 -> 1.5-1.8 | 4.0 -> 3.5; masked forward
// (32768, 256) 8.7 -> 5.1 | 6.9 -> 4.4. 64 columns and fewer (channels-last BatchNorm)
// unchanged. Same bits (both paths add the same terms in the same order). The backward sums'
// prefetch was missing from the float build altogether (row_grad_sums, prefetch_line); with it
// and the two changes above, BatchNorm1d backward (4096, 1024) 4.3 -> 3.6-3.8 | 3.5-3.7 ->
// 3.3-3.5, (8192, 512) 4.7 -> 3.2 | 4.2-4.4 -> 3.1-3.3, (32768, 256) 13.8-14.1 -> 9.4-10.7 |
// 15.5 -> 6.5-7.9, (65536, 128) 9.7 -> 6.4-6.7 | 8.6-8.8 -> 6.1-6.7, (100000, 96) 10-11.8 ->
// 9.0-9.3 | 9.0-9.9 -> 8.0-9.2.
constexpr int64_t kRegisterCols = 64;
constexpr int64_t kPrefetchSumRowBytes = 512;
constexpr int kRowBlock = 4;

struct NoPrefetch {
  template <class W> void operator()(int64_t, int64_t, W) const {}
};

template <class F, class Pf = NoPrefetch>
void column_sums(int64_t r0, int64_t r1, int64_t cols, double* a, double* b, F&& f,
                 Pf&& ahead = Pf{}) {
  int64_t j0 = 0;
#if defined(NK_HAVE_VECTOR_EXT)
  if (cols <= kRegisterCols)
    for (; j0 + 32 <= cols; j0 += 32) {
      d8 sa[4], sb[4];
      for (int q = 0; q < 4; ++q) {
        sa[q] = loadw(a + j0 + 8 * q, Width<8>{});
        sb[q] = loadw(b + j0 + 8 * q, Width<8>{});
      }
      for (int64_t r = r0; r < r1; ++r)
        for (int q = 0; q < 4; ++q) {
          const auto v = f(r, j0 + 8 * q, Width<8>{});
          sa[q] += v.first;
          sb[q] += v.second;
        }
      for (int q = 0; q < 4; ++q) {
        storew(a + j0 + 8 * q, sa[q], Width<8>{});
        storew(b + j0 + 8 * q, sb[q], Width<8>{});
      }
    }
#endif
  // Wider rows: kRowBlock rows at a time, so each block of sums is loaded and stored once per
  // kRowBlock rows instead of once per row (the rows are still added in order: the same bits).
  // BatchNorm1d (4096, 1024) float32 forward / backward, 1 thread, Xeon, 2026-12-07: forced AVX2
  // 3.6 / 5.2 ms one row at a time, 3.0 / 4.5 ms four rows, no better with eight; AVX-512
  // 3.4 / 4.5 -> 2.6 / 4.0 ms; baseline 4.5 / 6.8 -> 4.0 / 5.9 ms.
  int64_t r = r0;
  for (; r + kRowBlock <= r1; r += kRowBlock)
    for_blocks(cols - j0, [&](int64_t jj, auto w) {
      double* pa = a + j0 + jj;
      double* pb = b + j0 + jj;
      auto sa = loadw(pa, w);
      auto sb = loadw(pb, w);
      for (int q = 0; q < kRowBlock; ++q) {
        ahead(r + 2 * kRowBlock + q, j0 + jj, w);
        const auto v = f(r + q, j0 + jj, w);
        sa += v.first;
        sb += v.second;
      }
      storew(pa, sa, w);
      storew(pb, sb, w);
    });
  for (; r < r1; ++r)
    for_blocks(cols - j0, [&](int64_t jj, auto w) {
      const auto v = f(r, j0 + jj, w);
      add_to(a + j0 + jj, v.first);
      add_to(b + j0 + jj, v.second);
    });
}

// Statistics per column, as separate arrays so the column loops vectorize.
template <class C> struct ColumnStats {
  std::vector<C> hi, lo, rstd;
  explicit ColumnStats(int64_t n) : hi(at(n)), lo(at(n)), rstd(at(n)) {}
  void fill(int64_t j0, int64_t j1, const GroupStats<C>& st) {
    for (int64_t j = j0; j < j1; ++j) {
      hi[at(j)] = st.mean_hi;
      lo[at(j)] = st.mean_lo;
      rstd[at(j)] = st.rstd;
    }
  }
};

// Moments of a contiguous piece: shifted sums for float/half/bfloat16 (cpu/lanes.h), two
// passes for double.
template <class T> Moments<double> piece_moments(const T* x, int64_t len) {
  if constexpr (kShiftedStats<T>) return shifted_moments(x, len);
  const double mean = lane_sum(len, [&](int64_t i, auto w) { return load_wide(x + i, w); }) /
                      static_cast<double>(len);
  const double m2 = lane_sum(len, [&](int64_t i, auto w) {
    const auto d = load_wide(x + i, w) - mean;
    return d * d;
  });
  return moments_from_two_pass(len, mean, m2);
}

// Statistics of group t (= s * G + g): from its moments (training) or from the running
// statistics (evaluation; only without per_sample, so t is the channel). Writes mean, rstd.
template <class T>
void group_mean_var(const ChannelForwardParams<T>& p, int64_t t, const Moments<double>& m,
                    double& mean, double& var) {
  if (p.training) {
    mean = m.mean;
    var = population_var(m);
  } else {
    mean = static_cast<double>(p.running_mean[t * p.running_mean_stride]);
    var = static_cast<double>(p.running_var[t * p.running_var_stride]);
  }
}

template <class T>
GroupStats<compute_t<T>> write_group(const ChannelForwardParams<T>& p, int64_t t, double mean,
                                     double rstd) {
  p.mean[t] = static_cast<acc_t<T>>(mean);
  p.rstd[t] = static_cast<acc_t<T>>(rstd);
  return make_group_stats<compute_t<T>>(mean, rstd);
}

template <class T>
GroupStats<compute_t<T>> finish_group(const ChannelForwardParams<T>& p, int64_t t,
                                      const Moments<double>& m) {
  double mean, var;
  group_mean_var(p, t, m, mean, var);
  return write_group(p, t, mean, rstd_from_var(var, p.eps));
}

// finish_group for every group t < gm.size(), with the square roots and divisions in one
// vectorizable loop (with many small groups they would otherwise dominate small calls).
template <class T>
std::vector<GroupStats<compute_t<T>>> finish_groups(const ChannelForwardParams<T>& p,
                                                    const std::vector<Moments<double>>& gm) {
  const int64_t n = static_cast<int64_t>(gm.size());
  std::vector<double> mean(at(n)), rstd(at(n));
  if (p.training) {  // plain loops over arrays, so the divisions and roots vectorize
    std::vector<double> m2(at(n)), count(at(n));
    for (int64_t t = 0; t < n; ++t) {
      mean[at(t)] = gm[at(t)].mean;
      m2[at(t)] = gm[at(t)].m2;
      count[at(t)] = gm[at(t)].count > 0 ? static_cast<double>(gm[at(t)].count) : 1.0;
    }
    for (int64_t t = 0; t < n; ++t) rstd[at(t)] = m2[at(t)] / count[at(t)];  // population var
  } else {
    for (int64_t t = 0; t < n; ++t) group_mean_var(p, t, gm[at(t)], mean[at(t)], rstd[at(t)]);
  }
  for (int64_t t = 0; t < n; ++t) rstd[at(t)] = rstd_from_var(rstd[at(t)], p.eps);
  std::vector<GroupStats<compute_t<T>>> st(at(n));
  for (int64_t t = 0; t < n; ++t) st[at(t)] = write_group(p, t, mean[at(t)], rstd[at(t)]);
  return st;
}

// Running statistics after a training forward. BatchNorm: the channel's batch moments.
// InstanceNorm (per_sample, D = 1): averages over the batch of per-sample means and unbiased
// variances, added in sample order.
template <class T>
void update_running(const ChannelForwardParams<T>& p, const View& v,
                    const std::vector<Moments<double>>& gm) {
  using A = acc_t<T>;
  if (!p.training || !p.running_mean) return;
  for (int64_t c = 0; c < v.C; ++c) {
    double mean = 0.0, var = 0.0;
    for (int64_t s = 0; s < v.samples; ++s) {
      mean += gm[at(s * v.G + c)].mean;
      var += unbiased_var(gm[at(s * v.G + c)]);
    }
    mean /= static_cast<double>(v.samples);
    var /= static_cast<double>(v.samples);
    A& rm = p.running_mean[c * p.running_mean_stride];
    A& rv = p.running_var[c * p.running_var_stride];
    rm = running_update(rm, mean, p.momentum);
    rv = running_update(rv, var, p.momentum);
  }
}

// The optional double-precision group moments (p.group_mean64, p.group_m2_64).
template <class T>
void export_moments(const ChannelForwardParams<T>& p, const std::vector<Moments<double>>& gm) {
  if (!p.training || !p.group_mean64) return;
  for (size_t t = 0; t < gm.size(); ++t) {
    p.group_mean64[t] = gm[t].mean;
    p.group_m2_64[t] = gm[t].m2;
  }
}

// Moments of group (s, g) in the plane traversal: exact two passes over a group that fits in
// cache (shifted sums per plane for float/half/bfloat16), else pieces of at most kPiece
// elements merged with Chan's formula. Zero moments in evaluation mode (not needed).
template <class T> Moments<double> plane_group_moments(const ChannelForwardParams<T>& p, const View& v,
                                                       int64_t s, int64_t g) {
  Moments<double> m;
  if (p.training && v.group_size() <= kTwoPassElements && kShiftedStats<T>) {
    // shifted sums per plane (in pieces of at most kShiftPiece), merged in plane order
    for (int64_t o = 0; o < v.O; ++o)
      for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c)
        welford_merge(m, shifted_moments(p.x + v.offset(s, o, c), v.I));
  } else if (p.training && v.group_size() <= kTwoPassElements) {
    // two passes over the whole group; plane sums added in plane order
    const auto over_planes = [&](auto&& term) {
      double total = 0.0;
      for (int64_t o = 0; o < v.O; ++o)
        for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c) {
          const T* plane = p.x + v.offset(s, o, c);
          total += lane_sum(v.I, [&](int64_t i, auto w) { return term(loadw(plane + i, w)); });
        }
      return total;
    };
    const double mean =
        over_planes([](auto xv) { return widen(xv); }) / static_cast<double>(v.group_size());
    const double m2 = over_planes([&](auto xv) {
      const auto d = widen(xv) - mean;
      return d * d;
    });
    m = moments_from_two_pass(v.group_size(), mean, m2);
  } else if (p.training) {
    for (int64_t o = 0; o < v.O; ++o)
      for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c) {
        const T* plane = p.x + v.offset(s, o, c);
        for (int64_t i = 0; i < v.I; i += kPiece)
          welford_merge(m, piece_moments(plane + i, std::min(kPiece, v.I - i)));
      }
  }
  return m;
}

// Normalize + affine (+ activation) and write y for plane (s, o, c) with its group's statistics:
// the apply step of every plane-wise traversal (planes, sample planes, weighted). ahead: a plane
// of I elements to prefetch meanwhile, one cache line per line written (plane_group_apply).
template <class T, bool kHasWeight, bool kHasBias, int kAct>
NK_INLINE void apply_plane(const ChannelForwardParams<T>& p, const View& v, int64_t s, int64_t o,
                           int64_t c, const GroupStats<compute_t<T>>& group, bool stream,
                           const T* ahead = nullptr) {
  using C = compute_t<T>;
  const C w = kHasWeight ? static_cast<C>(p.weight[c]) : C(1);
  const C b = kHasBias ? static_cast<C>(p.bias[c]) : C(0);
  const GroupStats<C> st = group;  // a local copy: in registers across the stores to y
  const T* xp = p.x + v.offset(s, o, c);
  const auto f = [&](int64_t i, auto width) {
    prefetch_line_once(ahead ? ahead + i : nullptr, width);
    return output_of<kAct, C>(xhat_of(loadw(xp + i, width), st), w, b);
  };
  if constexpr (kAct == kActSilu)  // arithmetic-bound: 16 floats a block on AVX-512
    elementwise_wide(v.I, p.y + v.offset(s, o, c), stream, f);
  else
    elementwise(v.I, p.y + v.offset(s, o, c), stream, f);
}

// The apply step for the planes of group (s, g). next_t >= 0: the group the thread reduces next;
// while a plane is applied, the matching plane of that group is prefetched (into L2), one line
// per line of output (apply_plane's `ahead`), so that its statistics pass finds it in cache
// instead of waiting on memory. Whether this pays depends on where x is. Float32 forward,
// median ms, interleaved processes, 2026-12-07:
// - the VM of an earlier session (Xeon, x evidently from memory: the no-prefetch times were
//   1.6x today's): a burst of prefetches before each plane took GroupNorm (32, 256, 28, 28)
//   1 thread AVX-512 4.6 -> 3.8, AVX2 4.2 -> 3.3, BatchNorm (32, 64, 56, 56) AVX2 4.4 -> 3.3.
// - the VM of this session (Xeon, 2 MiB L2, 480 MiB L3), AVX-512, 1 / 2 threads, BatchNorm
//   (32, 64, 56, 56) | GroupNorm: x in L3 (the benchmark's 2 ms pause): no prefetch 2.5-2.7 /
//   1.3-1.5 | 2.4-2.9 / 1.3-1.4, the burst 3.2-3.4 / 1.6-1.8 | 3.1-3.3 / 1.6-1.8, spread as now
//   2.8-2.9 / 1.4-1.6 | 2.7-3.0 / 1.4-1.6; x from DRAM (1 GiB touched between calls): no
//   prefetch 5.7-6.4 / 3.2-3.5 | 5.7-7.3 / 3.5-4.1, the burst 5.1-6.1 / 3.0-3.5 | 4.9-5.9 /
//   2.9-3.3, spread 4.8-5.5 / 2.7-3.1 | 4.8-5.3 / 2.9-3.5. Forced AVX2, x in L3: spread within
//   3 % of no prefetch. Prefetching every 4th line instead lost the DRAM gain and kept the L3
//   cost. So the spread prefetch: up to ~20 % faster from DRAM, up to ~10 % slower from L3.
// Doing the same with x and dy in the backward was slower (first Xeon, AVX-512: GroupNorm
// (32, 256, 28, 28) 1 thread 5.4-5.9 against 4.9-5.1 ms, 2 threads 2.8 against 2.1-2.2 ms;
// (8, 512, 64, 64) 20-21 against 18 ms): it is not done there.
template <class T, bool kHasWeight, bool kHasBias, int kAct>
void plane_group_apply(const ChannelForwardParams<T>& p, const View& v, int64_t s, int64_t g,
                       const GroupStats<compute_t<T>>& st, bool stream, int64_t next_t = -1) {
  const int64_t ns = next_t / std::max<int64_t>(1, v.G), nc0 = (next_t % std::max<int64_t>(1, v.G)) * v.D;
  for (int64_t o = 0; o < v.O; ++o)
    for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c) {
      const T* ahead = next_t >= 0 ? p.x + v.offset(ns, o, nc0 + c - g * v.D) : nullptr;
      apply_plane<T, kHasWeight, kHasBias, kAct>(p, v, s, o, c, st, stream, ahead);
    }
}

// Forward, plane traversal: threads own groups. Each group is normalized right after its
// statistics, while it is still in cache (x read once from memory), with the next group's planes
// prefetched meanwhile (plane_group_apply). That holds for SiLU too, whose apply step is bound by
// arithmetic (exp and a division per element, 16 floats a block on AVX-512): GroupNorm
// (32, 256, 28, 28) + SiLU, float32, Xeon, 2026-12-07, x cold / hot, ms: AVX-512 1 thread
// 6.7-6.8 / 6.0 fused against 8.1 / 7.2 with all statistics first and the apply a second sweep
// over x, 2 threads 3.7 / 3.2 against 4.4 / 3.2; AVX2 1 thread 8.7-8.9 / 8.0-8.3 against
// 11.2 / 9.4, 2 threads 4.6-4.7 against 6.1. (The second sweep was faster when the apply ran
// 8 floats a block with 16-byte streaming stores; see stream_block.) ReLU: fused 3.7-4.2 ms
// against 5.0-7.0 in two sweeps, 1 thread.
template <class T, bool kHasWeight, bool kHasBias, int kAct>
void forward_planes(const ChannelForwardParams<T>& p, const View& v) {
  using C = compute_t<T>;
  const int64_t tasks = v.samples * v.G;
  std::vector<Moments<double>> gm(at(tasks));
  const bool stream = p.B * p.C * p.S * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  // Assumptions: I >= 1; each thread owns whole groups, so nothing is shared while it runs.
  parallel_for(tasks, grain_for(v.group_size()), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      gm[at(t)] = plane_group_moments(p, v, t / v.G, t % v.G);
      const GroupStats<C> st = finish_group(p, t, gm[at(t)]);
      const int64_t next = t + 1 < t1 && p.training && v.group_size() <= kTwoPassElements ? t + 1 : -1;
      if (p.y) plane_group_apply<T, kHasWeight, kHasBias, kAct>(p, v, t / v.G, t % v.G, st, stream, next);
    }
    if (stream) stream_fence();
  });
  update_running(p, v, gm);
  export_moments(p, gm);
}

// Row traversal, step 1: per-column (mean, M2) of each (sample, chunk of rows), laid out
// [s][k][cols means | cols M2s]: one pass of shifted sums over the chunk (float/half/bfloat16),
// the shift each column's value in the chunk's first row (an element of the chunk, as the error
// bound in cpu/lanes.h needs), or two passes (double).
#if defined(__AVX__)
constexpr bool kSseOnly = false;
#else
constexpr bool kSseOnly = true;
#endif

template <class T> std::vector<double> chunk_moments(const ChannelForwardParams<T>& p, const View& v) {
  const int64_t cols = v.cols(), rpc = v.rows_per_chunk(), n_chunks = v.chunks();
  const int64_t tasks = v.samples * n_chunks;
  std::vector<double> partial(at(tasks * 2 * cols), 0.0);
  parallel_for(tasks, grain_for(std::min(v.O, rpc) * cols), [&](int64_t t0, int64_t t1) {
    std::vector<double> shift(kShiftedStats<T> && !kSseOnly ? at(cols) : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / n_chunks, k = t % n_chunks;
      const int64_t r0 = k * rpc, r1 = r0 + v.chunk_rows(k);
      double* mean = partial.data() + t * 2 * cols;
      double* m2 = mean + cols;
      if constexpr (kShiftedStats<T>) {
        // locals only in the loop (the sums' vector stores may alias anything reached otherwise)
        const int64_t n = cols;
        const T* const xs = p.x + v.offset(s, 0, 0);
        const T* const x0 = xs + r0 * n;
        // The shifts (the chunk's first row) widened once into `shift` rather than converted
        // again for every row (where the sums fill the registers, GCC re-widened them from a
        // stack copy each row). Not on SSE2, where a double operand from memory is a separate
        // (unaligned) load while the conversion reads memory itself. Float32 forward, 1 thread,
        // AMD EPYC (Zen 4), 2026-12-07, ms, five interleaved pairs of processes (a noisy VM):
        // BatchNorm1d (4096, 1024) AVX-512 2.1-2.8 (median 2.3) -> 1.9-2.2 (1.9), AVX2 2.4-2.8
        // either way; channels-last BatchNorm (32, 56, 56, 64) within noise. (SSE2: BatchNorm1d
        // 3.6 -> 3.2-3.3, but the channels-last forward 4.4-4.6 -> 5.1-5.3, also when only
        // BatchNorm1d's shape took the new path.) Same bits.
        if constexpr (kSseOnly) {
          column_sums(r0, r1, n, mean, m2, [&](int64_t r, int64_t j, auto w) {
            const auto d = load_wide(xs + r * n + j, w) - load_wide(x0 + j, w);
            return two(d, d * d);
          });
        } else {
          double* const sh = shift.data();
          for_blocks(n, [&](int64_t j, auto w) { storew(sh + j, load_wide(x0 + j, w), w); });
          const int64_t o_end = v.O;
          const bool far = n * static_cast<int64_t>(sizeof(T)) >= kPrefetchSumRowBytes;
          bool_switch(far, [&](auto prefetch) {
            column_sums(
                r0, r1, n, mean, m2,
                [&](int64_t r, int64_t j, auto w) {
                  const auto d = load_wide(xs + r * n + j, w) - loadw(sh + j, w);
                  return two(d, d * d);
                },
                [xs, n, o_end](int64_t r, int64_t j, auto w) {  // by value: no reloads after stores
                  if constexpr (decltype(prefetch)::value)
                    if (r < o_end) prefetch_line_once(xs + r * n + j, w);
                });
          });
        }
        const double inv_n = 1.0 / static_cast<double>(r1 - r0);
        for (int64_t j = 0; j < cols; ++j) {
          const auto mm = shifted_mean_m2_inv(inv_n, load_wide(x0 + j, Width<1>{}), mean[j], m2[j]);
          mean[j] = mm.first;
          m2[j] = mm.second;
        }
        continue;
      }
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = p.x + v.offset(s, r, 0);
        for_blocks(cols, [&](int64_t j, auto w) { add_to(mean + j, load_wide(xr + j, w)); });
      }
      const double inv = 1.0 / static_cast<double>(r1 - r0);
      for (int64_t j = 0; j < cols; ++j) mean[j] *= inv;
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = p.x + v.offset(s, r, 0);
        for_blocks(cols, [&](int64_t j, auto w) {
          const auto d = load_wide(xr + j, w) - loadw(mean + j, w);
          add_to(m2 + j, d * d);
        });
      }
    }
  });
  return partial;
}

// Step 2: each (sample, column)'s chunks merged in chunk order into chunk 0's slot, all columns
// at once (the chunks' row counts are the same for every column).
inline void merge_chunks(const View& v, std::vector<double>& partial) {
  const int64_t cols = v.cols(), rpc = v.rows_per_chunk(), n_chunks = v.chunks();
  for (int64_t s = 0; s < v.samples; ++s) {
    double* mean = partial.data() + s * n_chunks * 2 * cols;
    double* m2 = mean + cols;
    for (int64_t k = 1; k < n_chunks; ++k) {
      const double na = static_cast<double>(k * rpc), nb = static_cast<double>(v.chunk_rows(k));
      const double wb = nb / (na + nb), na_wb = na * wb;
      const double* mb = partial.data() + (s * n_chunks + k) * 2 * cols;
      for_blocks(cols, [&](int64_t j, auto w) {
        auto ma = loadw(mean + j, w);
        auto sa = loadw(m2 + j, w);
        chan_merge(ma, sa, loadw(mb + j, w), loadw(mb + cols + j, w), wb, na_wb);
        storew(mean + j, ma, w);
        storew(m2 + j, sa, w);
      });
    }
  }
}

// Step 3: a group's k = D * I columns all hold O rows: mean = the average of their means, M2 =
// the sum of their M2 plus O times the squared deviations of their means (two short passes, no
// division per column; BatchNorm's groups are single columns and are taken as they are).
inline std::vector<Moments<double>> group_moments(const View& v, const std::vector<double>& partial) {
  const int64_t cols = v.cols(), n_chunks = v.chunks();
  std::vector<Moments<double>> gm(at(v.samples * v.G));
  for (int64_t t = 0; t < v.samples * v.G; ++t) {
    const int64_t s = t / v.G, g = t % v.G, k = v.D * v.I;
    const double* mean = partial.data() + s * n_chunks * 2 * cols + g * k;
    const double* m2 = mean + cols;
    if (k == 1) {
      gm[at(t)] = moments_from_two_pass(v.O, mean[0], m2[0]);
      continue;
    }
    double sum = 0.0;
    for (int64_t j = 0; j < k; ++j) sum += mean[j];
    const double gmean = sum / static_cast<double>(k);
    double dev = 0.0, within = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      const double d = mean[j] - gmean;
      dev += d * d;
      within += m2[j];
    }
    gm[at(t)] = moments_from_two_pass(v.O * k, gmean, within + static_cast<double>(v.O) * dev);
  }
  return gm;
}

// Each group's statistics copied to its columns, per (sample, column).
template <class C> ColumnStats<C> column_stats(const View& v, const std::vector<GroupStats<C>>& st) {
  const int64_t cols = v.cols(), k = v.D * v.I;
  ColumnStats<C> scol(v.samples * cols);
  for (int64_t t = 0; t < v.samples * v.G; ++t) {
    const int64_t s = t / v.G, g = t % v.G;
    scol.fill(s * cols + g * k, s * cols + (g + 1) * k, st[at(t)]);
  }
  return scol;
}

// A per-channel parameter spread over the columns j = c * I + i (`absent` where param is null).
template <class C, class A> std::vector<C> per_column(const View& v, const A* param, C absent) {
  std::vector<C> col(at(v.cols()));
  for (int64_t c = 0; c < v.C; ++c)
    for (int64_t j = c * v.I; j < (c + 1) * v.I; ++j)
      col[at(j)] = param ? static_cast<C>(param[c]) : absent;
  return col;
}

// Normalize + affine (+ activation) and write y, row by row with per-column statistics (the row
// traversal's apply step): st holds the statistics of every group (s * G + g). Each element
// needs five per-column values (mean hi/lo, rstd, weight, bias). Read through the captures
// they were reloaded after every store (a vector store may alias anything), with the row
// pointers; now locals, and for rows of up to kApplyGroupBytes loaded once per kApplyRows rows.
// (Wider rows grouped so were slower: four 4-KiB rows walked side by side, BatchNorm1d (4096,
// 1024) evaluation 1.4-1.6 -> 2.4-3.0 ms.) Evaluation forward, float32, 1 thread, AMD EPYC
// (Zen 4), 2026-12-07, interleaved processes: (8, 32, 32, 64) channels-last 0.12-0.16 ->
// 0.06-0.07 ms (np.copyto 0.045), (512, 1024) 0.12-0.18 -> 0.11; BENCH.md's (4096, 1024) and
// (32, 56, 56, 64) are memory-bound and unchanged within this VM's noise. Same bits.
constexpr int64_t kApplyRows = 4;
constexpr int64_t kApplyGroupBytes = 1024;
// kFlatApply: rows of up to kApplyGroupBytes whose y is large enough to stream are applied as
// one flat range per sample (the rows are contiguous), so that only the range's two ends are
// partial lines; row by row, rows that do not start on a line (NumPy aligns to 16 bytes) were
// either not streamed or streamed with partial lines at every row's ends. The per-column data
// are repeated past the row's end (kBlockMax more columns) for blocks that run into the next
// row. Channels-last BatchNorm (32, 56, 56, 64) float32 forward, 1 thread, AMD EPYC (Zen 4),
// 2026-12-07, ms, three interleaved pairs of processes: training AVX2 3.6-3.9 -> 2.8-3.5,
// AVX-512 3.4-3.8 -> 2.7-3.0; evaluation AVX2 2.0-2.2 -> 1.4-1.8, AVX-512 1.9-2.2 -> 1.6 (np.copyto
// of x 1.7-2.1). The same for the backward's dx showed no difference (5.0-5.7 either way); not
// done there. Same bits (the same formula per element).
constexpr int64_t kBlockMax = 16;
template <class T, bool kHasWeight, bool kHasBias, int kAct>
void apply_rows(const ChannelForwardParams<T>& p, const View& v,
                const std::vector<GroupStats<compute_t<T>>>& st) {
  using C = compute_t<T>;
  const int64_t cols = v.cols();
  const ColumnStats<C> scol = column_stats(v, st);
  const std::vector<C> wcol = per_column(v, kHasWeight ? p.weight : nullptr, C(1));
  const std::vector<C> bcol = per_column(v, kHasBias ? p.bias : nullptr, C(0));
  const bool stream = p.B * p.C * p.S * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  const C* const wc = wcol.data();
  const C* const bc = bcol.data();
  // Short rows of a large y: streamed as one flat range per sample (kFlatApply).
  const bool flat = stream && cols * static_cast<int64_t>(sizeof(T)) <= kApplyGroupBytes;
  const int64_t ext = cols + kBlockMax;  // per-column data repeated past the row's end
  std::vector<C> flat_cols(flat ? at((3 * v.samples + 2) * ext) : 0);
  if (flat) {
    C* const fc = flat_cols.data();
    for (int64_t j = 0; j < ext; ++j) {
      for (int64_t s = 0; s < v.samples; ++s) {
        fc[(3 * s) * ext + j] = scol.hi[at(s * cols + j % cols)];
        fc[(3 * s + 1) * ext + j] = scol.lo[at(s * cols + j % cols)];
        fc[(3 * s + 2) * ext + j] = scol.rstd[at(s * cols + j % cols)];
      }
      fc[(3 * v.samples) * ext + j] = wcol[at(j % cols)];
      fc[(3 * v.samples + 1) * ext + j] = bcol[at(j % cols)];
    }
  }
  if (flat) {
    parallel_for(v.samples * v.O, grain_for(cols), [&](int64_t r0, int64_t r1) {
      const int64_t n = cols, per_sample = v.O, e = ext;
      const T* const x = p.x;
      T* const y = p.y;
      const C* const fc = flat_cols.data();
      const C* const w1 = fc + 3 * v.samples * e;
      const C* const b1 = w1 + e;
      for (int64_t r = r0; r < r1;) {
        const int64_t s = r / per_sample, rend = std::min(r1, (s + 1) * per_sample);
        const C* const hi = fc + 3 * s * e;
        const C* const lo = hi + e;
        const C* const rs = lo + e;
        const T* const xr = x + r * n;
        int64_t base = 0;  // element j of the range is in column j - base (j only grows)
        elementwise((rend - r) * n, y + r * n, true, [&](int64_t j, auto w) {
          while (j - base >= n) base += n;
          const int64_t c = j - base;  // a block may run past the row: the repeated columns
          return output_of<kAct, C>(
              xhat_of(loadw(xr + j, w), loadw(hi + c, w), loadw(lo + c, w), loadw(rs + c, w)),
              loadw(w1 + c, w), loadw(b1 + c, w));
        });
        r = rend;
      }
      stream_fence();
    });
    return;
  }
  parallel_for(v.samples * v.O, grain_for(cols), [&](int64_t r0, int64_t r1) {
    // Everything the inner loops read is a local here: the vector stores may alias anything, and
    // values reached through the captures would be reloaded after every store.
    const int64_t n = cols, per_sample = v.O;
    const T* const x = p.x;
    T* const y = p.y;
    const C* const w1 = wc;
    const C* const b1 = bc;
    const C* const hi0 = scol.hi.data();
    const C* const lo0 = scol.lo.data();
    const C* const rs0 = scol.rstd.data();
    const bool short_rows = n * static_cast<int64_t>(sizeof(T)) <= kApplyGroupBytes;
    for (int64_t r = r0; r < r1;) {
      const int64_t s = r / per_sample;
      const C* const hi = hi0 + s * n;
      const C* const lo = lo0 + s * n;
      const C* const rs = rs0 + s * n;
      const T* const xr = x + r * n;
      T* const yr = y + r * n;
      const int64_t rows = short_rows ? std::min({kApplyRows, r1 - r, (s + 1) * per_sample - r}) : 1;
      const Lines lines = stream_lines(yr, n, stream);
      if (rows < 2 || (lines.end > lines.head && (n * static_cast<int64_t>(sizeof(T))) % 64 != 0)) {
        // one row; the next one prefetched meanwhile when rows are a page or more
        const T* const next = r + 2 < r1 && n * static_cast<int64_t>(sizeof(T)) >= kPrefetchRowBytes
                                  ? xr + 2 * n : nullptr;
        elementwise(n, yr, stream, [&](int64_t j, auto w) {
          prefetch_line_once(next ? next + j : nullptr, w);
          return output_of<kAct, C>(
              xhat_of(loadw(xr + j, w), loadw(hi + j, w), loadw(lo + j, w), loadw(rs + j, w)),
              loadw(w1 + j, w), loadw(b1 + j, w));
        });
        ++r;
        continue;
      }
      // `rows` short rows, each block of columns' statistics and parameters loaded once for all
      // of them; they share the first row's streamed lines (same line phase, or none streamed)
      for_blocks_from(n, lines.head, [&](int64_t j, auto w) {
        const auto h = loadw(hi + j, w), l = loadw(lo + j, w), d = loadw(rs + j, w);
        const auto a = loadw(w1 + j, w), b = loadw(b1 + j, w);
        for (int64_t k = 0; k < rows; ++k)
          put(yr + k * n + j, output_of<kAct, C>(xhat_of(loadw(xr + k * n + j, w), h, l, d), a, b),
              w, j < lines.end);
      });
      r += rows;
    }
    if (stream) stream_fence();
  });
}

// Forward, row traversal: statistics (steps 1-3), then normalize + affine and write y.
template <class T, bool kHasWeight, bool kHasBias, int kAct>
void forward_rows(const ChannelForwardParams<T>& p, const View& v) {
  std::vector<Moments<double>> gm;  // evaluation mode: zero moments (unused)
  if (p.training) {
    std::vector<double> partial = chunk_moments(p, v);
    merge_chunks(v, partial);
    gm = group_moments(v, partial);
  } else {
    gm.resize(at(v.samples * v.G));
  }
  const auto st = finish_groups(p, gm);
  update_running(p, v, gm);
  export_moments(p, gm);
  if (p.y) apply_rows<T, kHasWeight, kHasBias, kAct>(p, v, st);  // else statistics only
}

// Forward, sample-major plane traversal (BatchNorm with short planes: reading a channel's planes
// one by one would jump through memory in pieces too small for the prefetchers). Threads own
// rows o and walk memory in order; each plane (o, c) gives a two-pass piece, the pieces of a
// channel are merged in row order, and a second sweep normalizes. Assumptions: per_sample is
// false (one sample block), 1 <= I < kPiece in training, any I >= 1 in evaluation mode (no
// statistics; use_eval_sample_planes).
template <class T, bool kHasWeight, bool kHasBias, int kAct>
void forward_sample_planes(const ChannelForwardParams<T>& p, const View& v) {
  using C = compute_t<T>;
  // 1) stats
  std::vector<Moments<double>> gm(at(v.C));
  if (p.training && kShiftedStats<T>) {
    // shifted sums per plane; the planes of a channel form pieces of rows_per_piece rows (at
    // most kShiftPiece elements) that share a shift, the channel's first element in the piece;
    // pieces' sums are added in row order, and pieces merged in order with Chan's formula
    const int64_t rows_per_piece = std::max<int64_t>(1, kShiftPiece / v.I);
    const auto shift_of = [&](int64_t o, int64_t c) {
      return load_wide(p.x + v.offset(0, o / rows_per_piece * rows_per_piece, c), Width<1>{});
    };
    std::vector<double> sums(at(2 * v.O * v.C), 0.0);
    parallel_for(v.O, grain_for(v.C * v.I), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t c = 0; c < v.C; ++c) {
          double* sc = sums.data() + 2 * (o * v.C + c);
          add_shifted_sums(p.x + v.offset(0, o, c), v.I, shift_of(o, c), sc[0], sc[1]);
        }
    });
    for (int64_t c = 0; c < v.C; ++c)
      for (int64_t o0 = 0; o0 < v.O; o0 += rows_per_piece) {
        const int64_t o1 = std::min(v.O, o0 + rows_per_piece);
        double s1 = 0.0, s2 = 0.0;
        for (int64_t o = o0; o < o1; ++o) {
          s1 += sums[at(2 * (o * v.C + c))];
          s2 += sums[at(2 * (o * v.C + c) + 1)];
        }
        const auto mm = shifted_mean_m2((o1 - o0) * v.I, shift_of(o0, c), s1, s2);
        welford_merge(gm[at(c)], moments_from_two_pass((o1 - o0) * v.I, mm.first, mm.second));
      }
  } else if (p.training) {
    std::vector<Moments<double>> piece(at(v.O * v.C));
    parallel_for(v.O, grain_for(v.C * v.I), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t c = 0; c < v.C; ++c)
          piece[at(o * v.C + c)] = piece_moments(p.x + v.offset(0, o, c), v.I);
    });
    for (int64_t c = 0; c < v.C; ++c)
      for (int64_t o = 0; o < v.O; ++o) welford_merge(gm[at(c)], piece[at(o * v.C + c)]);
  }
  const std::vector<GroupStats<C>> st = finish_groups(p, gm);
  update_running(p, v, gm);
  export_moments(p, gm);
  if (!p.y) return;  // statistics only
  // 2) normalize + affine, 3) write y
  const bool stream = p.B * p.C * p.S * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  parallel_for(v.O, grain_for(v.C * v.I), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t c = 0; c < v.C; ++c)
        apply_plane<T, kHasWeight, kHasBias, kAct>(p, v, 0, o, c, st[at(c)], stream);
    if (stream) stream_fence();
  });
}

// c1 and c2 of group g of sample s from its channels' sums S1, S2 (sample s's row of C), n the
// group's count (group_count).
template <class T>
void group_coefficients(const ChannelBackwardParams<T>& p, const View& v, const double* s1,
                        const double* s2, int64_t g, double n, compute_t<T>& c1,
                        compute_t<T>& c2) {
  using C = compute_t<T>;
  if (!p.training) {
    c1 = c2 = C(0);
    return;
  }
  double a = 0.0, b = 0.0;
  for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c) {
    const double w = p.weight ? static_cast<double>(p.weight[c]) : 1.0;
    a += w * s1[c];
    b += w * s2[c];
  }
  c1 = static_cast<C>(a / n);
  c2 = static_cast<C>(b / n);
}

// The n of group t's coefficients: its element count, or with weighted statistics its total
// weight (params.h, group_w).
template <class T> double group_count(const ChannelBackwardParams<T>& p, const View& v, int64_t t) {
  if (!p.group_w) return static_cast<double>(v.group_size());
  return p.group_w[t] > 0.0 ? p.group_w[t] : 1.0;
}

// dweight, dbias: per-channel sums over samples, in sample order.
template <class T>
void write_param_grads(const ChannelBackwardParams<T>& p, const View& v, const std::vector<double>& s1,
                       const std::vector<double>& s2) {
  for (int64_t c = 0; c < v.C; ++c) {
    double dw = 0.0, db = 0.0;
    for (int64_t s = 0; s < v.samples; ++s) {
      dw += s1[at(s * v.C + c)];
      db += s2[at(s * v.C + c)];
    }
    p.dweight[c] = static_cast<acc_t<T>>(dw);
    p.dbias[c] = static_cast<acc_t<T>>(db);
  }
}

// A per-channel parameter as C; 0 when not needed (no activation: bias unread) or absent.
template <int kAct, class A> NK_INLINE auto channel_param(const A* param, int64_t c) {
  using C = compute_t<A>;
  return kAct != kActNone && param ? static_cast<C>(param[c]) : C(0);
}

// dx of one plane of I elements (both plane traversals): the group's statistics st, the
// channel's weight w and bias b, the group's coefficients c1, c2.
template <int kAct, class T, class C = compute_t<T>>
NK_INLINE void plane_grad(const ChannelBackwardParams<T>& p, const T* xp, const T* dyp, T* dxp,
                          int64_t I, const GroupStats<C>& group, C w, C b, C c1, C c2, bool stream) {
  const GroupStats<C> st = group;  // a local copy: in registers across the stores to dx
  if (!p.training && kAct == kActNone)  // x unread: a NaN in x does not reach dx
    elementwise(I, dxp, stream, [&](int64_t i, auto width) {
      return input_grad_const(loadw(dyp + i, width) * w, st.rstd);
    });
  else if (!p.training)
    elementwise(I, dxp, stream, [&](int64_t i, auto width) {
      const auto xh = xhat_of(loadw(xp + i, width), st);
      return input_grad_const(grad_of<kAct, C>(loadw(dyp + i, width), xh, w, b) * w, st.rstd);
    });
  else
    elementwise(I, dxp, stream, [&](int64_t i, auto width) {
      const auto xh = xhat_of(loadw(xp + i, width), st);
      return input_grad(grad_of<kAct, C>(loadw(dyp + i, width), xh, w, b) * w, xh, st.rstd, c1, c2);
    });
}

// dx of plane (s, o, c) with weighted statistics: each element's weight scales the statistics'
// part of its gradient (g = dy, or dy * act'(z) with an activation: grad_of; b read only then).
template <int kAct, class T, class C = compute_t<T>>
NK_INLINE void weighted_plane_grad(const ChannelBackwardParams<T>& p, const View& v, int64_t s,
                                   int64_t o, int64_t c, const GroupStats<C>& group, C w, C b,
                                   C c1, C c2, bool stream) {
  const acc_t<T>* om = p.omega + (s * v.O + o) * v.I;
  const T* xp = p.x + v.offset(s, o, c);
  const T* dyp = p.dy + v.offset(s, o, c);
  const GroupStats<C> st = group;
  elementwise(v.I, p.dx + v.offset(s, o, c), stream, [&](int64_t i, auto width) {
    const auto wo = loadw(om + i, width);
    const auto xh = xhat_of(loadw(xp + i, width), st);
    return input_grad(grad_of<kAct, C>(loadw(dyp + i, width), xh, w, b) * w, xh, st.rstd, wo * c1,
                      wo * c2);
  });
}

// S1 = sum(g xhat) and S2 = sum(g) of channel c of sample s over its planes, added in row order
// (g = dy, or dy * act'(z) with an activation: grad_of).
template <int kAct, class T, class C = compute_t<T>>
void plane_channel_sums(const ChannelBackwardParams<T>& p, const View& v, int64_t s, int64_t c,
                        const GroupStats<C>& st, double& s1, double& s2) {
  const C wc = channel_param<kAct>(p.weight, c), bc = channel_param<kAct>(p.bias, c);
  double sum_dy_xhat = 0.0, sum_dy = 0.0;
  for (int64_t o = 0; o < v.O; ++o) {
    const T* xp = p.x + v.offset(s, o, c);
    const T* dyp = p.dy + v.offset(s, o, c);
    double a, b;
    lane_sum2(v.I, a, b, [&](int64_t i, auto w) {
      const auto xh = xhat_of(loadw(xp + i, w), st);
      const auto d = wide_grad_of<kAct, C>(dyp + i, xh, wc, bc, w);
      return two(d * widen(xh), d);
    });
    sum_dy_xhat += a;
    sum_dy += b;
  }
  s1 = sum_dy_xhat;
  s2 = sum_dy;
}

// Backward, plane traversal: threads own groups; each group's sums, then its dx while the group
// is in cache. kWeighted: weighted statistics. Assumptions as forward_planes.
template <class T, bool kHasWeight, int kAct, bool kWeighted = false>
void backward_planes(const ChannelBackwardParams<T>& p, const View& v) {
  using C = compute_t<T>;
  std::vector<double> s1(at(v.samples * v.C)), s2(at(v.samples * v.C));
  const bool stream = p.B * p.C * p.S * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  parallel_for(v.samples * v.G, grain_for(v.group_size()), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / v.G, g = t % v.G;
      const GroupStats<C> st =
          make_group_stats<C>(static_cast<double>(p.mean[t]), static_cast<double>(p.rstd[t]));
      // partial dweight, dbias: per channel, planes added in row order
      for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c)
        plane_channel_sums<kAct>(p, v, s, c, st, s1[at(s * v.C + c)], s2[at(s * v.C + c)]);
      // c1, c2
      C c1, c2;
      group_coefficients(p, v, s1.data() + s * v.C, s2.data() + s * v.C, g, group_count(p, v, t),
                         c1, c2);
      // dx (prefetching the next group's x and dy here, as the forward does, was slower:
      // plane_group_apply)
      for (int64_t o = 0; o < v.O; ++o)
        for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c) {
          const C w = kHasWeight ? static_cast<C>(p.weight[c]) : C(1);
          const C b = channel_param<kAct>(p.bias, c);
          if constexpr (kWeighted) {
            weighted_plane_grad<kAct>(p, v, s, o, c, st, w, b, c1, c2, stream);
          } else {
            plane_grad<kAct>(p, p.x + v.offset(s, o, c), p.dy + v.offset(s, o, c),
                             p.dx + v.offset(s, o, c), v.I, st, w, b, c1, c2, stream);
          }
        }
    }
    if (stream) stream_fence();
  });
  write_param_grads(p, v, s1, s2);
}

// The row traversal's backward data per (sample, column): the group statistics, weight and
// bias (bias read only with an activation) and, once known, the coefficients c1, c2.
template <class C> struct GradColumns {
  ColumnStats<C> scol;
  std::vector<C> w, b, c1, c2;
};

template <int kAct, class T>
GradColumns<compute_t<T>> grad_columns(const ChannelBackwardParams<T>& p, const View& v,
                                       const std::vector<GroupStats<compute_t<T>>>& st) {
  using C = compute_t<T>;
  GradColumns<C> gc{column_stats(v, st), per_column(v, p.weight, C(1)), {}, {}, {}};
  if constexpr (kAct != kActNone) gc.b = per_column(v, p.bias, C(0));  // read with activations only
  return gc;
}

// Column j's bias as a block or scalar from the per-column biases b (0 without an activation:
// unread then).
template <int kAct, class C, class W> NK_INLINE auto column_bias(const C* b, int64_t j, W w) {
  if constexpr (kAct == kActNone) {
    (void)b;
    (void)j;
    (void)w;
    return C(0);
  } else {
    return loadw(b + j, w);
  }
}

// S1 = sum(g xhat), S2 = sum(g) per (sample, channel): per column over fixed chunks of rows,
// the chunks added in order, then each channel's columns in order.
template <int kAct, class T>
void row_grad_sums(const ChannelBackwardParams<T>& p, const View& v,
                   const GradColumns<compute_t<T>>& gc, std::vector<double>& s1,
                   std::vector<double>& s2) {
  using C = compute_t<T>;
  const int64_t cols = v.cols(), rpc = v.rows_per_chunk(), n_chunks = v.chunks();
  const int64_t tasks = v.samples * n_chunks;
  std::vector<double> partial(at(tasks * 2 * cols), 0.0);
  parallel_for(tasks, grain_for(std::min(v.O, rpc) * cols), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / n_chunks, k = t % n_chunks;
      // locals only in the loop (the sums' vector stores may alias anything reached otherwise)
      const int64_t n = cols;
      const C* const hi = gc.scol.hi.data() + s * n;
      const C* const lo = gc.scol.lo.data() + s * n;
      const C* const rs = gc.scol.rstd.data() + s * n;
      const C* const wc = gc.w.data();
      const C* const bc = kAct == kActNone ? nullptr : gc.b.data();
      const T* const xs = p.x + v.offset(s, 0, 0);
      const T* const dys = p.dy + v.offset(s, 0, 0);
      double* s_dy_xhat = partial.data() + t * 2 * n;
      const int64_t r0 = k * rpc, r1 = r0 + v.chunk_rows(k);
      const int64_t o_end = v.O;
      bool_switch(n * static_cast<int64_t>(sizeof(T)) >= kPrefetchSumRowBytes, [&](auto prefetch) {
        column_sums(
            r0, r1, n, s_dy_xhat, s_dy_xhat + n,
            [&](int64_t r, int64_t j, auto w) {
              const int64_t off = r * n + j;
              const auto xh = xhat_of(loadw(xs + off, w), loadw(hi + j, w), loadw(lo + j, w),
                                      loadw(rs + j, w));
              const auto d = wide_grad_of<kAct, C>(dys + off, xh, loadw(wc + j, w),
                                                   column_bias<kAct>(bc, j, w), w);
              return two(d * widen(xh), d);
            },
            // rows ahead (kPrefetchSumRowBytes), on every block: with prefetch_line_once here
            // (once per line) GCC 12 left no prefetch at all in the float instantiations
            [xs, dys, n, o_end](int64_t r, int64_t j, auto) {
              if constexpr (decltype(prefetch)::value)
                if (r < o_end) {
                  prefetch_line(xs + r * n + j);
                  prefetch_line(dys + r * n + j);
                }
            });
      });
    }
  });
  for (int64_t s = 0; s < v.samples; ++s)
    for (int64_t k = 0; k < n_chunks; ++k) {
      const double* part = partial.data() + (s * n_chunks + k) * 2 * cols;
      for (int64_t c = 0; c < v.C; ++c)
        for (int64_t j = c * v.I; j < (c + 1) * v.I; ++j) {
          s1[at(s * v.C + c)] += part[j];
          s2[at(s * v.C + c)] += part[cols + j];
        }
    }
}

// c1, c2 of every group, spread over its columns.
template <class T>
void column_coefficients(const ChannelBackwardParams<T>& p, const View& v, const std::vector<double>& s1,
                         const std::vector<double>& s2, GradColumns<compute_t<T>>& gc) {
  using C = compute_t<T>;
  const int64_t cols = v.cols();
  gc.c1.resize(at(v.samples * cols));
  gc.c2.resize(at(v.samples * cols));
  for (int64_t s = 0; s < v.samples; ++s)
    for (int64_t g = 0; g < v.G; ++g) {
      C c1, c2;
      group_coefficients(p, v, s1.data() + s * v.C, s2.data() + s * v.C, g,
                         group_count(p, v, s * v.G + g), c1, c2);
      std::fill(gc.c1.begin() + s * cols + g * v.D * v.I, gc.c1.begin() + s * cols + (g + 1) * v.D * v.I, c1);
      std::fill(gc.c2.begin() + s * cols + g * v.D * v.I, gc.c2.begin() + s * cols + (g + 1) * v.D * v.I, c2);
    }
}

// dx row by row with the per-column data (the row traversal's last step). kWeighted (weighted
// statistics, I == 1): each row's weight scales the statistics' part of its gradient. The loops
// here and in row_grad_sums read locals only (see apply_rows): channels-last BatchNorm
// (32, 56, 56, 64) float32 backward, 1 thread, AMD EPYC (Zen 4), 2026-12-07, interleaved
// processes: AVX2 7.4-7.7 -> 5.2 ms, AVX-512 5.8-6.8 -> 4.5-5.1 ms. Same bits.
template <int kAct, bool kWeighted, class T>
void rows_input_grad(const ChannelBackwardParams<T>& p, const View& v,
                     const GradColumns<compute_t<T>>& gc) {
  using C = compute_t<T>;
  const int64_t cols = v.cols();
  const bool stream = p.B * p.C * p.S * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  parallel_for(v.samples * v.O, grain_for(cols), [&](int64_t r0, int64_t r1) {
    // locals only in the loops (the vector stores may alias anything reached otherwise)
    const int64_t n = cols, per_sample = v.O;
    const bool training = p.training;
    const T* const x = p.x;
    const T* const dy = p.dy;
    T* const dx = p.dx;
    const C* const wc = gc.w.data();
    const C* const bc = kAct == kActNone ? nullptr : gc.b.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = (r / per_sample) * n;
      const C om = kWeighted ? static_cast<C>(p.omega[r]) : C(1);
      const C* const hi = gc.scol.hi.data() + base;
      const C* const lo = gc.scol.lo.data() + base;
      const C* const rs = gc.scol.rstd.data() + base;
      const C* const k1 = gc.c1.data() + base;
      const C* const k2 = gc.c2.data() + base;
      const T* const xr = x + r * n;
      const T* const dyr = dy + r * n;
      T* const dxr = dx + r * n;
      // the rows two ahead prefetched when rows are a page or more (kPrefetchRowBytes)
      const bool ahead = r + 2 < r1 && n * static_cast<int64_t>(sizeof(T)) >= kPrefetchRowBytes;
      const T* const xnext = ahead ? xr + 2 * n : nullptr;
      const T* const dynext = ahead ? dyr + 2 * n : nullptr;
      const auto xhat = [&](int64_t j, auto w) {
        prefetch_line_once(xnext ? xnext + j : nullptr, w);
        prefetch_line_once(dynext ? dynext + j : nullptr, w);
        return xhat_of(loadw(xr + j, w), loadw(hi + j, w), loadw(lo + j, w), loadw(rs + j, w));
      };
      const auto g = [&](int64_t j, auto w, auto xh) {
        return grad_of<kAct, C>(loadw(dyr + j, w), xh, loadw(wc + j, w), column_bias<kAct>(bc, j, w));
      };
      const auto coef = [&](const C* k, int64_t j, auto w) {
        if constexpr (kWeighted)
          return loadw(k + j, w) * om;
        else
          return loadw(k + j, w);
      };
      if (!training && kAct == kActNone)  // x unread: a NaN in x does not reach dx
        elementwise(n, dxr, stream, [&](int64_t j, auto w) {
          prefetch_line_once(dynext ? dynext + j : nullptr, w);
          return input_grad_const(loadw(dyr + j, w) * loadw(wc + j, w), loadw(rs + j, w));
        });
      else if (!training)
        elementwise(n, dxr, stream, [&](int64_t j, auto w) {
          return input_grad_const(g(j, w, xhat(j, w)) * loadw(wc + j, w), loadw(rs + j, w));
        });
      else
        elementwise(n, dxr, stream, [&](int64_t j, auto w) {
          const auto xh = xhat(j, w);
          return input_grad(g(j, w, xh) * loadw(wc + j, w), xh, loadw(rs + j, w), coef(k1, j, w),
                            coef(k2, j, w));
        });
    }
    if (stream) stream_fence();
  });
}

// The saved statistics of every group in the compute type.
template <class T> std::vector<GroupStats<compute_t<T>>> saved_stats(const ChannelBackwardParams<T>& p, const View& v) {
  std::vector<GroupStats<compute_t<T>>> st(at(v.samples * v.G));
  for (int64_t t = 0; t < v.samples * v.G; ++t)
    st[at(t)] = make_group_stats<compute_t<T>>(static_cast<double>(p.mean[t]), static_cast<double>(p.rstd[t]));
  return st;
}

// Backward, row traversal (also the weighted statistics' with channels innermost): sums per
// column, coefficients, then dx. Assumptions as forward_rows.
template <int kAct, bool kWeighted, class T>
void backward_rows_with(const ChannelBackwardParams<T>& p, const View& v) {
  auto gc = grad_columns<kAct>(p, v, saved_stats(p, v));
  std::vector<double> s1(at(v.samples * v.C), 0.0), s2(at(v.samples * v.C), 0.0);
  row_grad_sums<kAct>(p, v, gc, s1, s2);
  write_param_grads(p, v, s1, s2);
  column_coefficients(p, v, s1, s2, gc);
  rows_input_grad<kAct, kWeighted>(p, v, gc);
}

template <class T, bool kHasWeight, int kAct>
void backward_rows(const ChannelBackwardParams<T>& p, const View& v) {
  backward_rows_with<kAct, false>(p, v);
}

// Backward, sample-major plane traversal. Assumptions as forward_sample_planes. kWeighted: weighted
// statistics (their sums S1, S2 take every position; only dx uses the weights).
template <class T, bool kHasWeight, int kAct, bool kWeighted = false>
void backward_sample_planes(const ChannelBackwardParams<T>& p, const View& v) {
  using C = compute_t<T>;
  std::vector<GroupStats<C>> st(at(v.C));
  for (int64_t c = 0; c < v.C; ++c)
    st[at(c)] = make_group_stats<C>(static_cast<double>(p.mean[c]), static_cast<double>(p.rstd[c]));
  // partial dweight, dbias per plane (o, c)
  std::vector<double> piece(at(2 * v.O * v.C));
  parallel_for(v.O, grain_for(v.C * v.I), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t c = 0; c < v.C; ++c) {
        const T* xp = p.x + v.offset(0, o, c);
        const T* dyp = p.dy + v.offset(0, o, c);
        const GroupStats<C>& sc = st[at(c)];
        const C wc = channel_param<kAct>(p.weight, c), bc = channel_param<kAct>(p.bias, c);
        double* out = piece.data() + 2 * (o * v.C + c);
        lane_sum2(v.I, out[0], out[1], [&](int64_t i, auto w) {
          const auto xh = xhat_of(loadw(xp + i, w), sc);
          const auto d = wide_grad_of<kAct, C>(dyp + i, xh, wc, bc, w);
          return two(d * widen(xh), d);
        });
      }
  });
  // S1, S2 per channel, planes added in row order; c1, c2
  std::vector<double> s1(at(v.C), 0.0), s2(at(v.C), 0.0);
  for (int64_t o = 0; o < v.O; ++o)
    for (int64_t c = 0; c < v.C; ++c) {
      s1[at(c)] += piece[at(2 * (o * v.C + c))];
      s2[at(c)] += piece[at(2 * (o * v.C + c) + 1)];
    }
  write_param_grads(p, v, s1, s2);
  std::vector<C> c1(at(v.C)), c2(at(v.C));
  for (int64_t c = 0; c < v.C; ++c)
    group_coefficients(p, v, s1.data(), s2.data(), c, group_count(p, v, c), c1[at(c)], c2[at(c)]);
  // dx
  const bool stream = p.B * p.C * p.S * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  parallel_for(v.O, grain_for(v.C * v.I), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t c = 0; c < v.C; ++c) {
        const C w = kHasWeight ? static_cast<C>(p.weight[c]) : C(1);
        const C b = channel_param<kAct>(p.bias, c);
        if constexpr (kWeighted) {
          weighted_plane_grad<kAct>(p, v, 0, o, c, st[at(c)], w, b, c1[at(c)], c2[at(c)], stream);
        } else {
          plane_grad<kAct>(p, p.x + v.offset(0, o, c), p.dy + v.offset(0, o, c),
                           p.dx + v.offset(0, o, c), v.I, st[at(c)], w, b, c1[at(c)], c2[at(c)],
                           stream);
        }
      }
    if (stream) stream_fence();
  });
}

// ---- weighted statistics: mask= and sample_weight= (issue 15) ------------------------------
// omega (params.h) gives each position (sample s, row o, i) a weight >= 0 shared by the
// channels. A group's statistics are W = sum omega, mean = sum omega x / W and
// var = sum omega (x - mean)^2 / W; y is computed at every position. Tasks are (sample, piece
// of rows) with at most kShiftPiece elements of a channel per piece; each (piece, channel) is
// one pass of shifted sums in double (shift: the piece's first element of the channel; a zero
// weight excludes its element, even a NaN), and the pieces are merged in a fixed order with
// Chan's formula in its weighted form (core/welford.h). Backward: with g = dy * w,
// dx = rstd * (g - omega * (c2 + xhat * c1)), c1 = sum(g xhat) / W, c2 = sum(g) / W over the
// whole group (every position's y depends on the statistics; only weighted ones shape them).

// Rows per piece: pieces hold at most kShiftPiece elements of a channel (whole planes at least);
// with channels innermost (I == 1) also at most 4 * kChunkElements elements in all, so that a
// matrix such as (4096, 1024) gives the threads several pieces (one piece of 4096 rows left
// its statistics to one thread: masked BatchNorm1d 1.6-1.7x the unmasked time on 2 threads).
inline int64_t weighted_rows_per_piece(const View& v) {
  if (v.I == 1) return std::clamp<int64_t>(4 * kChunkElements / std::max<int64_t>(1, v.C), 1, kShiftPiece);
  return std::max<int64_t>(1, kShiftPiece / std::max<int64_t>(1, v.I));
}

// Shifted sums a = sum omega d, b = sum omega d^2, d = x - k, over x[0, len) with the weights
// om[0, len) (a zero weight excludes its element, even a NaN). kBinary (every weight 0 or 1, a
// mask): an excluded element is replaced by the shift kc, an element of x (exact in the compute
// type), so it adds exactly 0 to both sums, and nothing is multiplied by a weight: the same
// sums, at the cost of the unweighted kernel plus one compare and one select per block.
template <bool kBinary, class T, class A>
NK_INLINE void weighted_shifted_sums(const T* xp, const A* om, int64_t len, compute_t<T> kc,
                                     double& a, double& b) {
  const double k = widen(kc);
  if constexpr (kBinary) {
    lane_sum2(len, a, b, [&](int64_t i, auto wd) {
      const auto d = widen(BlockOps::where_pos(loadw(om + i, wd), loadw(xp + i, wd), kc)) - k;
      return two(d, d * d);
    });
  } else {
    lane_sum2(len, a, b, [&](int64_t i, auto wd) {
      const auto ow = load_wide(om + i, wd);
      const auto d = BlockOps::where_pos(ow, load_wide(xp + i, wd) - k, 0.0);
      return two(ow * d, ow * d * d);
    });
  }
}

// Whether every weight is 0 or 1 (a mask): the sums then need no multiplications.
template <class T> bool weights_are_binary(const ChannelForwardParams<T>& p, const View& v) {
  using A = acc_t<T>;
  std::atomic<int64_t> others{0};
  parallel_for(v.samples * v.O * v.I, 1 << 16, [&](int64_t e0, int64_t e1) {
    int64_t n = 0;  // a plain count (no early exit), so the loop vectorizes
    for (int64_t e = e0; e < e1; ++e) n += (p.omega[e] != A(0)) & (p.omega[e] != A(1));
    others += n;
  });
  return others.load() == 0;
}

// Moments of every (sample, piece, channel), laid out [s][piece][c].
template <bool kBinary, class T>
std::vector<WeightedMoments<double>> weighted_piece_moments(const ChannelForwardParams<T>& p, const View& v) {
  using A = acc_t<T>;
  const int64_t rpp = weighted_rows_per_piece(v), pieces = (v.O + rpp - 1) / rpp;
  std::vector<WeightedMoments<double>> part(at(v.samples * pieces * v.C));
  parallel_for(v.samples * pieces, grain_for(std::min(v.O, rpp) * v.C * v.I), [&](int64_t t0, int64_t t1) {
    std::vector<double> shift(at(v.C)), s1(at(v.C)), s2(at(v.C));
    std::vector<compute_t<T>> kcs(at(v.C));
    std::vector<double> om_of(v.I == 1 ? at(std::min(v.O, rpp)) : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / pieces, r0 = (t % pieces) * rpp, r1 = std::min(v.O, r0 + rpp);
      const A* om0 = p.omega + (s * v.O + r0) * v.I;
      double w = 0.0;
      int64_t first = -1;  // the first weighted position: its values are the shifts
      for (int64_t e = 0; e < (r1 - r0) * v.I; ++e) {
        w += static_cast<double>(om0[e]);
        if (first < 0 && om0[e] > A(0)) first = e;
      }
      WeightedMoments<double>* out = part.data() + t * v.C;
      if (first < 0 && v.I <= kShiftPiece) continue;  // nothing weighted: empty moments
      if (v.I == 1) {  // channels innermost: one weight per row, columns summed together
        const T* x0 = p.x + v.offset(s, r0 + first, 0);
        for (int64_t c = 0; c < v.C; ++c) shift[at(c)] = load_wide(x0 + c, Width<1>{});
        std::fill(s1.begin(), s1.end(), 0.0);
        std::fill(s2.begin(), s2.end(), 0.0);
        // An excluded row (weight 0, whatever x holds) gives d = +0.0 (a select, not a branch:
        // a random mask mispredicts), which adds nothing to the sums (they start at +0.0), as
        // skipping it would. Every row is read, so the walk down the rows stays sequential for
        // the prefetchers, and the loop reads locals only (a vector store may alias anything
        // reached through p). Channels-last BatchNorm (32, 56, 56, 64), 80 % kept, float32
        // forward, 1 thread, AMD EPYC (Zen 4), 2026-12-07, masked / unmasked time over four runs
        // of each: AVX2 1.36-1.73 -> 1.24-1.31, AVX-512 1.44-1.72 -> 1.05-1.27 (redirecting the
        // reads with locals only and no branch, but still skipping rows: no better). Same bits.
        const int64_t n = v.C;
        const T* const xs = p.x + v.offset(s, 0, 0);
        const A* const oms = p.omega + s * v.O;
        double* const oml = om_of.data();  // oml[r - r0]: row r's weight
        for (int64_t r = r0; r < r1; ++r) oml[r - r0] = static_cast<double>(oms[r]);
        const double* const sh = shift.data();
        const int64_t o_end = v.O;
        bool_switch(n * static_cast<int64_t>(sizeof(T)) >= kPrefetchSumRowBytes, [&](auto prefetch) {
          column_sums(
              r0, r1, n, s1.data(), s2.data(),
              [&](int64_t r, int64_t j, auto wd) {
                const double om = oml[r - r0];
                const auto dx = load_wide(xs + r * n + j, wd) - loadw(sh + j, wd);
                const auto d = BlockOps::where_pos(decltype(dx){} + om, dx, 0.0);
                if constexpr (kBinary)  // om is 0 (d = 0 then) or 1: the products are d and d * d
                  return two(d, d * d);
                else
                  return two(d * om, d * d * om);
              },
              [xs, n, o_end](int64_t r, int64_t j, auto wd) {  // rows ahead (kPrefetchSumRowBytes)
                if constexpr (decltype(prefetch)::value)
                  if (r < o_end) prefetch_line_once(xs + r * n + j, wd);
              });
        });
        for (int64_t c = 0; c < v.C; ++c)
          out[c] = weighted_from_shifted(w, shift[at(c)], s1[at(c)], s2[at(c)]);
        continue;
      }
      if (v.I <= kShiftPiece) {
        // One piece per plane: walked in memory order, row by row and each row's channels in
        // turn (each channel's sums still add the rows in order: the same bits as channel by
        // channel). Channel by channel, the planes of a channel lie a sample apart and each
        // restarts the prefetchers. BatchNorm (64, 256, 512) float32 with 80 % of positions
        // kept, 1 thread, AMD EPYC (Zen 4), 2026-12-07, masked / unmasked time, two runs each:
        // AVX-512 1.45-1.57 -> 1.15-1.17, AVX2 1.97-2.07 -> 1.15-1.27.
        const int64_t fr = r0 + first / v.I, fi = first % v.I;
        for (int64_t c = 0; c < v.C; ++c) kcs[at(c)] = loadw(p.x + v.offset(s, fr, c) + fi, Width<1>{});
        std::fill(s1.begin(), s1.end(), 0.0);
        std::fill(s2.begin(), s2.end(), 0.0);
        for (int64_t r = r0; r < r1; ++r) {
          const A* omr = p.omega + (s * v.O + r) * v.I;
          for (int64_t c = 0; c < v.C; ++c) {
            double ra, rb;
            weighted_shifted_sums<kBinary>(p.x + v.offset(s, r, c), omr, v.I, kcs[at(c)], ra, rb);
            s1[at(c)] += ra;
            s2[at(c)] += rb;
          }
        }
        for (int64_t c = 0; c < v.C; ++c) {
          WeightedMoments<double> m;
          weighted_merge(m, weighted_from_shifted(w, widen(kcs[at(c)]), s1[at(c)], s2[at(c)]));
          out[c] = m;
        }
        continue;
      }
      for (int64_t c = 0; c < v.C; ++c) {
        WeightedMoments<double> m;
        for (int64_t i0 = 0; i0 < v.I; i0 += kShiftPiece) {  // pieces of one plane when I is long
          const int64_t len = std::min(kShiftPiece, v.I - i0);
          int64_t f = first;  // (r - r0) * I + i of the piece's first weighted position
          if (v.I > kShiftPiece) {
            f = -1;
            for (int64_t i = 0; i < len && f < 0; ++i)
              if (om0[i0 + i] > A(0)) f = i0 + i;
            if (f < 0) continue;
          }
          const compute_t<T> kc = loadw(p.x + v.offset(s, r0 + f / v.I, c) + f % v.I, Width<1>{});
          const double k = widen(kc);
          double a = 0.0, b = 0.0, wp = 0.0;
          for (int64_t r = r0; r < r1; ++r) {
            double ra, rb;
            weighted_shifted_sums<kBinary>(p.x + v.offset(s, r, c) + i0,
                                           p.omega + (s * v.O + r) * v.I + i0, len, kc, ra, rb);
            a += ra;
            b += rb;
          }
          if (v.I > kShiftPiece)
            for (int64_t r = r0; r < r1; ++r)
              for (int64_t i = 0; i < len; ++i) wp += static_cast<double>(om0[(r - r0) * v.I + i0 + i]);
          weighted_merge(m, weighted_from_shifted(v.I > kShiftPiece ? wp : w, k, a, b));
        }
        out[c] = m;
      }
    }
  });
  return part;
}

// Per group (s * G + g): the pieces of its sample in order, each piece's channels in order.
template <class T>
std::vector<WeightedMoments<double>> weighted_group_moments(const ChannelForwardParams<T>& p, const View& v,
                                                            bool binary) {
  const std::vector<WeightedMoments<double>> part =
      binary ? weighted_piece_moments<true>(p, v) : weighted_piece_moments<false>(p, v);
  const int64_t rpp = weighted_rows_per_piece(v), pieces = (v.O + rpp - 1) / rpp;
  std::vector<WeightedMoments<double>> gm(at(v.samples * v.G));
  parallel_for(v.samples * v.G, grain_for(pieces * v.D * 16), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / v.G, g = t % v.G;
      for (int64_t k = 0; k < pieces; ++k)
        for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c)
          weighted_merge(gm[at(t)], part[at((s * pieces + k) * v.C + c)]);
    }
  });
  return gm;
}

// The plane traversal's weighted moments need, per row (s, o) and piece q of kShiftPiece
// elements of a plane, the piece's total weight and its first weighted position (the shift).
struct WeightedPiece {
  double w = 0.0;
  int64_t first = -1;  // index within the plane; -1: nothing weighted
};

template <class T> std::vector<WeightedPiece> weighted_pieces(const ChannelForwardParams<T>& p, const View& v) {
  const int64_t q_per_row = (v.I + kShiftPiece - 1) / kShiftPiece;
  std::vector<WeightedPiece> info(at(v.samples * v.O * q_per_row));
  parallel_for(v.samples * v.O, grain_for(v.I), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t q = 0; q < q_per_row; ++q) {
        WeightedPiece& wp = info[at(r * q_per_row + q)];
        const acc_t<T>* om = p.omega + r * v.I;
        for (int64_t i = q * kShiftPiece; i < std::min(v.I, (q + 1) * kShiftPiece); ++i) {
          wp.w += static_cast<double>(om[i]);
          if (wp.first < 0 && om[i] > acc_t<T>(0)) wp.first = i;
        }
      }
  });
  return info;
}

// Weighted moments of group (s, g) in the plane traversal: per plane piece, shifted sums
// (weighted_shifted_sums); the pieces merged in plane order.
template <bool kBinary, class T>
WeightedMoments<double> weighted_plane_moments(const ChannelForwardParams<T>& p, const View& v,
                                               const std::vector<WeightedPiece>& info, int64_t s,
                                               int64_t g) {
  using C = compute_t<T>;
  const int64_t q_per_row = (v.I + kShiftPiece - 1) / kShiftPiece;
  WeightedMoments<double> m;
  for (int64_t o = 0; o < v.O; ++o) {
    const acc_t<T>* om = p.omega + (s * v.O + o) * v.I;
    for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c) {
      const T* xp = p.x + v.offset(s, o, c);
      for (int64_t q = 0; q < q_per_row; ++q) {
        const WeightedPiece& wp = info[at((s * v.O + o) * q_per_row + q)];
        if (wp.first < 0) continue;
        const int64_t i0 = q * kShiftPiece, len = std::min(kShiftPiece, v.I - i0);
        const C kc = loadw(xp + wp.first, Width<1>{});
        double a, b;
        weighted_shifted_sums<kBinary>(xp + i0, om + i0, len, kc, a, b);
        weighted_merge(m, weighted_from_shifted(wp.w, widen(kc), a, b));
      }
    }
  }
  return m;
}

// Forward with weighted statistics, plane traversal: threads own groups; each group's statistics
// and then its y, while the group is still in cache, with the next group's planes prefetched
// meanwhile (as forward_planes; plane_group_apply). The prefetch, BatchNorm (32, 64, 56, 56)
// float32 with 80 % of positions kept, masked / unmasked ms, interleaved, 2026-12-07: AMD EPYC
// (Zen 4, 32 MiB L3; x does not stay in L3 between calls), 1 thread AVX-512 3.7-3.9 -> 3.0-3.4
// / 2.4-2.6, AVX2 4.6-4.8 -> 3.6-3.8 / 2.8-3.1, 2 threads 2.4-3.4 -> 2.15-2.2 / 1.6-1.75; on
// the Xeon with a 480 MiB L3 (x stays there) it cost: masked / unmasked 1.09-1.16 -> 1.20-1.34.
// Kept, as in the unmasked forward: data evicted between calls is the common case in training.
template <class T, bool kHasWeight, bool kHasBias, int kAct>
void forward_weighted_planes(const ChannelForwardParams<T>& p, const View& v, bool binary) {
  using C = compute_t<T>;
  const std::vector<WeightedPiece> info = weighted_pieces(p, v);
  const bool stream = p.B * p.C * p.S * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  parallel_for(v.samples * v.G, grain_for(v.group_size()), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const WeightedMoments<double> m =
          binary ? weighted_plane_moments<true>(p, v, info, t / v.G, t % v.G)
                 : weighted_plane_moments<false>(p, v, info, t / v.G, t % v.G);
      const double var = m.w > 0.0 ? m.m2 / m.w : 0.0;
      const GroupStats<C> st = write_group(p, t, m.mean, rstd_from_var(var, p.eps));
      p.group_w64[t] = m.w;
      p.group_mean64[t] = m.mean;
      p.group_m2_64[t] = m.m2;
      const int64_t next = t + 1 < t1 && v.group_size() <= kTwoPassElements ? t + 1 : -1;
      if (p.y) plane_group_apply<T, kHasWeight, kHasBias, kAct>(p, v, t / v.G, t % v.G, st, stream, next);
    }
    if (stream) stream_fence();
  });
}

// Forward with weighted statistics (training only; see params.h): statistics, then y (with the
// activation kAct, as the unweighted traversals).
template <class T, bool kHasWeight, bool kHasBias, int kAct>
void forward_weighted(const ChannelForwardParams<T>& p, const View& v) {
  using C = compute_t<T>;
  const bool binary = weights_are_binary(p, v);
  if (v.I > 1 && use_planes(v) && !use_sample_planes(v)) {
    forward_weighted_planes<T, kHasWeight, kHasBias, kAct>(p, v, binary);
    return;
  }
  const std::vector<WeightedMoments<double>> gm = weighted_group_moments(p, v, binary);
  std::vector<GroupStats<C>> st(gm.size());
  for (size_t t = 0; t < gm.size(); ++t) {
    const double var = gm[t].w > 0.0 ? gm[t].m2 / gm[t].w : 0.0;
    st[t] = write_group(p, static_cast<int64_t>(t), gm[t].mean, rstd_from_var(var, p.eps));
    p.group_w64[t] = gm[t].w;
    p.group_mean64[t] = gm[t].mean;
    p.group_m2_64[t] = gm[t].m2;
  }
  if (!p.y) return;
  if (v.I == 1) {
    apply_rows<T, kHasWeight, kHasBias, kAct>(p, v, st);
    return;
  }
  const bool stream = p.B * p.C * p.S * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  parallel_for(v.samples * v.O, grain_for(v.C * v.I), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = r / v.O, o = r % v.O;
      for (int64_t c = 0; c < v.C; ++c)
        apply_plane<T, kHasWeight, kHasBias, kAct>(p, v, s, o, c, st[at(s * v.G + c / v.D)], stream);
    }
    if (stream) stream_fence();
  });
}

// Backward with weighted statistics (training only). S1 = sum(dy xhat), S2 = sum(dy) per (sample,
// channel) over every position, in row order; then dx with the weights.
template <class T, bool kHasWeight, int kAct>
void backward_weighted(const ChannelBackwardParams<T>& p, const View& v) {
  using C = compute_t<T>;
  if (v.I > 1 && use_planes(v) && !use_sample_planes(v)) {
    backward_planes<T, kHasWeight, kAct, true>(p, v);
    return;
  }
  if (v.I == 1) {  // channels innermost: the row traversal, one weight per row
    backward_rows_with<kAct, true>(p, v);
    return;
  }
  if (use_sample_planes(v)) {  // BatchNorm's short planes, memory in order (the sums are the same)
    backward_sample_planes<T, kHasWeight, kAct, true>(p, v);
    return;
  }
  // other short planes: per (sample, channel) sums, then dx plane by plane
  const std::vector<GroupStats<C>> st = saved_stats(p, v);
  std::vector<double> s1(at(v.samples * v.C), 0.0), s2(at(v.samples * v.C), 0.0);
  parallel_for(v.samples * v.C, grain_for(v.O * v.I), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      plane_channel_sums<kAct>(p, v, t / v.C, t % v.C, st[at((t / v.C) * v.G + (t % v.C) / v.D)],
                                   s1[at(t)], s2[at(t)]);
  });
  write_param_grads(p, v, s1, s2);
  std::vector<C> c1(at(v.samples * v.G)), c2(at(v.samples * v.G));
  for (int64_t t = 0; t < v.samples * v.G; ++t)
    group_coefficients(p, v, s1.data() + (t / v.G) * v.C, s2.data() + (t / v.G) * v.C, t % v.G,
                       group_count(p, v, t), c1[at(t)], c2[at(t)]);
  const bool stream = p.B * p.C * p.S * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  parallel_for(v.samples * v.O, grain_for(v.C * v.I), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = r / v.O, o = r % v.O;
      for (int64_t c = 0; c < v.C; ++c) {
        const int64_t t = s * v.G + c / v.D;
        const C w = kHasWeight ? static_cast<C>(p.weight[c]) : C(1);
        weighted_plane_grad<kAct>(p, v, s, o, c, st[at(t)], w, channel_param<kAct>(p.bias, c),
                                  c1[at(t)], c2[at(t)], stream);
      }
    }
    if (stream) stream_fence();
  });
}

// The traversal for a view (see the file header); depends on the shape only. Each of the three
// earns its code: BENCH.md's float32 workloads, forward / backward ms, 1 thread, Xeon AVX-512,
// 2026-12-06, with each traversal forced in turn (a temporary switch, not kept; run-to-run noise
// on this machine 10-30 %):
//   rows   bn1d (4096, 1024)              3.0 / 4.1;  planes 192 / 172;  sample planes 134 / 88
//          channels-last (32, 56, 56, 64)  3.7 / 6.3;  planes 202 / 284;  sample planes 212 / 135
//   planes (32, 64, 56, 56) BatchNorm      2.7 / 4.4;  rows 79 / 83
//          GroupNorm (32, 256, 28, 28)     2.4 / 5.2;  rows 121 / 148
//          InstanceNorm (32, 64, 56, 56)   2.3 / 4.0;  rows 112 / 147
//   sample planes (256, 256, 14, 14)      10.5 / 17.9; planes 13.4 / 24.5; rows 146 / 151
//          (64, 512, 7, 7)                 0.87 / 1.26; planes 1.78 / 1.88; rows 2.9 / 3.1
bool use_planes(const View& v) {
  return v.I >= kMinPlane || v.cols() * kMinRowsPerChunk > kChunkElements ||
         (v.samples > 1 && v.O < kMinRowsPerChunk);  // GroupNorm with few rows per sample
}

// BatchNorm planes shorter than this are walked sample by sample (see forward_sample_planes).
bool use_sample_planes(const View& v) {
  return v.samples == 1 && v.D == 1 && v.O > 1 && v.I < kSamplePlane && use_planes(v);
}

// The evaluation-mode BatchNorm forward (no statistics: every element is normalized with the
// running ones) walks memory in order, sample by sample, at any plane length: a channel's planes
// lie a sample's size apart, so walking them channel by channel restarts the prefetchers at every
// plane. Same elementwise step, same bits. (32, 64, 56, 56) float32, ms, AMD EPYC (Zen 4),
// 2026-12-07, 1 thread: AVX2 2.04-2.14 -> 1.05-1.16, AVX-512 1.84-1.90 -> 1.12, SSE2 1.32-1.38
// after; PyTorch 1.56-1.75 and np.copyto of the same array 1.52-2.01 in the same runs.
bool use_eval_sample_planes(const View& v, bool training) {
  return !training && v.samples == 1 && v.D == 1 && v.O > 1 && use_planes(v);
}

}  // namespace

template <class T> void channel_norm_forward(const ChannelForwardParams<T>& p) {
  const View v = view_of(p);
  if (v.C <= 0 || v.samples <= 0) return;
  const auto run = [&](auto has_w, auto has_b, auto act) {
    constexpr bool kW = decltype(has_w)::value, kB = decltype(has_b)::value;
    constexpr int kA = decltype(act)::value;
    if (use_sample_planes(v) || use_eval_sample_planes(v, p.training))
      forward_sample_planes<T, kW, kB, kA>(p, v);
    else if (use_planes(v))
      forward_planes<T, kW, kB, kA>(p, v);
    else
      forward_rows<T, kW, kB, kA>(p, v);
  };
  using std::integral_constant;
  using Yes = std::true_type;
  if (p.omega && p.training) {  // weighted statistics: weight and bias set (params.h)
    if (p.activation == kActRelu)
      forward_weighted<T, true, true, kActRelu>(p, v);
    else if (p.activation == kActSilu)
      forward_weighted<T, true, true, kActSilu>(p, v);
    else
      forward_weighted<T, true, true, kActNone>(p, v);
    return;
  }
  if (p.activation == kActRelu)  // weight and bias set (params.h)
    run(Yes{}, Yes{}, integral_constant<int, kActRelu>{});
  else if (p.activation == kActSilu)
    run(Yes{}, Yes{}, integral_constant<int, kActSilu>{});
  else
    bool_switch(p.weight != nullptr, [&](auto has_w) {
      bool_switch(p.bias != nullptr,
                  [&](auto has_b) { run(has_w, has_b, integral_constant<int, kActNone>{}); });
    });
}

template <class T> void channel_norm_backward(const ChannelBackwardParams<T>& p) {
  const View v = view_of(p);
  if (v.C <= 0) return;
  const auto run = [&](auto has_w, auto act) {
    constexpr bool kW = decltype(has_w)::value;
    constexpr int kA = decltype(act)::value;
    if (use_sample_planes(v))
      backward_sample_planes<T, kW, kA>(p, v);
    else if (use_planes(v))
      backward_planes<T, kW, kA>(p, v);
    else
      backward_rows<T, kW, kA>(p, v);
  };
  using std::integral_constant;
  if (p.omega && p.training) {  // weighted statistics: weight set (params.h), bias with an activation
    if (p.activation == kActRelu)
      backward_weighted<T, true, kActRelu>(p, v);
    else if (p.activation == kActSilu)
      backward_weighted<T, true, kActSilu>(p, v);
    else
      backward_weighted<T, true, kActNone>(p, v);
    return;
  }
  if (p.activation == kActRelu)  // weight and bias set (params.h)
    run(std::true_type{}, integral_constant<int, kActRelu>{});
  else if (p.activation == kActSilu)
    run(std::true_type{}, integral_constant<int, kActSilu>{});
  else
    bool_switch(p.weight != nullptr, [&](auto has_w) { run(has_w, integral_constant<int, kActNone>{}); });
}

#define NK_INSTANTIATE(T)                                                  \
  template void channel_norm_forward<T>(const ChannelForwardParams<T>&);  \
  template void channel_norm_backward<T>(const ChannelBackwardParams<T>&);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(half)
NK_INSTANTIATE(bfloat16)
#undef NK_INSTANTIATE

}  // namespace nk::cpu::NK_ISA_NS

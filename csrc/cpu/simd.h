// normkit CPU: portable SIMD blocks for the kernels' inner loops.
//
// Kernels write each formula once as a generic lambda f(j, width) and the helpers here call it
// on blocks of 8 elements (width Width<8>: GCC/Clang vector extensions, which the compiler maps
// onto SSE2, AVX2 or AVX-512 registers depending on how the file is compiled) and on single
// elements for the remainder (Width<1>: plain scalars). The same core/norm_math.h formulas run
// on both: the vector types support the same operators, with scalars broadcast.
//
// Summation order is fixed by the source (see lane_sum), so every build gives the same bits.
// Streaming (non-temporal) stores are used for outputs far larger than the caches: they skip
// reading each output line before writing it (write-allocate), a third less memory traffic.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <utility>

#include "core/macros.h"
#include "core/types.h"

#if defined(__SSE2__) || defined(_M_X64)
#include <immintrin.h>
#define NK_HAVE_STREAM 1
#endif
#if defined(__GNUC__) || defined(__clang__)
#define NK_HAVE_VECTOR_EXT 1
#endif

namespace nk::cpu {

template <int W> struct Width {
  static constexpr int value = W;
};

// ---- types --------------------------------------------------------------------------------
#if defined(NK_HAVE_VECTOR_EXT)
constexpr int kBlock = 8;
typedef float f8 __attribute__((vector_size(32), aligned(4)));
typedef double d8 __attribute__((vector_size(64), aligned(8)));
template <class C> struct Vec8;
template <> struct Vec8<float> { using type = f8; };
template <> struct Vec8<double> { using type = d8; };
template <class C> using vec8 = typename Vec8<C>::type;
#else
constexpr int kBlock = 1;
#endif

// ---- loads: storage type T -> compute type (scalar or block of 8) ------------------------------
template <class T> NK_INLINE compute_t<T> loadw(const T* p, Width<1>) { return load(*p); }
NK_INLINE float loadw(const float* p, Width<1>) { return *p; }
NK_INLINE double loadw(const double* p, Width<1>) { return *p; }

#if defined(NK_HAVE_VECTOR_EXT)
NK_INLINE f8 loadw(const float* p, Width<8>) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
NK_INLINE d8 loadw(const double* p, Width<8>) {
  d8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
NK_INLINE f8 loadw(const bfloat16* p, Width<8>) {
  u16x8 b;
  std::memcpy(&b, p, sizeof b);
  const u32x8 wide = __builtin_convertvector(b, u32x8) << 16;
  f8 v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}
NK_INLINE f8 loadw(const half* p, Width<8>) {
#if defined(__F16C__)
  return (f8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  f8 v;
  for (int k = 0; k < 8; ++k) v[k] = half_to_float(p[k].bits);
  return v;
#endif
}
#endif

// ---- widening to double for statistics ----------------------------------------------------------
NK_INLINE double widen(float v) { return static_cast<double>(v); }
NK_INLINE double widen(double v) { return v; }
#if defined(NK_HAVE_VECTOR_EXT)
NK_INLINE d8 widen(f8 v) {
#if defined(__AVX512F__)
  // one instruction (GCC splits the generic form); the masked form avoids a false
  // maybe-uninitialized warning in GCC 12's own header
  return (d8)_mm512_maskz_cvtps_pd(static_cast<__mmask8>(0xff), (__m256)v);
#else
  return __builtin_convertvector(v, d8);
#endif
}
NK_INLINE d8 widen(d8 v) { return v; }
#endif

// ---- stores: compute type -> storage type, ordinary or streaming -------------------------------
template <class T> NK_INLINE void storew(T* p, compute_t<T> v, Width<1>) { *p = store<T>(v); }

#if defined(NK_HAVE_VECTOR_EXT)
NK_INLINE void pack8(float* out, f8 v) { std::memcpy(out, &v, sizeof v); }
NK_INLINE void pack8(double* out, d8 v) { std::memcpy(out, &v, sizeof v); }
NK_INLINE void pack8(bfloat16* out, f8 v) {
  u32x8 u;
  std::memcpy(&u, &v, sizeof u);
  // round to nearest even; NaN made quiet (as float_to_bfloat16 in core/types.h)
  const u32x8 is_nan = (u32x8)((u & 0x7fffffffu) > 0x7f800000u);
  const u32x8 rounded = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  const u32x8 r = (is_nan & ((u >> 16) | 0x40u)) | (~is_nan & rounded);
  const u16x8 b = __builtin_convertvector(r, u16x8);
  std::memcpy(out, &b, sizeof b);
}
NK_INLINE void pack8(half* out, f8 v) {
#if defined(__F16C__)
  const __m128i h = _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(out, &h, sizeof h);
#else
  for (int k = 0; k < 8; ++k) out[k].bits = float_to_half(v[k]);
#endif
}
template <class T> NK_INLINE void storew(T* p, vec8<compute_t<T>> v, Width<8>) { pack8(p, v); }
NK_INLINE void storew(double* p, double v, Width<1>) { *p = v; }

// A block of 8 elements as 16-byte streaming stores; p must be 16-byte aligned.
template <class T> NK_INLINE void stream_block(T* p, vec8<compute_t<T>> v) {
#if defined(NK_HAVE_STREAM)
  alignas(64) T tmp[8];
  pack8(tmp, v);
  constexpr int kParts = static_cast<int>(sizeof tmp / 16);
  for (int k = 0; k < kParts; ++k)
    _mm_stream_si128(reinterpret_cast<__m128i*>(p) + k,
                     _mm_load_si128(reinterpret_cast<const __m128i*>(tmp) + k));
#else
  pack8(p, v);
#endif
}
#endif

// Orders streaming stores before anything that follows (call once per thread after a kernel).
NK_INLINE void stream_fence() {
#if defined(NK_HAVE_STREAM)
  _mm_sfence();
#endif
}

// ---- loops --------------------------------------------------------------------------------------
// The whole 64-byte cache lines of out[0, n): [head, end). Only whole lines are ever written with
// streaming stores: a line written partly by streaming and partly by ordinary stores (at the
// edges of short rows or planes) would be evicted and re-read, which costs more than it saves.
// head = end = 0 when out is not aligned to its element size.
struct Lines {
  int64_t head = 0, end = 0;
};
template <class T> NK_INLINE Lines whole_lines(const T* out, int64_t n) {
  Lines l;
  const uintptr_t mis = reinterpret_cast<uintptr_t>(out) & 63u;
  if (mis % sizeof(T) != 0) return l;
  l.head = std::min<int64_t>(n, static_cast<int64_t>(((64u - mis) & 63u) / sizeof(T)));
  constexpr int64_t kPerLine = static_cast<int64_t>(64 / sizeof(T));
  l.end = l.head + (n - l.head) / kPerLine * kPerLine;
  return l;
}

// out[j] = f(j, width) for j in [0, n); whole cache lines with streaming stores when `stream`.
template <class T, class F> NK_INLINE void elementwise(int64_t n, T* out, bool stream, F&& f) {
  int64_t j = 0;
#if defined(NK_HAVE_VECTOR_EXT) && defined(NK_HAVE_STREAM)
  if (stream) {
    const Lines l = whole_lines(out, n);
    if (l.end > l.head) {
      for (; j < l.head; ++j) storew(out + j, f(j, Width<1>{}), Width<1>{});
      for (; j < l.end; j += kBlock) stream_block(out + j, f(j, Width<8>{}));
    }
  }
#else
  (void)stream;
#endif
#if defined(NK_HAVE_VECTOR_EXT)
  for (; j + kBlock <= n; j += kBlock) storew(out + j, f(j, Width<8>{}), Width<8>{});
#endif
  for (; j < n; ++j) storew(out + j, f(j, Width<1>{}), Width<1>{});
}

// Store one value or block; blocks stream when `stream` (p must then be 16-byte aligned).
template <class T, class V> NK_INLINE void put(T* p, V v, Width<1> w, bool) { storew(p, v, w); }
#if defined(NK_HAVE_VECTOR_EXT)
template <class T, class V> NK_INLINE void put(T* p, V v, Width<8> w, bool stream) {
  if (stream)
    stream_block(p, v);
  else
    storew(p, v, w);
}
#endif

// f(j, width) over [0, n): single elements for [0, head), then blocks, then single elements.
template <class F> NK_INLINE void for_blocks_from(int64_t n, int64_t head, F&& f) {
  int64_t j = 0;
  for (; j < head && j < n; ++j) f(j, Width<1>{});
#if defined(NK_HAVE_VECTOR_EXT)
  for (; j + kBlock <= n; j += kBlock) f(j, Width<8>{});
#endif
  for (; j < n; ++j) f(j, Width<1>{});
}

// Same as elementwise, with no output: f(j, width) does its own side effects.
template <class F> NK_INLINE void for_blocks(int64_t n, F&& f) {
  int64_t j = 0;
#if defined(NK_HAVE_VECTOR_EXT)
  for (; j + kBlock <= n; j += kBlock) f(j, Width<8>{});
#endif
  for (; j < n; ++j) f(j, Width<1>{});
}

// p[0..w) += v
NK_INLINE void add_to(double* p, double v) { *p += v; }
#if defined(NK_HAVE_VECTOR_EXT)
NK_INLINE void add_to(double* p, d8 v) {
  d8 cur;
  std::memcpy(&cur, p, sizeof cur);
  cur += v;
  std::memcpy(p, &cur, sizeof cur);
}
#endif

}  // namespace nk::cpu

// normkit CPU: portable SIMD blocks for the kernels' inner loops.
//
// Kernels write each formula once as a generic lambda f(j, width) and the helpers here call it
// on blocks of 8 elements (width Width<8>: f8 / d8, GCC/Clang vector extensions of the build's
// register width, or Pack structs of two or four of them where 8 elements are wider than one
// register: d8 on AVX2, f8 and d8 on SSE2) and on single elements for the remainder (Width<1>:
// plain scalars). The same core/norm_math.h formulas run on both: the block types support the
// same operators, with scalars broadcast.
//
// Every block stays in registers and is loaded and stored with full-width moves (issue 13): no
// std::memcpy into a vector, no vector type wider than the hardware's, no std::pair of blocks
// (each of these made GCC 12 move blocks through the stack in narrower pieces and reload them
// whole, a store-forwarding stall per block). tools/check_vector_moves.py scans the built module
// for that pattern; CI runs it.
//
// Summation order is fixed by the source (see lane_sum), so every build gives the same bits.
// Streaming (non-temporal) stores are used for outputs far larger than the caches: they skip
// reading each output line before writing it (write-allocate), a third less memory traffic.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#include "core/activation.h"
#include "core/macros.h"
#include "core/types.h"

#if defined(__SSE2__) || defined(_M_X64)
#include <immintrin.h>
#define NK_HAVE_STREAM 1
#endif
#if defined(__GNUC__) || defined(__clang__)
#define NK_HAVE_VECTOR_EXT 1
#endif
#if defined(NK_HAVE_VECTOR_EXT) && defined(NK_HAVE_STREAM)
#define NK_WIDE_FLOAT 1  // blocks of several independent float vectors (fwide) for elementwise_wide
#endif

namespace nk::cpu {

template <int W> struct Width {
  static constexpr int value = W;
};

// ---- types --------------------------------------------------------------------------------
// f8 (8 floats) and d8 (8 doubles) are the blocks the kernels compute on. Each must live in
// registers of the build's instruction set: a GCC vector wider than the hardware's (d8 on AVX2,
// f8 and d8 on SSE2) is kept in a stack slot and copied around in pieces, so those blocks are
// Pack structs of native vectors instead (two ymm for d8 on AVX2; two or four xmm on SSE2), with
// the same operators element by element. The arithmetic, and therefore every bit, is the same.
#if defined(NK_HAVE_VECTOR_EXT)
constexpr int kBlock = 8;
typedef float f4 __attribute__((vector_size(16)));
typedef double d2 __attribute__((vector_size(16)));
typedef double d4 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef float f8v __attribute__((vector_size(32)));
typedef double d8v __attribute__((vector_size(64)));
// 16 floats: one zmm register (AVX-512 only).
typedef float f16v __attribute__((vector_size(64)));
// Memory is read and written through unaligned, may_alias views of native vectors: a plain
// dereference, which every compiler turns into one full-width move. Never std::memcpy into a
// vector: under generic tuning GCC 12 copies 32 bytes as two 16-byte stores to a stack slot and
// reloads the slot as one 32-byte vector, and store-to-load forwarding cannot merge two stores
// into one wider load (a stall on every block; issue 13, tools/check_vector_moves.py).
template <class V> struct Unaligned;
#define NK_UNALIGNED(V)                                                                  \
  template <> struct Unaligned<V> {                                                     \
    typedef V type __attribute__((aligned(1), may_alias));                              \
  };
NK_UNALIGNED(f4)
NK_UNALIGNED(d2)
NK_UNALIGNED(d4)
NK_UNALIGNED(u16x8)
NK_UNALIGNED(f8v)
NK_UNALIGNED(d8v)
NK_UNALIGNED(f16v)
#undef NK_UNALIGNED
template <class V, class E> NK_INLINE V load_native(const E* p) {
  return *reinterpret_cast<const typename Unaligned<V>::type*>(p);
}
template <class V, class E> NK_INLINE void store_native(E* p, V v) {
  *reinterpret_cast<typename Unaligned<V>::type*>(p) = v;
}

// K (2 or 4) native vectors V as one block, as named members (an array member keeps GCC from
// splitting the struct into registers); operators act part by part, scalars broadcast.
template <class V, int K> struct Pack;
#define NK_PACK_OPS(op)                                                                       \
  friend NK_INLINE Pack operator op(const Pack& a, const Pack& b) { return a.map([&](auto i) { \
      return a.template part<i>() op b.template part<i>(); }); }                               \
  friend NK_INLINE Pack operator op(const Pack& a, elem b) { return a.map([&](auto i) {       \
      return a.template part<i>() op b; }); }                                                   \
  friend NK_INLINE Pack operator op(elem a, const Pack& b) { return b.map([&](auto i) {       \
      return a op b.template part<i>(); }); }                                                   \
  NK_INLINE Pack& operator op##=(const Pack& b) { return *this = *this op b; }
#define NK_PACK_BODY                                                                          \
  using elem = std::remove_cv_t<std::remove_reference_t<decltype(V{}[0])>>;                  \
  static constexpr int kPer = static_cast<int>(sizeof(V) / sizeof(elem));                    \
  NK_INLINE elem operator[](int i) const {                                                    \
    elem out = elem(0);                                                                       \
    for_parts([&](auto k) {                                                                   \
      if (i / kPer == k) out = part<k>()[i % kPer];                                           \
    });                                                                                       \
    return out;                                                                               \
  }                                                                                           \
  template <class F> NK_INLINE Pack map(F&& f) const {                                        \
    Pack r;                                                                                   \
    for_parts([&](auto k) { r.template part<k>() = f(k); });                                  \
    return r;                                                                                 \
  }                                                                                           \
  friend NK_INLINE Pack operator-(const Pack& a) {                                            \
    return a.map([&](auto i) { return -a.template part<i>(); });                              \
  }                                                                                           \
  NK_PACK_OPS(+)                                                                              \
  NK_PACK_OPS(-)                                                                              \
  NK_PACK_OPS(*)                                                                              \
  NK_PACK_OPS(/)
template <class V> struct Pack<V, 2> {
  static constexpr int kParts = 2;
  V v0, v1;
  template <int I> NK_INLINE V& part() { return I == 0 ? v0 : v1; }
  template <int I> NK_INLINE const V& part() const { return I == 0 ? v0 : v1; }
  template <class F> static NK_INLINE void for_parts(F&& f) {
    f(std::integral_constant<int, 0>{});
    f(std::integral_constant<int, 1>{});
  }
  NK_PACK_BODY
};
template <class V> struct Pack<V, 4> {
  static constexpr int kParts = 4;
  V v0, v1, v2, v3;
  template <int I> NK_INLINE V& part() { return I == 0 ? v0 : I == 1 ? v1 : I == 2 ? v2 : v3; }
  template <int I> NK_INLINE const V& part() const {
    return I == 0 ? v0 : I == 1 ? v1 : I == 2 ? v2 : v3;
  }
  template <class F> static NK_INLINE void for_parts(F&& f) {
    f(std::integral_constant<int, 0>{});
    f(std::integral_constant<int, 1>{});
    f(std::integral_constant<int, 2>{});
    f(std::integral_constant<int, 3>{});
  }
  NK_PACK_BODY
};
#undef NK_PACK_BODY
#undef NK_PACK_OPS

#if defined(__AVX512F__)
using f8 = f8v;
using d8 = d8v;
#elif defined(__AVX__)
using f8 = f8v;
using d8 = Pack<d4, 2>;
#else
using f8 = Pack<f4, 2>;
using d8 = Pack<d2, 4>;
#endif
template <class C> struct Vec8;
template <> struct Vec8<float> { using type = f8; };
template <> struct Vec8<double> { using type = d8; };
template <class C> using vec8 = typename Vec8<C>::type;

// The block of elementwise_wide, for float work bound by arithmetic rather than memory (the fused
// SiLU: an exp, a division and ~40 dependent operations per element). One vector's chain of
// operations is longer than the out-of-order window can overlap with the next block's, so such a
// loop runs at the chain's latency; a block of several independent vectors, operated on part by
// part (Pack), gives the scheduler independent work at every step. Parts per block: AVX-512 two
// zmm (32 floats), AVX2 four ymm (32), SSE2 four xmm (16). Measured below elementwise_wide.
#if defined(__AVX512F__)
using fwide = Pack<f16v, 2>;
#elif defined(__AVX__)
using fwide = Pack<f8v, 4>;
#else
using fwide = Pack<f4, 4>;
#endif
constexpr int kWide = static_cast<int>(sizeof(fwide) / sizeof(float));

// Lane access by a constant index, and a block of -0.0 (-0.0 + t = t exactly).
template <int I, class V> NK_INLINE void set_lane(V& b, double x) { b[I] = x; }
template <int I, class V, int K> NK_INLINE void set_lane(Pack<V, K>& b, double x) {
  b.template part<I / Pack<V, K>::kPer>()[I % Pack<V, K>::kPer] = x;
}
template <class B> NK_INLINE B neg_zero() {
  B b = {};
  return -b;
}
#else
constexpr int kBlock = 1;
#endif

// ---- the non-arithmetic steps of core/activation.h, for blocks as well as scalars ------------
// where_pos(z, a, b): a where z > 0, else b (a, b blocks or scalars); zero_below(a, lim, v): 0
// where a < lim, else v; scale_pow2(p, t): p * 2^n with n in t's low mantissa bits. On blocks
// these are lane-wise bit selections, the same values as ScalarOps gives per element.
#if defined(NK_HAVE_VECTOR_EXT)
typedef uint64_t u64x2 __attribute__((vector_size(16)));
typedef uint64_t u64x4 __attribute__((vector_size(32)));
typedef uint64_t u64x8 __attribute__((vector_size(64)));
template <class V> struct LaneBits;
template <> struct LaneBits<f4> { using type = u32x4; };
template <> struct LaneBits<f8v> { using type = u32x8; };
template <> struct LaneBits<d2> { using type = u64x2; };
template <> struct LaneBits<d4> { using type = u64x4; };
template <> struct LaneBits<d8v> { using type = u64x8; };
#if defined(__AVX512F__)
typedef uint32_t u32x16 __attribute__((vector_size(64)));
template <> struct LaneBits<f16v> { using type = u32x16; };
#endif
template <class V> struct IsPack : std::false_type {};
template <class V, int K> struct IsPack<Pack<V, K>> : std::true_type {};
#endif

struct BlockOps {
#if defined(NK_HAVE_VECTOR_EXT)
 private:
  template <class V, class A> static NK_INLINE V as_block(A a) {
    if constexpr (std::is_same_v<A, V>)
      return a;
    else
      return V{} + a;  // a scalar, broadcast (only 0 and 1 are passed)
  }
  template <int K, class A> static NK_INLINE auto part_of(const A& a) {
    if constexpr (IsPack<A>::value)
      return a.template part<K>();
    else
      return a;
  }

 public:
  template <class V, class A, class B> static NK_INLINE V where_pos(V z, A a, B b) {
    if constexpr (std::is_arithmetic_v<V>) {
      return ScalarOps::where_pos(z, a, b);
    } else if constexpr (IsPack<V>::value) {
      return z.map([&](auto k) { return where_pos(z.template part<k>(), part_of<k>(a), part_of<k>(b)); });
    } else {
#if defined(__AVX__) && !defined(__AVX512F__)
      return z > V{} ? as_block<V>(a) : as_block<V>(b);  // one blend (vblendvps / vblendvpd)
#else
      // (m & a) | (~m & b): on AVX-512 the vector ?: became a k-mask select, and GCC 12 then
      // spilled three lane sums of the masked statistics loop to the stack; SSE2 has no blend
      using U = typename LaneBits<V>::type;
      const U m = (U)(z > V{});
      return (V)((m & (U)as_block<V>(a)) | (~m & (U)as_block<V>(b)));
#endif
    }
  }
  template <class V> static NK_INLINE V neg_abs(V z) {
    if constexpr (std::is_arithmetic_v<V>) {
      return ScalarOps::neg_abs(z);
    } else if constexpr (IsPack<V>::value) {
      return z.map([&](auto k) { return neg_abs(z.template part<k>()); });
    } else {
      using U = typename LaneBits<V>::type;
      using E = std::remove_cv_t<std::remove_reference_t<decltype(z[0])>>;
      using B = typename ExpConst<E>::Bits;
      return (V)((U)z | (U{} + (B{1} << (8 * sizeof(E) - 1))));
    }
  }
  template <class V, class L> static NK_INLINE V zero_below(V a, L lim, V v) {
    if constexpr (std::is_arithmetic_v<V>) {
      return ScalarOps::zero_below(a, lim, v);
    } else if constexpr (IsPack<V>::value) {
      return a.map([&](auto k) { return zero_below(a.template part<k>(), lim, v.template part<k>()); });
    } else {
      using U = typename LaneBits<V>::type;
      return (V)(~(U)(a < V{} + lim) & (U)v);
    }
  }
  template <class V> static NK_INLINE V scale_pow2(V p, V t) {
    if constexpr (std::is_arithmetic_v<V>) {
      return ScalarOps::scale_pow2(p, t);
    } else if constexpr (IsPack<V>::value) {
      return p.map([&](auto k) { return scale_pow2(p.template part<k>(), t.template part<k>()); });
    } else {
      using U = typename LaneBits<V>::type;
      using K = ExpConst<std::remove_cv_t<std::remove_reference_t<decltype(p[0])>>>;
      const U sb = ((U)t - K::kMagicBits + K::kBias) << K::kMantissa;
      return p * (V)sb;
    }
  }
#else
  template <class V, class A, class B> static NK_INLINE V where_pos(V z, A a, B b) {
    return ScalarOps::where_pos(z, a, b);
  }
  template <class V> static NK_INLINE V neg_abs(V z) { return ScalarOps::neg_abs(z); }
  template <class V, class L> static NK_INLINE V zero_below(V a, L lim, V v) {
    return ScalarOps::zero_below(a, lim, v);
  }
  template <class V> static NK_INLINE V scale_pow2(V p, V t) { return ScalarOps::scale_pow2(p, t); }
#endif
};

// Two values returned together (the kernels' two-sum lambdas). A plain aggregate, not std::pair:
// GCC 12 does not split a std::pair of Pack blocks into registers and copies it through the
// stack in 8- and 16-byte pieces (tools/check_vector_moves.py flags the reloads).
template <class A, class B> struct Two {
  A first;
  B second;
};
template <class A, class B> NK_INLINE Two<A, B> two(A a, B b) { return Two<A, B>{a, b}; }

// ---- loads: storage type T -> compute type (scalar or block of 8) ------------------------------
template <class T> NK_INLINE compute_t<T> loadw(const T* p, Width<1>) { return load(*p); }
NK_INLINE float loadw(const float* p, Width<1>) { return *p; }
NK_INLINE double loadw(const double* p, Width<1>) { return *p; }

#if defined(NK_HAVE_VECTOR_EXT)
template <class B, class E> NK_INLINE B load_block(const E* p) {
  if constexpr (std::is_same_v<B, f8v> || std::is_same_v<B, d8v>) {
    return load_native<B>(p);
  } else {
    B b;
    B::for_parts([&](auto k) {
      using V = std::remove_reference_t<decltype(b.template part<k>())>;
      b.template part<k>() = load_native<V>(p + k * B::kPer);
    });
    return b;
  }
}
template <class B, class E> NK_INLINE void store_block(E* p, const B& b) {
  if constexpr (std::is_same_v<B, f8v> || std::is_same_v<B, d8v>) {
    store_native(p, b);
  } else {
    B::for_parts([&](auto k) { store_native(p + k * B::kPer, b.template part<k>()); });
  }
}
NK_INLINE f8 loadw(const float* p, Width<8>) { return load_block<f8>(p); }
#if defined(NK_WIDE_FLOAT)
NK_INLINE fwide loadw(const float* p, Width<kWide>) { return load_block<fwide>(p); }
#endif
NK_INLINE d8 loadw(const double* p, Width<8>) { return load_block<d8>(p); }
// bfloat16 -> float: the 16 bits become the high half of the float's bits.
NK_INLINE f8 loadw(const bfloat16* p, Width<8>) {
  const u16x8 b = load_native<u16x8>(p);
#if defined(__AVX__)
  return (f8)(__builtin_convertvector(b, u32x8) << 16);  // same-size cast: the bits, in registers
#else
  const __m128i zero = _mm_setzero_si128();
  return f8{(f4)_mm_unpacklo_epi16(zero, (__m128i)b), (f4)_mm_unpackhi_epi16(zero, (__m128i)b)};
#endif
}
#if !defined(__F16C__)
// 4 halves (zero-extended to 32 bits) -> 4 floats, as half_to_float in core/types.h: normal
// numbers re-biased, inf/NaN keep their payload, subnormals m * 2^-24 (exact in float).
NK_INLINE f4 half4_to_float(u32x4 u) {
  const u32x4 sign = (u & 0x8000u) << 16;
  const u32x4 e = (u >> 10) & 0x1fu;
  const u32x4 m = u & 0x3ffu;
  const u32x4 normal = ((e + 112u) << 23) | (m << 13);
  const u32x4 special = 0x7f800000u | (m << 13);
  const u32x4 sub = (u32x4)(__builtin_convertvector((i32x4)m, f4) * 5.9604644775390625e-8f);
  const u32x4 is_special = (u32x4)(e == 0x1fu), is_zero_e = (u32x4)(e == 0u);
  const u32x4 r = (is_special & special) | (is_zero_e & sub) | (~(is_special | is_zero_e) & normal);
  return (f4)(r | sign);
}
#endif
NK_INLINE f8 loadw(const half* p, Width<8>) {
#if defined(__F16C__)
  return (f8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  const __m128i h = (__m128i)load_native<u16x8>(p), zero = _mm_setzero_si128();
  return f8{half4_to_float((u32x4)_mm_unpacklo_epi16(h, zero)),
             half4_to_float((u32x4)_mm_unpackhi_epi16(h, zero))};
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
#elif defined(__AVX__)
  return d8{(d4)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)v)),
             (d4)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)v, 1))};
#else
  const __m128 lo = (__m128)v.v0, hi = (__m128)v.v1;
  return d8{(d2)_mm_cvtps_pd(lo), (d2)_mm_cvtps_pd(_mm_movehl_ps(lo, lo)), (d2)_mm_cvtps_pd(hi),
             (d2)_mm_cvtps_pd(_mm_movehl_ps(hi, hi))};
#endif
}
NK_INLINE d8 widen(d8 v) { return v; }
#endif

// p[0..w) loaded and widened to double. Float blocks are converted straight from memory
// (vcvtps2pd with a memory operand, 4 or 8 floats at a time), without the register shuffles of
// widen(loadw(p, w)) (AVX2: a vextractf128 per 8 floats, SSE2: two movhlps). Same values (the
// conversion is exact). LayerNorm (512, 768) float32 forward (its statistics pass), 1 thread, AMD
// EPYC (Zen 4), 2026-12-08, interleaved processes: AVX2 0.112 -> 0.103 ms, SSE2 0.19 -> 0.18 ms;
// the memory-bound channel statistics (BatchNorm, GroupNorm) within noise. Same bits.
template <class T, int W> NK_INLINE auto load_wide(const T* p, Width<W> w) { return widen(loadw(p, w)); }
#if defined(NK_HAVE_VECTOR_EXT)
NK_INLINE d8 load_wide(const float* p, Width<8>) {
#if defined(__AVX512F__)
  return (d8)_mm512_maskz_cvtps_pd(static_cast<__mmask8>(0xff), _mm256_loadu_ps(p));  // as widen
#elif defined(__AVX__)
  return d8{(d4)_mm256_cvtps_pd(_mm_loadu_ps(p)), (d4)_mm256_cvtps_pd(_mm_loadu_ps(p + 4))};
#else
  const auto half2 = [](const float* q) {  // movq: two floats
    return _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  };
  return d8{(d2)_mm_cvtps_pd(half2(p)), (d2)_mm_cvtps_pd(half2(p + 2)), (d2)_mm_cvtps_pd(half2(p + 4)),
             (d2)_mm_cvtps_pd(half2(p + 6))};
#endif
}
#endif

// ---- stores: compute type -> storage type, ordinary or streaming -------------------------------
template <class T> NK_INLINE void storew(T* p, compute_t<T> v, Width<1>) { *p = store<T>(v); }

#if defined(NK_HAVE_VECTOR_EXT)
NK_INLINE void pack8(float* out, f8 v) { store_block(out, v); }
NK_INLINE void pack8(double* out, d8 v) { store_block(out, v); }

// 16-byte part I of a block, from the registers (a shuffle; vextractf128 on AVX).
template <int I, class V> NK_INLINE auto part16(const V& v) {
  if constexpr (sizeof(v[0]) == 4)
    return (__m128)__builtin_shufflevector(v, v, 4 * I, 4 * I + 1, 4 * I + 2, 4 * I + 3);
  else
    return (__m128d)__builtin_shufflevector(v, v, 2 * I, 2 * I + 1);
}
template <int I, class V, int K> NK_INLINE auto part16(const Pack<V, K>& b) {
  constexpr int kParts = static_cast<int>(sizeof(V) / 16);
  return part16<I % kParts>(b.template part<I / kParts>());
}

// float -> bfloat16 bits: round to nearest even; NaN made quiet (float_to_bfloat16, core/types.h)
template <class U> NK_INLINE U to_bfloat16_bits(U u) {
  const U is_nan = (U)((u & 0x7fffffffu) > 0x7f800000u);
  const U rounded = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  return (is_nan & ((u >> 16) | 0x40u)) | (~is_nan & rounded);
}
// 8 bfloat16 in one 16-byte register.
NK_INLINE u16x8 to_bfloat16x8(f8 v) {
#if defined(__AVX__)
  return __builtin_convertvector(to_bfloat16_bits((u32x8)v), u16x8);
#else
  const u16x8 lo = (u16x8)to_bfloat16_bits((u32x4)v.v0);
  const u16x8 hi = (u16x8)to_bfloat16_bits((u32x4)v.v1);
  return __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);  // the low 16 bits of each
#endif
}
NK_INLINE void pack8(bfloat16* out, f8 v) { store_native(out, to_bfloat16x8(v)); }
NK_INLINE void pack8(half* out, f8 v) {
#if defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int k = 0; k < 8; ++k) out[k].bits = float_to_half(v[k]);
#endif
}
template <class T> NK_INLINE void storew(T* p, vec8<compute_t<T>> v, Width<8>) { pack8(p, v); }
NK_INLINE void storew(double* p, double v, Width<1>) { *p = v; }
#if defined(NK_WIDE_FLOAT)
NK_INLINE void storew(float* p, const fwide& v, Width<kWide>) { store_block(p, v); }
#endif

// A block of 8 elements as full-width streaming stores from the registers (one 32-byte store of
// 8 floats on AVX, 64 bytes of doubles in one store on AVX-512, two on AVX, four 16-byte ones on
// SSE2); p must be aligned to the block's size (whole_lines below gives 64-byte lines).
// Full width matters when the loop is slow (fewer partly written lines waiting in the write-
// combining buffers): GroupNorm (32, 256, 28, 28) + SiLU on the AVX2 build, its apply then a
// second sweep over x, 1 thread, 2026-12-07, Xeon: 17.2 ms with two 16-byte stores per 8 floats,
// 13.9 ms with one 32-byte store.
#if defined(NK_HAVE_STREAM)
NK_INLINE void stream_block(float* p, f8 v) {
#if defined(__AVX__)
  _mm256_stream_ps(p, (__m256)v);
#else
  _mm_stream_ps(p, part16<0>(v));
  _mm_stream_ps(p + 4, part16<1>(v));
#endif
}
NK_INLINE void stream_block(double* p, d8 v) {
#if defined(__AVX512F__)
  _mm512_stream_pd(p, (__m512d)v);
#elif defined(__AVX__)
  _mm256_stream_pd(p, (__m256d)v.v0);
  _mm256_stream_pd(p + 4, (__m256d)v.v1);
#else
  _mm_stream_pd(p, part16<0>(v));
  _mm_stream_pd(p + 2, part16<1>(v));
  _mm_stream_pd(p + 4, part16<2>(v));
  _mm_stream_pd(p + 6, part16<3>(v));
#endif
}
NK_INLINE void stream_block(bfloat16* p, f8 v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), (__m128i)to_bfloat16x8(v));
}
NK_INLINE void stream_block(half* p, f8 v) {
#if defined(__F16C__)
  _mm_stream_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  pack8(p, v);  // scalar conversions without F16C: ordinary stores
#endif
}
#else
template <class T> NK_INLINE void stream_block(T* p, vec8<compute_t<T>> v) { pack8(p, v); }
#endif
#endif

#if defined(NK_WIDE_FLOAT)
NK_INLINE void stream_block(float* p, const fwide& v) {  // p 64-aligned
  fwide::for_parts([&](auto k) {
    const auto part = v.template part<k>();
    float* q = p + k * fwide::kPer;
#if defined(__AVX512F__)
    _mm512_stream_ps(q, (__m512)part);
#elif defined(__AVX__)
    _mm256_stream_ps(q, (__m256)part);
#else
    _mm_stream_ps(q, (__m128)part);
#endif
  });
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

// A row that does not start and end on cache-line boundaries streams only when it is at least
// this long. NumPy's allocator aligns data to 16 bytes, not 64, so `out=` arrays (and every row of
// them) usually start mid-line; on a short row the ordinary stores of the edges, between the
// streamed lines, cost more than streaming saves. Measured (Xeon, AVX-512, 1 thread): channels-
// last BatchNorm (32, 56, 56, 64) forward, 256-byte rows, y 16 or 48 bytes past a line: 7.5 and
// 6.8 ms streamed, 3.8-4.1 ms not (y on a line boundary: 3.6 ms streamed). Rows from 512 bytes
// on stream as before: for 784-byte planes (BatchNorm (256, 256, 14, 14)) and 800-byte rows
// (LayerNorm (40000, 200)) the two choices were within this machine's run-to-run noise (10-15 %),
// and LayerNorm's 4-KiB rows were slower unstreamed (4.7 against 3.9 ms).
constexpr int64_t kMinPartialStreamBytes = 512;

// The lines of out[0, n) to stream: whole_lines, or none when `stream` is false or the row is
// partial and short (above).
template <class T> NK_INLINE Lines stream_lines(const T* out, int64_t n, bool stream) {
  if (!stream) return Lines{};
  const Lines l = whole_lines(out, n);
  const bool whole = l.head == 0 && l.end == n;
  if (!whole && n * static_cast<int64_t>(sizeof(T)) < kMinPartialStreamBytes) return Lines{};
  return l;
}

// out[j] = f(j, width) for j in [0, n); whole cache lines with streaming stores when `stream`.
template <class T, class F> NK_INLINE void elementwise(int64_t n, T* out, bool stream, F&& f) {
  int64_t j = 0;
#if defined(NK_HAVE_VECTOR_EXT) && defined(NK_HAVE_STREAM)
  if (stream) {
    const Lines l = stream_lines(out, n, stream);
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

// Rows of at least this many bytes (a page) have the rows ahead prefetched by the kernels that
// walk rows (row_norm.cpp, channel_norm.cpp's row traversal): each such row starts on a new
// page, where the hardware prefetchers start cold. Measurements with each use.
constexpr int64_t kPrefetchRowBytes = 4096;

// Prefetch (into L2) the cache line holding p[0] when a block of W elements starting at p begins
// a line: called with the same offset as a walk over elements, it prefetches each line once.
// kWrite: the line is about to be written. p == nullptr: nothing.
template <bool kWrite = false, class T, int W> NK_INLINE void prefetch_line_once(const T* p, Width<W>) {
  constexpr auto kBytes = static_cast<uintptr_t>(W * sizeof(T));
  if constexpr (kBytes > 64) {  // a block of several lines: each of them (p + kBytes: the next block's)
    if (p)
      for (uintptr_t k = 0; k < kBytes; k += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(p) + k, kWrite ? 1 : 0, 2);
  } else if (p && (reinterpret_cast<uintptr_t>(p) & 63) < kBytes) {
    __builtin_prefetch(p, kWrite ? 1 : 0, 2);
  }
}

// Prefetch (into L2) the cache line holding p, on every call. Where prefetch_line_once's
// conditional prefetches vanished from the build (GCC 12, the float instantiations of the row
// traversal's backward sums: not one prefetch instruction in the object), this form stays; a
// second prefetch of a line in flight costs one instruction.
template <class T> NK_INLINE void prefetch_line(const T* p) { __builtin_prefetch(p, 0, 2); }

// elementwise for float outputs whose f is bound by arithmetic: blocks of kWide floats (fwide,
// several independent vectors), then elementwise's blocks of 8 and single elements for the rest.
// f must give the same bits per element whatever the width (the kernels' lane-wise formulas do).
// GroupNorm (32, 256, 28, 28) + SiLU forward, float32, 1 thread, AMD EPYC (Zen 4), 2026-12-07,
// medians in ms, AVX-512 / AVX2 / SSE2 (plain GroupNorm 1.9 / 2.0-2.2 / 3.1): one vector a block
// (one zmm, one ymm, two xmm) 6.5 / 9.0 / 14.2; fwide 6.0-6.1 / 7.6 (two ymm: 8.0) / 14.3-14.4;
// with sigmoid_of's -|z| as one logical operation as well 5.5-5.7 / 6.9 / 12.0; where_pos as
// one blend on AVX2: 6.5-6.6 on AVX2. Same bits. The
// AVX2 loop keeps most constants in memory operands (16 ymm registers); those loads are cheaper
// than the chains' stalls.
template <class T, class F> NK_INLINE void elementwise_wide(int64_t n, T* out, bool stream, F&& f) {
#if defined(NK_WIDE_FLOAT)
  if constexpr (std::is_same_v<T, float>) {
    int64_t j = 0;
    const Lines l = stream_lines(out, n, stream);
    if (l.end > l.head) {  // [head, end) is whole 64-byte lines: wide blocks, then 8 at a time
      for (; j < l.head; ++j) storew(out + j, f(j, Width<1>{}), Width<1>{});
      for (; j + kWide <= l.end; j += kWide) stream_block(out + j, f(j, Width<kWide>{}));
      for (; j < l.end; j += kBlock) stream_block(out + j, f(j, Width<8>{}));
    }
    for (; j + kWide <= n; j += kWide) storew(out + j, f(j, Width<kWide>{}), Width<kWide>{});
    elementwise(n - j, out + j, false, [&](int64_t i, auto w) { return f(j + i, w); });
    return;
  }
#endif
  elementwise(n, out, stream, f);
}

// Store one value or block; blocks stream when `stream` (p must then be aligned to the block).
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
NK_INLINE void add_to(double* p, d8 v) { store_block(p, load_block<d8>(p) + v); }
#endif

}  // namespace nk::cpu

// The SIMD layer of the cpu backend's kernels: one vector type of the build's native width, a register
// tile sized to its register file, streaming stores, stream compaction and denormal flushing, for
// AVX-512, AVX2+FMA and NEON (SSE2 as the portable floor). The level is chosen when building
// (MESIMP_CPU_ARCH -> -march); everything here follows from the compiler's predefined macros.
//
// Why native width: a GCC vector wider than the target's registers (a 64-byte vector on AVX2) is
// lowered through the stack, element by element; the old 64-byte tiles ran the AVX2 weighted row sums
// at a few GFLOP/s, every FMA between stack loads and stores. With one register per vector and as many
// accumulators as the register file holds, every hot loop keeps its accumulators in registers.
//
// No torch here: the standalone check (tests/cpu_kernels_check.cpp) builds this and cpu_core.h for
// every level, ARM included, and runs them against scalar references.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace mesimp_cpu {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;  // zmm
constexpr const char* kSimd = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kVecBytes = 32;  // ymm
constexpr const char* kSimd = "avx2+fma";
#elif defined(__ARM_NEON)
constexpr int kVecBytes = 16;  // q registers
constexpr const char* kSimd = "neon";
#else
constexpr int kVecBytes = 16;  // SSE2 (any x86-64), or whatever 16-byte vectors the target has
constexpr const char* kSimd = "generic-128";
#endif

// One native vector (GCC vector extension) of T.
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = kVecBytes / sizeof(T);

// Vectors per accumulator set of a weighted row sum. Two sets (even and odd terms) run as independent
// FMA chains: 2 x 4 accumulators hide a 4-cycle FMA latency on two FMA pipes and leave room for the
// broadcast coefficients and loads in 16 registers (AVX2, SSE); AVX-512 and NEON have 32.
constexpr int kTileVecs = 4;
template <typename T>
constexpr int64_t kTile = kTileVecs * kLanes<T>;

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));  // one unaligned vector load
  return v;
}

template <typename T>
inline void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline Vec<T> broadcast(T c) {
  return Vec<T>{} + c;
}

// A large output written once (dW of a wide layer) goes around the caches: one memory write per line
// instead of a read for ownership plus a write, and the caches keep x and W. x86 only (AVX2 and
// AVX-512); NEON has no streaming store worth the name, so ARM writes through the caches.
constexpr int64_t kStreamBytes = int64_t(8) << 20;
#if defined(__AVX2__) || defined(__AVX512F__)
constexpr bool kHasStream = true;
#else
constexpr bool kHasStream = false;
#endif

// Whether rows of row_bytes starting at base (total_bytes in all) take streaming stores.
inline bool streamable(const void* base, int64_t row_bytes, int64_t total_bytes) {
  return kHasStream && reinterpret_cast<uintptr_t>(base) % kVecBytes == 0 && row_bytes % kVecBytes == 0 &&
         total_bytes >= kStreamBytes;
}

// Store of one vector to a kVecBytes-aligned address, around the caches where the target can.
template <typename T>
inline void store_stream(T* p, const Vec<T>& v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) {
    _mm512_stream_ps(reinterpret_cast<float*>(p), (__m512)v);
  } else {
    _mm512_stream_pd(reinterpret_cast<double*>(p), (__m512d)v);
  }
#elif defined(__AVX2__)
  if constexpr (sizeof(T) == 4) {
    _mm256_stream_ps(reinterpret_cast<float*>(p), (__m256)v);
  } else {
    _mm256_stream_pd(reinterpret_cast<double*>(p), (__m256d)v);
  }
#else
  store(p, v);
#endif
}

// Orders a task's streaming stores before the thread pool's barrier publishes them.
inline void stream_fence() {
#if defined(__AVX2__) || defined(__AVX512F__)
  _mm_sfence();
#endif
}

// Flushes subnormal results to zero and reads subnormal inputs as zero (x86 MXCSR FTZ and DAZ, ARM
// FPCR.FZ) in the calling thread while alive. Every parallel task that does arithmetic holds one: a
// gradient that has shrunk into the subnormal range (late in training, or behind a saturated unit) or
// an Adam moment that decays there would otherwise take a microcode assist per operation on x86, which
// made a layer's backward several times slower late in training. Values below 1.2e-38 (float) then
// count as zero, on every target alike.
class FlushDenormals {
 public:
#if defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#elif defined(__aarch64__)
  FlushDenormals() {
    asm volatile("mrs %0, fpcr" : "=r"(saved_));
    asm volatile("msr fpcr, %0" : : "r"(saved_ | (uint64_t(1) << 24)));
  }
  ~FlushDenormals() { asm volatile("msr fpcr, %0" : : "r"(saved_)); }

 private:
  uint64_t saved_;
#endif
};

#if defined(__AVX2__) && !defined(__AVX512F__)
// For each 8-bit mask, the lane indices of its set bits first: a permutation that compresses the
// lanes a compare kept to the front of a vector (AVX2 has no compress instruction).
struct CompressTable8 {
  alignas(32) int32_t lanes[256][8];
  constexpr CompressTable8() : lanes{} {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int i = 0; i < 8; ++i) {
        if (m >> i & 1) lanes[m][n++] = i;
      }
    }
  }
};
inline constexpr CompressTable8 kCompress8{};
#endif

#if defined(__ARM_NEON) && defined(__aarch64__)
// For each 4-bit mask, the byte shuffle (vqtbl1q_u8) that moves the kept 32-bit lanes to the front.
struct CompressTable4 {
  alignas(16) uint8_t bytes[16][16];
  constexpr CompressTable4() : bytes{} {
    for (int m = 0; m < 16; ++m) {
      int n = 0;
      for (int i = 0; i < 4; ++i) {
        if (m >> i & 1) {
          for (int b = 0; b < 4; ++b) bytes[m][4 * n + b] = uint8_t(4 * i + b);
          ++n;
        }
      }
      for (int b = 4 * n; b < 16; ++b) bytes[m][b] = 0xff;  // out of range: zero
    }
  }
};
inline constexpr CompressTable4 kCompress4{};
#endif

// Columns j < n with keys[j] >= lower, ascending, into out (which has room for n + 16 entries: whole
// vectors are stored); returns their count. 32-bit keys below 2^31 (float magnitudes) take the
// vector path; the tail and 64-bit keys the branch-free scalar loop.
template <typename K>
inline int64_t compact_at_least(const K* keys, int64_t n, K lower, int32_t* out) {
  int64_t count = 0, j = 0;
  if constexpr (sizeof(K) == 4) {
#if defined(__AVX512F__)
    const __m512i lo = _mm512_set1_epi32(static_cast<int32_t>(lower));  // keys < 2^31: signed compare is exact
    const __m512i step = _mm512_set1_epi32(16);
    __m512i col = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= n; j += 16, col = _mm512_add_epi32(col, step)) {
      const __mmask16 m = _mm512_cmpge_epi32_mask(_mm512_loadu_si512(keys + j), lo);
      _mm512_storeu_si512(out + count, _mm512_maskz_compress_epi32(m, col));
      count += __builtin_popcount(m);
    }
#elif defined(__AVX2__)
    const __m256i lo = _mm256_set1_epi32(static_cast<int32_t>(lower));
    const __m256i step = _mm256_set1_epi32(8);
    __m256i col = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; j + 8 <= n; j += 8, col = _mm256_add_epi32(col, step)) {
      const __m256i below = _mm256_cmpgt_epi32(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j)));
      const int m = ~_mm256_movemask_ps(_mm256_castsi256_ps(below)) & 0xff;
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress8.lanes[m]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + count), _mm256_permutevar8x32_epi32(col, perm));
      count += __builtin_popcount(m);
    }
#elif defined(__ARM_NEON) && defined(__aarch64__)
    const uint32x4_t lo = vdupq_n_u32(static_cast<uint32_t>(lower));
    const uint32x4_t bit = {1, 2, 4, 8};
    uint32x4_t col = {0, 1, 2, 3};
    for (; j + 4 <= n; j += 4, col = vaddq_u32(col, vdupq_n_u32(4))) {
      const uint32x4_t kept = vcgeq_u32(vld1q_u32(reinterpret_cast<const uint32_t*>(keys + j)), lo);
      const unsigned m = vaddvq_u32(vandq_u32(kept, bit));
      const uint8x16_t moved = vqtbl1q_u8(vreinterpretq_u8_u32(col), vld1q_u8(kCompress4.bytes[m]));
      vst1q_u32(reinterpret_cast<uint32_t*>(out + count), vreinterpretq_u32_u8(moved));
      count += __builtin_popcount(m);
    }
#endif
  }
  for (; j < n; ++j) {  // branch-free compaction
    out[count] = static_cast<int32_t>(j);
    count += keys[j] >= lower;
  }
  return count;
}

}  // namespace mesimp_cpu

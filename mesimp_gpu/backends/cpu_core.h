// The cpu backend's per-row kernels, without torch: selection of one row, the column buckets, the
// weighted row sums of dx and dW, and the row updates of the lazy optimizers. cpu_kernels.cpp shares
// them out to torch's thread pool; tests/cpu_kernels_check.cpp runs them alone, for every level (ARM
// under qemu), against scalar references.
//
// Selection works on the magnitude's bit pattern: for non-negative IEEE floats, integer order of
// the bits is numeric order, so every comparison is an exact, vectorisable integer compare, and
// a non-finite entry shows up as a key >= the bit pattern of +inf.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "cpu_simd.h"

namespace mesimp_cpu {

template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using key = uint32_t;
  static constexpr key abs_mask = 0x7fffffffu;
  static constexpr key inf = 0x7f800000u;
};
template <>
struct Bits<double> {
  using key = uint64_t;
  static constexpr key abs_mask = 0x7fffffffffffffffull;
  static constexpr key inf = 0x7ff0000000000000ull;
};

// Scratch of one selection call, reused across the rows a thread handles.
template <typename T>
struct SelectScratch {
  std::vector<typename Bits<T>::key> keys;  // (n,) magnitude keys of the row
  std::vector<typename Bits<T>::key> group_max;  // (k,) maximum key of each group
  std::vector<typename Bits<T>::key> cand_keys;  // (<= n,) keys of the candidates, reordered by nth_element
  std::vector<int32_t> cand;  // (<= n + 16,) candidate columns, ascending (slack for full-vector stores)

  SelectScratch(int64_t n, int64_t k) : keys(n), group_max(k), cand_keys(n), cand(n + 16) {}
};

// Below this many candidates nth_element is fastest; above it its mispredicted branches cost more
// than the radix passes.
constexpr int64_t kRadixFrom = 128;

// The k-th largest (1-based) of a[0:count); reorders a. Radix select from the most significant byte:
// a histogram of the current byte picks the bin that holds the k-th largest, its members move to the
// front, and the next byte refines among them, down to a few candidates for nth_element.
template <typename K>
K kth_largest(K* a, int64_t count, int64_t k) {
  for (int shift = 8 * int(sizeof(K)) - 8; count >= kRadixFrom && shift >= 0; shift -= 8) {
    int64_t hist[256] = {};
    for (int64_t i = 0; i < count; ++i) ++hist[(a[i] >> shift) & 0xff];
    int bin = 255;
    for (; hist[bin] < k; --bin) k -= hist[bin];  // bins above the k-th largest hold fewer than k keys
    int64_t kept = 0;
    for (int64_t i = 0; i < count; ++i) {  // branch-free compaction of the bin's keys
      a[kept] = a[i];
      kept += ((a[i] >> shift) & 0xff) == K(bin);
    }
    count = kept;
  }
  std::nth_element(a, a + (k - 1), a + count, std::greater<K>());
  return a[k - 1];
}

// Top-k of one row of n entries by magnitude, ties to the lower column; writes k ascending columns.
// Returns false when the row holds NaN or infinity (out is then unspecified).
//
// Threshold selection in O(n): split the row into k groups (column j goes to group j mod k); the
// smallest group maximum is a lower bound of the k-th largest magnitude (k disjoint groups each hold
// an entry >= it), so only entries at or above it are candidates (a few times k for dense data).
// The exact k-th largest key among the candidates (nth_element) is the threshold; keys above it are
// kept and keys equal to it fill the remaining slots from the lowest column up.
template <typename T>
bool select_row(const T* row, int64_t n, int64_t k, int64_t* out, SelectScratch<T>& s) {
  using K = typename Bits<T>::key;
  K* keys = s.keys.data();
  for (int64_t j = 0; j < n; ++j) {
    K bits;
    std::memcpy(&bits, row + j, sizeof(K));
    keys[j] = bits & Bits<T>::abs_mask;
  }
  K* gmax = s.group_max.data();
  std::memcpy(gmax, keys, k * sizeof(K));
  for (int64_t r = k; r < n; r += k) {  // strided groups: a vertical max over rows of k keys
    const int64_t width = std::min(k, n - r);
    const K* kr = keys + r;
    for (int64_t c = 0; c < width; ++c) gmax[c] = std::max(gmax[c], kr[c]);
  }
  K lower = gmax[0], top = gmax[0];
  for (int64_t c = 1; c < k; ++c) {
    lower = std::min(lower, gmax[c]);
    top = std::max(top, gmax[c]);
  }
  if (top >= Bits<T>::inf) return false;

  int32_t* cand = s.cand.data();
  if (lower == 0) {
    // A group without a non-zero entry: a row of mostly zeros (the gradient behind inactive ReLUs).
    // The candidates are its non-zero entries; when there are at most k of them, the row keeps them
    // all plus its lowest zero columns, and no selection is needed.
    const int64_t nonzero = compact_at_least(keys, n, K(1), cand);
    if (nonzero <= k) {
      int64_t zeros_left = k - nonzero, kept = 0;
      for (int64_t j = 0; j < n; ++j) {  // branch-free merge in column order; kept reaches exactly k
        const int64_t zero = keys[j] == 0;
        const int64_t take = (1 - zero) | (zeros_left > 0);
        cand[kept] = static_cast<int32_t>(j);
        kept += take;
        zeros_left -= zero & take;
      }
      for (int64_t t = 0; t < k; ++t) out[t] = cand[t];
      return true;
    }
    lower = 1;
  }
  const int64_t count = compact_at_least(keys, n, lower, cand);
  K* ck = s.cand_keys.data();
  for (int64_t i = 0; i < count; ++i) ck[i] = keys[cand[i]];
  const K kth = kth_largest(ck, count, k);
  int64_t above = 0;
  for (int64_t i = 0; i < count; ++i) above += keys[cand[i]] > kth;
  // Keep keys above kth and the first k - above keys equal to it, compacted in place (branch-free:
  // for large k about half of the candidates are kept, and a branch would mispredict that often).
  int64_t ties_left = k - above;
  int64_t kept = 0;
  for (int64_t i = 0; i < count; ++i) {
    const K key = keys[cand[i]];
    const int64_t tie = (key == kth) & (ties_left > 0);
    cand[kept] = cand[i];
    kept += (key > kth) | tie;
    ties_left -= tie;
  }
  for (int64_t t = 0; t < k; ++t) out[t] = cand[t];
  return true;
}

// The kept (example, value) pairs grouped by column: column j owns pairs [start[j], start[j+1]),
// in ascending example order. A counting sort, O(B k + out).
template <typename T>
struct Buckets {
  std::vector<int64_t> start;  // (out + 1,)
  std::vector<int64_t> example;  // (B k,)
  std::vector<T> value;  // (B k,)
};

template <typename T>
Buckets<T> bucket_by_column(const T* g, const int64_t* idx, int64_t rows, int64_t n, int64_t k, int64_t* hits) {
  Buckets<T> bk;
  bk.start.assign(n + 1, 0);
  for (int64_t p = 0; p < rows * k; ++p) ++bk.start[idx[p] + 1];
  if (hits != nullptr) {
    for (int64_t j = 0; j < n; ++j) hits[j] += bk.start[j + 1];
  }
  for (int64_t j = 0; j < n; ++j) bk.start[j + 1] += bk.start[j];
  bk.example.resize(rows * k);
  bk.value.resize(rows * k);
  std::vector<int64_t> fill(bk.start.begin(), bk.start.end() - 1);
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t t = 0; t < k; ++t) {
      const int64_t j = idx[b * k + t];
      const int64_t p = fill[j]++;
      bk.example[p] = b;
      bk.value[p] = g[b * n + j];
    }
  }
  return bk;
}

// Terms per pass of a weighted row sum. A pass walks its rows of src side by side from the first
// column to the last, so the hardware prefetchers follow kTermBlock sequential streams; one pass over
// all k rows of a dx (k = 128 rows of a w far beyond the caches) interleaved k streams, too many to
// prefetch, and ran at the memory's latency rather than its bandwidth.
constexpr int64_t kTermBlock = 8;

// One pass: out[0:len] (+)= sum_t coef[t] * src[rows[t] * stride + 0:len] over terms <= kTermBlock,
// accumulated in registers so that each output element is loaded and stored once per pass. Even and odd
// terms go to separate accumulators (summed at the end) so that two independent FMA chains hide the FMA
// latency; the order of every sum is fixed. Accumulate: add to out (later passes) instead of writing it.
template <typename T, bool Stream, bool Accumulate>
inline void row_sum_pass(const T* src, int64_t stride, const int64_t* rows, const T* coef, int64_t terms, int64_t len,
                         T* out) {
  constexpr int64_t L = kLanes<T>;
  const int64_t pairs = terms & ~int64_t(1);
  int64_t i0 = 0;
  for (; i0 + kTile<T> <= len; i0 += kTile<T>) {
    Vec<T> a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
    if constexpr (Accumulate) {
      a0 = load(out + i0);
      a1 = load(out + i0 + L);
      a2 = load(out + i0 + 2 * L);
      a3 = load(out + i0 + 3 * L);
    }
    for (int64_t t = 0; t < pairs; t += 2) {
      const Vec<T> c = broadcast(coef[t]), d = broadcast(coef[t + 1]);
      const T* s = src + rows[t] * stride + i0;
      const T* u = src + rows[t + 1] * stride + i0;
      a0 += c * load(s);
      a1 += c * load(s + L);
      a2 += c * load(s + 2 * L);
      a3 += c * load(s + 3 * L);
      b0 += d * load(u);
      b1 += d * load(u + L);
      b2 += d * load(u + 2 * L);
      b3 += d * load(u + 3 * L);
    }
    if (pairs < terms) {
      const Vec<T> c = broadcast(coef[pairs]);
      const T* s = src + rows[pairs] * stride + i0;
      a0 += c * load(s);
      a1 += c * load(s + L);
      a2 += c * load(s + 2 * L);
      a3 += c * load(s + 3 * L);
    }
    a0 += b0;
    a1 += b1;
    a2 += b2;
    a3 += b3;
    if constexpr (Stream) {
      store_stream(out + i0, a0);
      store_stream(out + i0 + L, a1);
      store_stream(out + i0 + 2 * L, a2);
      store_stream(out + i0 + 3 * L, a3);
    } else {
      store(out + i0, a0);
      store(out + i0 + L, a1);
      store(out + i0 + 2 * L, a2);
      store(out + i0 + 3 * L, a3);
    }
  }
  for (; i0 + L <= len; i0 += L) {
    Vec<T> a = {}, b = {};
    if constexpr (Accumulate) a = load(out + i0);
    for (int64_t t = 0; t < pairs; t += 2) {
      a += broadcast(coef[t]) * load(src + rows[t] * stride + i0);
      b += broadcast(coef[t + 1]) * load(src + rows[t + 1] * stride + i0);
    }
    if (pairs < terms) a += broadcast(coef[pairs]) * load(src + rows[pairs] * stride + i0);
    a += b;
    if constexpr (Stream) {
      store_stream(out + i0, a);
    } else {
      store(out + i0, a);
    }
  }
  if (i0 < len) {  // fewer than one vector of columns left: the same even/odd sums, element by element,
    // so that every element's rounding is the same whatever the vector width (levels agree bit for bit)
    T a[L] = {}, b[L] = {};
    const int64_t rest = len - i0;
    if constexpr (Accumulate) std::memcpy(a, out + i0, rest * sizeof(T));
    for (int64_t t = 0; t < terms; ++t) {
      const T c = coef[t];
      const T* s = src + rows[t] * stride + i0;
      T* acc = t % 2 == 0 ? a : b;
      for (int64_t i = 0; i < rest; ++i) acc[i] += c * s[i];
    }
    for (int64_t i = 0; i < rest; ++i) a[i] += b[i];
    std::memcpy(out + i0, a, rest * sizeof(T));
  }
}

// out[0:len] = sum_t coef[t] * src[rows[t] * stride + 0:len], in passes of kTermBlock terms (the first
// writes out, the others add to it; only the last may stream, since a streamed line is not re-read
// cheaply). The order of every sum is fixed by the terms' order.
template <typename T, bool Stream>
inline void weighted_row_sum(const T* src, int64_t stride, const int64_t* rows, const T* coef, int64_t terms,
                             int64_t len, T* out) {
  if (terms <= kTermBlock) {
    row_sum_pass<T, Stream, false>(src, stride, rows, coef, terms, len, out);
    return;
  }
  row_sum_pass<T, false, false>(src, stride, rows, coef, kTermBlock, len, out);
  int64_t t = kTermBlock;
  for (; t + kTermBlock < terms; t += kTermBlock) {
    row_sum_pass<T, false, true>(src, stride, rows + t, coef + t, kTermBlock, len, out);
  }
  row_sum_pass<T, Stream, true>(src, stride, rows + t, coef + t, terms - t, len, out);
}

// One row of dx = G_k @ w: dx_row = sum_t g_row[cols[t]] * w[cols[t]]; coef is scratch of k entries.
template <typename T>
inline void dx_row(const T* g_row, const int64_t* cols, int64_t k, const T* w, int64_t n_in, T* coef, T* out) {
  for (int64_t t = 0; t < k; ++t) coef[t] = g_row[cols[t]];
  weighted_row_sum<T, false>(w, n_in, cols, coef, k, n_in, out);
}

// One contiguous run of n elements of the SGD, Adam and AdaGrad updates below. Separate functions
// with restrict pointers (the arrays are distinct tensors of the optimizer) so that the loops vectorise.
template <typename T>
void sgd_run(T* __restrict__ p, const T* __restrict__ grad, T* __restrict__ buf, int64_t n, T clip, T momentum,
             T step) {
  if (buf == nullptr) {
    for (int64_t j = 0; j < n; ++j) p[j] -= step * std::min(std::max(grad[j], -clip), clip);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    buf[j] = momentum * buf[j] + std::min(std::max(grad[j], -clip), clip);
    p[j] -= step * buf[j];
  }
}

template <typename T>
void adam_run(T* __restrict__ p, const T* __restrict__ grad, T* __restrict__ m, T* __restrict__ v, int64_t n,
              T clip, T b1, T b2, T step, T inv_bc2, T eps) {
  for (int64_t j = 0; j < n; ++j) {
    const T g = std::min(std::max(grad[j], -clip), clip);
    const T mj = m[j] + (1 - b1) * (g - m[j]);
    const T vj = b2 * v[j] + (1 - b2) * g * g;
    m[j] = mj;
    v[j] = vj;
    p[j] -= step * mj / (std::sqrt(vj) * inv_bc2 + eps);
  }
}

template <typename T>
void adagrad_run(T* __restrict__ p, const T* __restrict__ grad, T* __restrict__ sum, int64_t n, T clip, T step,
                 T eps) {
  for (int64_t j = 0; j < n; ++j) {
    const T g = std::min(std::max(grad[j], -clip), clip);
    const T sj = sum[j] + g * g;
    sum[j] = sj;
    p[j] -= step * g / (std::sqrt(sj) + eps);
  }
}

}  // namespace mesimp_cpu

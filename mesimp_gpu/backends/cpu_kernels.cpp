// Fused per-example meProp backward for CPU, built at run time by mesimp_gpu.backends.cpu.
//
// Shapes (PyTorch layout, y = x @ W.T):
//   g    [B, out]  gradient at the matmul output
//   x    [B, in]   layer input
//   w    [out, in] weight
//   idx  [B, k]    int64 kept columns per row, ascending
//   hits [out]     int64 meSimp counters (optional, incremented in place)
//
// Selection works on the magnitude's bit pattern: for non-negative IEEE floats, integer order of
// the bits is numeric order, so every comparison is an exact, vectorisable integer compare, and
// a non-finite entry shows up as a key >= the bit pattern of +inf.
//
// Both products are deterministic whatever the thread count: dx is split by rows of dx (one
// example per task), dW by rows of dW (one output column's bucket of examples per task), and the
// order of every sum is fixed by the data, never by the schedule.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

namespace {

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

// Columns of one register tile: 256 bytes, i.e. four AVX-512 or eight AVX2 registers of accumulators.
template <typename T>
constexpr int64_t kTile = 256 / sizeof(T);

// Scratch of one selection call, reused across the rows a thread handles.
template <typename T>
struct SelectScratch {
  std::vector<typename Bits<T>::key> keys;  // (n,) magnitude keys of the row
  std::vector<typename Bits<T>::key> cand_keys;  // (<= n,) keys of the candidates, reordered by nth_element
  std::vector<int64_t> cand;  // (<= n,) candidate columns, ascending
};

// Top-k of one row of n entries by magnitude, ties to the lower column; writes k ascending columns.
// Returns false when the row holds NaN or infinity (out is then unspecified).
//
// Threshold selection in O(n): cut the row into k chunks; the smallest chunk maximum is a lower
// bound of the k-th largest magnitude (k disjoint chunks each hold an entry >= it), so only entries
// at or above it are candidates (a few times k for dense data). The exact k-th largest key among
// the candidates (nth_element) is the threshold; keys above it are kept and keys equal to it fill
// the remaining slots from the lowest column up.
template <typename T>
bool select_row(const T* row, int64_t n, int64_t k, int64_t* out, SelectScratch<T>& s) {
  using K = typename Bits<T>::key;
  K* keys = s.keys.data();
  for (int64_t j = 0; j < n; ++j) {
    K bits;
    std::memcpy(&bits, row + j, sizeof(K));
    keys[j] = bits & Bits<T>::abs_mask;
  }
  K lower = ~K(0);
  K top = 0;
  for (int64_t c = 0; c < k; ++c) {
    const int64_t lo = c * n / k, hi = (c + 1) * n / k;
    K m = 0;
    for (int64_t j = lo; j < hi; ++j) m = std::max(m, keys[j]);
    lower = std::min(lower, m);
    top = std::max(top, m);
  }
  if (top >= Bits<T>::inf) return false;

  int64_t* cand = s.cand.data();
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) {  // branch-free compaction
    cand[count] = j;
    count += keys[j] >= lower;
  }
  K* ck = s.cand_keys.data();
  for (int64_t i = 0; i < count; ++i) ck[i] = keys[cand[i]];
  std::nth_element(ck, ck + (k - 1), ck + count, std::greater<K>());
  const K kth = ck[k - 1];
  int64_t above = 0;
  for (int64_t i = 0; i < count; ++i) above += ck[i] > kth;
  int64_t ties_left = k - above;
  int64_t kept = 0;
  for (int64_t i = 0; i < count && kept < k; ++i) {
    const K key = keys[cand[i]];
    const bool tie = key == kth && ties_left > 0;
    if (key > kth || tie) {
      out[kept++] = cand[i];
      ties_left -= tie;
    }
  }
  return true;
}

// Row-parallel top-k of |g| ([B, n]) into idx ([B, k]); returns false if any row is non-finite.
template <typename T>
bool select_rows(const T* g, int64_t rows, int64_t n, int64_t k, int64_t* idx) {
  std::atomic<bool> finite{true};
  const int64_t grain = std::max<int64_t>(1, 4096 / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    SelectScratch<T> s;
    s.keys.resize(n);
    s.cand_keys.resize(n);
    s.cand.resize(n + 1);  // the branch-free compaction writes one slot past the last candidate
    for (int64_t b = begin; b < end; ++b) {
      if (!select_row(g + b * n, n, k, idx + b * k, s)) finite = false;
    }
  });
  return finite;
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

// out[0:len] = sum_t coef[t] * src[rows[t] * stride + 0:len], accumulated in register tiles so that
// each output element is stored once; the sum runs in t order.
template <typename T>
inline void weighted_row_sum(const T* src, int64_t stride, const int64_t* rows, const T* coef, int64_t terms,
                             int64_t len, T* out) {
  constexpr int64_t W = kTile<T>;
  int64_t i0 = 0;
  for (; i0 + W <= len; i0 += W) {
    T acc[W] = {};
    for (int64_t t = 0; t < terms; ++t) {
      const T c = coef[t];
      const T* s = src + rows[t] * stride + i0;
      for (int64_t i = 0; i < W; ++i) acc[i] += c * s[i];
    }
    std::memcpy(out + i0, acc, sizeof(acc));
  }
  if (i0 < len) {
    T acc[W] = {};
    const int64_t rest = len - i0;
    for (int64_t t = 0; t < terms; ++t) {
      const T c = coef[t];
      const T* s = src + rows[t] * stride + i0;
      for (int64_t i = 0; i < rest; ++i) acc[i] += c * s[i];
    }
    std::memcpy(out + i0, acc, rest * sizeof(T));
  }
}

// dx = G_k @ w (one task per example) and dW = G_k.T @ x (one task per output row).
template <typename T>
void sparse_products(const T* g, const int64_t* idx, const T* x, const T* w, int64_t rows, int64_t n_out,
                     int64_t n_in, int64_t k, int64_t* hits, T* dx, T* dw) {
  Buckets<T> bk = bucket_by_column(g, idx, rows, n_out, k, hits);
  // ~32k multiply-adds per task keep the OpenMP fork worth its cost
  const int64_t grain_dx = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k * n_in));
  at::parallel_for(0, rows, grain_dx, [&](int64_t begin, int64_t end) {
    std::vector<T> coef(k);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* cols = idx + b * k;
      for (int64_t t = 0; t < k; ++t) coef[t] = g[b * n_out + cols[t]];
      weighted_row_sum(w, n_in, cols, coef.data(), k, n_in, dx + b * n_in);
    }
  });
  const int64_t per_row = std::max<int64_t>(1, rows * k / std::max<int64_t>(1, n_out)) * n_in;
  const int64_t grain_dw = std::max<int64_t>(1, 32768 / per_row);
  at::parallel_for(0, n_out, grain_dw, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t p0 = bk.start[j], p1 = bk.start[j + 1];
      weighted_row_sum(x, n_in, bk.example.data() + p0, bk.value.data() + p0, p1 - p0, n_in, dw + j * n_in);
    }
  });
}

void check_inputs(const torch::Tensor& g, const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(g.dim() == 2 && x.dim() == 2 && w.dim() == 2, "g, x, weight must be 2-D");
  TORCH_CHECK(g.size(0) == x.size(0) && g.size(1) == w.size(0) && x.size(1) == w.size(1),
              "shape mismatch: g ", g.sizes(), ", x ", x.sizes(), ", weight ", w.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && g.scalar_type() == w.scalar_type(),
              "g, x and weight must share a dtype");
  TORCH_CHECK(g.is_contiguous() && x.is_contiguous() && w.is_contiguous(), "inputs must be contiguous");
}

int64_t* hits_ptr(const c10::optional<torch::Tensor>& hits, int64_t n_out) {
  if (!hits.has_value()) return nullptr;
  TORCH_CHECK(hits->scalar_type() == torch::kLong && hits->is_contiguous() && hits->numel() == n_out,
              "hits must be a contiguous int64 tensor of ", n_out, " entries");
  return hits->data_ptr<int64_t>();
}

}  // namespace

// Row-wise top-k of |g| ([B, n], contiguous) -> (idx [B, k] int64 ascending, finite flag).
std::tuple<torch::Tensor, bool> topk_indices(const torch::Tensor& g, int64_t k) {
  TORCH_CHECK(g.dim() == 2 && g.is_contiguous(), "g must be a contiguous 2-D tensor");
  TORCH_CHECK(k >= 1 && k <= g.size(1), "k must lie in [1, ", g.size(1), "], got ", k);
  auto idx = torch::empty({g.size(0), k}, g.options().dtype(torch::kLong));
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "topk_indices", [&] {
    finite = select_rows(g.data_ptr<scalar_t>(), g.size(0), g.size(1), k, idx.data_ptr<int64_t>());
  });
  return {idx, finite};
}

// Products with given kept columns -> (dx [B, in], dW [out, in]); adds the column counts to hits.
std::tuple<torch::Tensor, torch::Tensor> sparse_backward(const torch::Tensor& g, const torch::Tensor& idx,
                                                         const torch::Tensor& x, const torch::Tensor& w,
                                                         const c10::optional<torch::Tensor>& hits) {
  check_inputs(g, x, w);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == g.size(0) && idx.scalar_type() == torch::kLong && idx.is_contiguous(),
              "idx must be a contiguous int64 [B, k] tensor");
  auto dx = torch::empty_like(x);
  auto dw = torch::empty_like(w);
  int64_t* h = hits_ptr(hits, w.size(0));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sparse_backward", [&] {
    sparse_products(g.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                    g.size(0), w.size(0), w.size(1), idx.size(1), h, dx.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>());
  });
  return {dx, dw};
}

// Selection, hits and both products in one call -> (dx, dW, idx, finite flag). Nothing is
// computed past the selection when a row is non-finite.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, bool> topk_backward(const torch::Tensor& g, const torch::Tensor& x,
                                                                            const torch::Tensor& w, int64_t k,
                                                                            const c10::optional<torch::Tensor>& hits) {
  check_inputs(g, x, w);
  auto [idx, finite] = topk_indices(g, k);
  if (!finite) return {torch::Tensor(), torch::Tensor(), idx, false};
  auto [dx, dw] = sparse_backward(g, idx, x, w, hits);
  return {dx, dw, idx, true};
}

// dW [n_out, in] with rows[cols[t]] = src[t] and zeros elsewhere, each row written once in parallel
// (cheaper than zero-filling all of dW and then scattering).
torch::Tensor scatter_rows(const torch::Tensor& src, const torch::Tensor& cols, int64_t n_out) {
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous() && cols.dim() == 1 && cols.size(0) == src.size(0) &&
                  cols.scalar_type() == torch::kLong,
              "src must be contiguous [k, in] and cols int64 [k]");
  const int64_t n_in = src.size(1);
  auto out = torch::empty({n_out, n_in}, src.options());
  std::vector<int64_t> source(n_out, -1);
  const int64_t* c = cols.data_ptr<int64_t>();
  for (int64_t t = 0; t < cols.size(0); ++t) source[c[t]] = t;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "scatter_rows", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n_out, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n_in)), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        if (source[j] >= 0) {
          std::memcpy(o + j * n_in, s + source[j] * n_in, n_in * sizeof(scalar_t));
        } else {
          std::memset(o + j * n_in, 0, n_in * sizeof(scalar_t));
        }
      }
    });
  });
  return out;
}

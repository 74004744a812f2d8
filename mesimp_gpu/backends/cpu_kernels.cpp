// Fused per-example meProp backward for CPU, built at run time by mesimp_gpu.backends.cpu for one
// instruction-set level (cpu_simd.h), from the per-row kernels of cpu_core.h.
//
// Shapes (PyTorch layout, y = x @ W.T):
//   g    [B, out]  gradient at the matmul output
//   x    [B, in]   layer input
//   w    [out, in] weight
//   idx  [B, k]    int64 kept columns per row, ascending
//   hits [out]     int64 meSimp counters (optional, incremented in place)
//
// Both products are deterministic whatever the thread count: dx is split by rows of dx (one
// example per task), dW by rows of dW (one output column's bucket of examples per task), and the
// order of every sum is fixed by the data, never by the schedule.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_core.h"

using namespace mesimp_cpu;

namespace {

// Row-parallel top-k of |g| ([B, n]) into idx ([B, k]); returns false if any row is non-finite.
template <typename T>
bool select_rows(const T* g, int64_t rows, int64_t n, int64_t k, int64_t* idx) {
  std::atomic<bool> finite{true};
  const int64_t grain = std::max<int64_t>(1, 4096 / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    SelectScratch<T> s(n, k);
    for (int64_t b = begin; b < end; ++b) {
      if (!select_row(g + b * n, n, k, idx + b * k, s)) finite = false;
    }
  });
  return finite;
}

// ~32k multiply-adds per task keep the OpenMP fork worth its cost.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

// dW = G_k.T @ x from the buckets, one task per output row (written whole, zeros if untouched).
template <typename T>
void dw_rows(const Buckets<T>& bk, const T* x, int64_t rows, int64_t n_out, int64_t n_in, int64_t k, T* dw) {
  const int64_t per_row = std::max<int64_t>(1, rows * k / std::max<int64_t>(1, n_out)) * n_in;
  const bool stream = streamable(dw, n_in * sizeof(T), n_out * n_in * sizeof(T));
  at::parallel_for(0, n_out, grain_for(per_row), [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t p0 = bk.start[j], p1 = bk.start[j + 1];
      const int64_t* ex = bk.example.data() + p0;
      const T* val = bk.value.data() + p0;
      if (stream) {
        weighted_row_sum<T, true>(x, n_in, ex, val, p1 - p0, n_in, dw + j * n_in);
      } else {
        weighted_row_sum<T, false>(x, n_in, ex, val, p1 - p0, n_in, dw + j * n_in);
      }
    }
    if (stream) stream_fence();
  });
}

// dx = G_k @ w (one task per example; skipped when dx is null) and dW = G_k.T @ x (one task per
// output row) for given idx.
template <typename T>
void sparse_products(const T* g, const int64_t* idx, const T* x, const T* w, int64_t rows, int64_t n_out,
                     int64_t n_in, int64_t k, int64_t* hits, T* dx, T* dw) {
  const Buckets<T> bk = bucket_by_column(g, idx, rows, n_out, k, hits);
  if (dx != nullptr) at::parallel_for(0, rows, grain_for(k * n_in), [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    std::vector<T> coef(k);
    for (int64_t b = begin; b < end; ++b) dx_row(g + b * n_out, idx + b * k, k, w, n_in, coef.data(), dx + b * n_in);
  });
  dw_rows(bk, x, rows, n_out, n_in, k, dw);
}

// Selection, hits and both products: each example's row of dx is computed right after its
// selection, while its gradient row is in cache (no dx when dx is null). Returns false (and computes
// no dW) if g is non-finite.
template <typename T>
bool topk_products(const T* g, const T* x, const T* w, int64_t rows, int64_t n_out, int64_t n_in, int64_t k,
                   int64_t* idx, int64_t* hits, T* dx, T* dw) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, rows, grain_for(k * n_in + n_out), [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    SelectScratch<T> s(n_out, k);
    std::vector<T> coef(k);
    for (int64_t b = begin; b < end; ++b) {
      if (!select_row(g + b * n_out, n_out, k, idx + b * k, s)) {
        finite = false;
        return;
      }
      if (dx != nullptr) dx_row(g + b * n_out, idx + b * k, k, w, n_in, coef.data(), dx + b * n_in);
    }
  });
  if (!finite) return false;
  dw_rows(bucket_by_column(g, idx, rows, n_out, k, hits), x, rows, n_out, n_in, k, dw);
  return true;
}

// Recycled buffers for dW. A fresh [out, in] tensor of many MiB costs more in page faults (the
// kernel zeroes every 4 KiB page on first touch) than the sparse products themselves; in training,
// dW lives until the next zero_grad, so a few buffers per size are reused from step to step and
// never fault again. Buffers are 2 MiB-aligned and advised for transparent huge pages, so even the
// first use faults once per 2 MiB. Every element of a dW is written by the kernel before use.
class BufferPool {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20;  // smaller tensors come from the allocator
  static constexpr size_t kAlign = size_t(2) << 20;
  static constexpr size_t kPerSize = 4;  // buffers kept per byte size
  static constexpr size_t kMaxBytes = size_t(1) << 30;  // total kept

  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: deleters may run at exit
    return *pool;
  }

  // An uninitialised contiguous tensor of `sizes` whose storage comes back here when freed.
  torch::Tensor empty(at::IntArrayRef sizes, const torch::TensorOptions& options) {
    const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
    if (bytes < kMinBytes) return torch::empty(sizes, options);
    void* ptr = take(bytes);
    if (ptr == nullptr) {
      TORCH_CHECK(posix_memalign(&ptr, kAlign, bytes) == 0, "out of memory allocating ", bytes, " bytes");
      madvise(ptr, bytes, MADV_HUGEPAGE);  // a hint: ignored where THP is off
    }
    return torch::from_blob(ptr, sizes, [bytes](void* p) { BufferPool::instance().give(p, bytes); }, options);
  }

 private:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* p = it->second.back();
    it->second.pop_back();
    kept_ -= bytes;
    return p;
  }

  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto& list = free_[bytes];
      if (list.size() < kPerSize && kept_ + bytes <= kMaxBytes) {
        list.push_back(p);
        kept_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;
  size_t kept_ = 0;
};

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

// What the build vectorises with: "<isa>, <vector bytes>-byte vectors" (recorded by the bench).
std::string simd_info() { return std::string(kSimd) + ", " + std::to_string(kVecBytes) + "-byte vectors"; }

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

// Products with given kept columns -> (dx [B, in] or undefined when need_dx is false, dW [out, in]);
// adds the column counts to hits.
std::tuple<torch::Tensor, torch::Tensor> sparse_backward(const torch::Tensor& g, const torch::Tensor& idx,
                                                         const torch::Tensor& x, const torch::Tensor& w,
                                                         const c10::optional<torch::Tensor>& hits, bool need_dx) {
  check_inputs(g, x, w);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == g.size(0) && idx.scalar_type() == torch::kLong && idx.is_contiguous(),
              "idx must be a contiguous int64 [B, k] tensor");
  if (idx.numel() > 0) {  // the buckets index by column: an out-of-range column would write out of bounds
    auto [lo, hi] = idx.aminmax();
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < w.size(0), "idx holds a column outside [0, ",
                w.size(0), ")");
  }
  auto dx = need_dx ? torch::empty_like(x) : torch::Tensor();
  auto dw = BufferPool::instance().empty(w.sizes(), w.options());
  int64_t* h = hits_ptr(hits, w.size(0));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sparse_backward", [&] {
    sparse_products(g.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                    g.size(0), w.size(0), w.size(1), idx.size(1), h, need_dx ? dx.data_ptr<scalar_t>() : nullptr,
                    dw.data_ptr<scalar_t>());
  });
  return {dx, dw};
}

// Selection, hits and both products in one call -> (dx or undefined when need_dx is false, dW, idx,
// finite flag). When g is non-finite, dx, dW and idx are unspecified and hits is unchanged.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, bool> topk_backward(const torch::Tensor& g, const torch::Tensor& x,
                                                                            const torch::Tensor& w, int64_t k,
                                                                            const c10::optional<torch::Tensor>& hits,
                                                                            bool need_dx) {
  check_inputs(g, x, w);
  TORCH_CHECK(k >= 1 && k <= g.size(1), "k must lie in [1, ", g.size(1), "], got ", k);
  auto idx = torch::empty({g.size(0), k}, g.options().dtype(torch::kLong));
  auto dx = need_dx ? torch::empty_like(x) : torch::Tensor();
  auto dw = BufferPool::instance().empty(w.sizes(), w.options());
  int64_t* h = hits_ptr(hits, w.size(0));
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "topk_backward", [&] {
    finite = topk_products(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), g.size(0), w.size(0),
                           w.size(1), k, idx.data_ptr<int64_t>(), h, need_dx ? dx.data_ptr<scalar_t>() : nullptr,
                           dw.data_ptr<scalar_t>());
  });
  return {dx, dw, idx, finite};
}

// dW [n_out, in] with rows[cols[t]] = src[t] and zeros elsewhere, each row written once in parallel
// (cheaper than zero-filling all of dW and then scattering).
torch::Tensor scatter_rows(const torch::Tensor& src, const torch::Tensor& cols, int64_t n_out) {
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous() && cols.dim() == 1 && cols.size(0) == src.size(0) &&
                  cols.scalar_type() == torch::kLong,
              "src must be contiguous [k, in] and cols int64 [k]");
  const int64_t n_in = src.size(1);
  auto out = BufferPool::instance().empty({n_out, n_in}, src.options());
  std::vector<int64_t> source(n_out, -1);
  const int64_t* c = cols.data_ptr<int64_t>();
  for (int64_t t = 0; t < cols.size(0); ++t) source[c[t]] = t;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "scatter_rows", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const bool stream = streamable(o, n_in * sizeof(scalar_t), n_out * n_in * sizeof(scalar_t));
    at::parallel_for(0, n_out, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n_in)), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        scalar_t* row = o + j * n_in;
        const scalar_t* from = source[j] >= 0 ? s + source[j] * n_in : nullptr;
        if (stream) {  // n_in is a whole number of vectors here
          for (int64_t i = 0; i < n_in; i += kLanes<scalar_t>) {
            store_stream(row + i, from != nullptr ? load(from + i) : Vec<scalar_t>{});
          }
        } else if (from != nullptr) {
          std::memcpy(row, from, n_in * sizeof(scalar_t));
        } else {
          std::memset(row, 0, n_in * sizeof(scalar_t));
        }
      }
      if (stream) stream_fence();
    });
  });
  return out;
}

// Sorted unique rows (int64 [r]) in a list of CPU int64 index tensors of any shape, each in [0, n):
// the rows of a weight that the backward passes since the last optimizer step touched.
torch::Tensor union_rows(const std::vector<torch::Tensor>& pending, int64_t n) {
  std::vector<uint8_t> seen(n, 0);
  for (const auto& t : pending) {
    TORCH_CHECK(t.scalar_type() == torch::kLong && t.device().is_cpu(), "rows must be CPU int64 tensors");
    const auto rows = t.contiguous();
    const int64_t* r = rows.data_ptr<int64_t>();
    for (int64_t i = 0; i < rows.numel(); ++i) {
      TORCH_CHECK(r[i] >= 0 && r[i] < n, "row ", r[i], " outside [0, ", n, ")");
      seen[r[i]] = 1;
    }
  }
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) count += seen[j];
  auto out = torch::empty({count}, torch::TensorOptions().dtype(torch::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    if (seen[j]) *o++ = j;
  }
  return out;
}

namespace {

void check_state(const torch::Tensor& p, const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.sizes() == p.sizes() && t.scalar_type() == p.scalar_type() && t.is_contiguous(), what,
              " must be contiguous with the parameter's shape and dtype");
}

// The rows an in-place optimizer update visits: the listed rows (int64 [r]) of a [n, width]
// parameter, or all n. The constructor checks the parameter and its gradient.
class RowUpdate {
 public:
  RowUpdate(const torch::Tensor& p, const torch::Tensor& grad, const c10::optional<torch::Tensor>& rows)
      : width_(p.numel() / std::max<int64_t>(1, p.size(0))), rows_(nullptr), count_(p.size(0)) {
    TORCH_CHECK(p.is_contiguous() && p.dim() >= 1, "parameter must be contiguous");
    check_state(p, grad, "grad");
    if (rows.has_value()) {
      TORCH_CHECK(rows->dim() == 1 && rows->scalar_type() == torch::kLong && rows->is_contiguous(),
                  "rows must be a contiguous int64 vector");
      rows_ = rows->data_ptr<int64_t>();
      count_ = rows->size(0);
    }
  }

  // Calls run(offset, width) for every visited row, offset being the row's first element; rows are
  // shared out to the thread pool in tasks of about task_elements elements, subnormals flushed.
  template <typename F>
  void for_each(int64_t task_elements, const F& run) const {
    at::parallel_for(0, count_, std::max<int64_t>(1, task_elements / std::max<int64_t>(1, width_)),
                     [&](int64_t begin, int64_t end) {
                       const FlushDenormals flush;
                       for (int64_t i = begin; i < end; ++i) run((rows_ == nullptr ? i : rows_[i]) * width_, width_);
                     });
  }

 private:
  int64_t width_;
  const int64_t* rows_;  // nullptr: every row
  int64_t count_;
};

// The clipping bound of the row updates: clip > 0 clamps to [-clip, clip], clip <= 0 does not clamp.
template <typename T>
T clip_bound(double clip) {
  return clip > 0 ? T(clip) : std::numeric_limits<T>::infinity();
}

}  // namespace

// In place, on the listed rows of p (all rows if none): g = clamp(grad, -clip, clip) (clip <= 0: no
// clamp); with momentum > 0, buf = momentum * buf + g and g = buf; p -= lr * g. One pass per row.
void lazy_sgd_(torch::Tensor p, const torch::Tensor& grad, const c10::optional<torch::Tensor>& rows, double lr,
               double clip, double momentum, const c10::optional<torch::Tensor>& buf) {
  const RowUpdate update(p, grad, rows);
  if (momentum > 0) {
    TORCH_CHECK(buf.has_value(), "momentum needs a buffer");
    check_state(p, *buf, "momentum buffer");
  }
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "lazy_sgd_", [&] {
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* bp = momentum > 0 ? buf->data_ptr<scalar_t>() : nullptr;
    const scalar_t c = clip_bound<scalar_t>(clip), mu = scalar_t(momentum), step = scalar_t(lr);
    update.for_each(16384, [&](int64_t off, int64_t width) {
      sgd_run(pp + off, gp + off, bp == nullptr ? nullptr : bp + off, width, c, mu, step);
    });
  });
}

// In place, on the listed rows of p (all rows if none), Adam at step t with torch.optim.Adam's
// formula: m += (1 - b1) (g - m); v = b2 v + (1 - b2) g^2;
// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), with g clamped as in lazy_sgd_.
void lazy_adam_(torch::Tensor p, const torch::Tensor& grad, torch::Tensor m, torch::Tensor v,
                const c10::optional<torch::Tensor>& rows, double lr, double beta1, double beta2, double eps, double t,
                double clip) {
  const RowUpdate update(p, grad, rows);
  check_state(p, m, "exp_avg");
  check_state(p, v, "exp_avg_sq");
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "lazy_adam_", [&] {
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t c = clip_bound<scalar_t>(clip);
    const scalar_t b1 = scalar_t(beta1), b2 = scalar_t(beta2), e_ = scalar_t(eps);
    const scalar_t step = scalar_t(lr / (1.0 - std::pow(beta1, t)));
    const scalar_t inv_bc2 = scalar_t(1.0 / std::sqrt(1.0 - std::pow(beta2, t)));
    update.for_each(8192, [&](int64_t off, int64_t width) {
      adam_run(pp + off, gp + off, mp + off, vp + off, width, c, b1, b2, step, inv_bc2, e_);
    });
  });
}

// In place, on the listed rows of p (all rows if none), AdaGrad with torch.optim.Adagrad's formula
// (no lr decay, no weight decay): sum += g^2; p -= lr * g / (sqrt(sum) + eps), with g clamped as in
// lazy_sgd_. A row whose gradient is zero is left unchanged by AdaGrad, so updating only the touched
// rows is exact.
void lazy_adagrad_(torch::Tensor p, const torch::Tensor& grad, torch::Tensor sum,
                   const c10::optional<torch::Tensor>& rows, double lr, double eps, double clip) {
  const RowUpdate update(p, grad, rows);
  check_state(p, sum, "sum");
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "lazy_adagrad_", [&] {
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* sp = sum.data_ptr<scalar_t>();
    const scalar_t c = clip_bound<scalar_t>(clip), step = scalar_t(lr), e_ = scalar_t(eps);
    update.for_each(8192, [&](int64_t off, int64_t width) { adagrad_run(pp + off, gp + off, sp + off, width, c, step, e_); });
  });
}

// The cpu backend's per-row kernels (cpu_core.h, cpu_simd.h) against scalar references, without
// torch, for any instruction-set level: tests/test_cpu_arch.py builds this for x86-64-v3, x86-64-v4
// and armv8-a (run under qemu-aarch64 on an x86 machine) and runs it.
//
// Usage: cpu_kernels_check [seed]; prints "ok <isa> <checks>" and exits 0, or prints every mismatch
// (at most 20) and exits 1. Inputs are random with ties, zeros, subnormals, odd lengths and tails.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "cpu_core.h"

using namespace mesimp_cpu;

namespace {

int64_t checks = 0, failures = 0;

void expect(bool ok, const char* what, int64_t a, int64_t b, int64_t c) {
  ++checks;
  if (!ok && ++failures <= 20) std::printf("FAIL %s (%lld, %lld, %lld)\n", what, (long long)a, (long long)b, (long long)c);
}

std::mt19937_64 rng;

// A row of n entries: normal values, rounded to few magnitudes (ties) when `ties`, with a fraction of zeros.
template <typename T>
std::vector<T> random_row(int64_t n, bool ties, double zero_fraction) {
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> unit;
  std::vector<T> row(n);
  for (auto& v : row) {
    const double x = normal(rng) * 3;
    v = unit(rng) < zero_fraction ? T(0) : T(ties ? std::round(x) : x);
  }
  return row;
}

// The reference selection: columns of the k largest |row|, ties to the lower column, ascending.
template <typename T>
std::vector<int64_t> reference_topk(const std::vector<T>& row, int64_t k) {
  std::vector<int64_t> order(row.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return std::fabs(row[a]) > std::fabs(row[b]); });
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

template <typename T>
void check_selection() {
  for (int64_t n : {1, 5, 7, 16, 17, 33, 100, 257, 500, 1031}) {
    for (int64_t k : {int64_t(1), int64_t(2), int64_t(5), int64_t(20), n / 4 + 1, n / 2 + 1, n}) {
      if (k < 1 || k > n) continue;
      for (int trial = 0; trial < 6; ++trial) {
        const double zeros = trial < 2 ? 0.0 : trial < 4 ? 0.6 : 0.98;
        const auto row = random_row<T>(n, trial % 2 == 1, zeros);
        SelectScratch<T> s(n, k);
        std::vector<int64_t> got(k, -1);
        const bool finite = select_row(row.data(), n, k, got.data(), s);
        expect(finite && got == reference_topk(row, k), "select_row", n, k, trial);
      }
    }
    auto row = random_row<T>(n, false, 0.0);
    row[n / 2] = std::numeric_limits<T>::infinity();
    SelectScratch<T> s(n, 1);
    std::vector<int64_t> got(1);
    expect(!select_row(row.data(), n, 1, got.data(), s), "select_row sees inf", n, 1, 0);
  }
}

void check_compaction() {
  std::uniform_int_distribution<uint32_t> key(0, 0x7fffffffu);
  for (int64_t n : {0, 1, 3, 4, 7, 8, 9, 15, 16, 17, 31, 64, 100, 4097}) {
    std::vector<uint32_t> keys(n);
    for (auto& k : keys) k = key(rng) >> (rng() % 24);  // many small keys, a few large
    for (uint32_t lower : {0u, 1u, 1000u, 0x00ffffffu, 0x7fffffffu}) {
      std::vector<int32_t> got(n + 16, -1), want;
      for (int64_t j = 0; j < n; ++j) {
        if (keys[j] >= lower) want.push_back(int32_t(j));
      }
      const int64_t count = compact_at_least(keys.data(), n, lower, got.data());
      got.resize(count);
      expect(got == want, "compact_at_least", n, lower, count);
    }
  }
}

// |got - want| <= tolerance * (sum of |terms|), elementwise, want in double.
template <typename T>
bool close(const T* got, const std::vector<double>& want, const std::vector<double>& scale) {
  const double eps = sizeof(T) == 4 ? 1e-6 : 1e-14;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(double(got[i]) - want[i]) <= 8 * eps * scale[i] + 1e-30)) return false;
  }
  return true;
}

template <typename T, bool Stream>
void check_weighted_sums() {
  std::normal_distribution<double> normal;
  for (int64_t len : {1, 3, 8, 15, 16, 31, 33, 64, 65, 127, 128, 300, 500, 1024}) {
    for (int64_t terms : {0, 1, 2, 3, 4, 7, 8, 9, 16, 17, 20}) {
      const int64_t rows = 25, stride = len + 3;  // rows longer than len: the sum reads a prefix
      std::vector<T> src(rows * stride);
      for (auto& v : src) v = T(normal(rng));
      std::vector<int64_t> which(terms);
      std::vector<T> coef(terms);
      for (int64_t t = 0; t < terms; ++t) {
        which[t] = int64_t(rng() % rows);
        coef[t] = T(normal(rng));
      }
      std::vector<double> want(len, 0.0), scale(len, 0.0);
      for (int64_t t = 0; t < terms; ++t) {
        for (int64_t i = 0; i < len; ++i) {
          want[i] += double(coef[t]) * double(src[which[t] * stride + i]);
          scale[i] += std::fabs(double(coef[t]) * double(src[which[t] * stride + i]));
        }
      }
      // streaming stores need a vector-aligned output whose length is whole vectors
      if (Stream && (len * int64_t(sizeof(T))) % kVecBytes != 0) continue;
      T* out = static_cast<T*>(std::aligned_alloc(64, ((len * sizeof(T) + 63) / 64) * 64));
      weighted_row_sum<T, Stream>(src.data(), stride, which.data(), coef.data(), terms, len, out);
      stream_fence();
      expect(close(out, want, scale), Stream ? "weighted_row_sum stream" : "weighted_row_sum", len, terms,
             int64_t(sizeof(T)));
      std::free(out);
    }
  }
}

template <typename T>
void check_row_updates() {
  std::normal_distribution<double> normal;
  for (int64_t n : {1, 5, 8, 17, 64, 333}) {
    for (double clip : {0.0, 0.5}) {
      std::vector<T> p(n), g(n), a(n), b(n);
      for (int64_t j = 0; j < n; ++j) {
        p[j] = T(normal(rng));
        g[j] = T(normal(rng));
        a[j] = T(normal(rng) * 0.1);
        b[j] = T(std::fabs(normal(rng)));
      }
      const double c = clip > 0 ? clip : INFINITY;
      auto clamp = [&](double x) { return std::min(std::max(x, -c), c); };
      const double tol = sizeof(T) == 4 ? 1e-5 : 1e-12;
      {  // SGD with momentum
        std::vector<T> pp = p, buf = a;
        sgd_run(pp.data(), g.data(), buf.data(), n, T(c), T(0.9), T(0.1));
        bool ok = true;
        for (int64_t j = 0; j < n; ++j) {
          const double m = 0.9 * double(a[j]) + clamp(g[j]);
          ok &= std::fabs(double(pp[j]) - (double(p[j]) - 0.1 * m)) <= tol * (1 + std::fabs(double(p[j])));
          ok &= std::fabs(double(buf[j]) - m) <= tol * (1 + std::fabs(m));
        }
        expect(ok, "sgd_run", n, int64_t(clip * 10), int64_t(sizeof(T)));
      }
      {  // Adam, step 3
        std::vector<T> pp = p, m = a, v = b;
        const double b1 = 0.9, b2 = 0.999, lr = 0.01, eps = 1e-8, step = lr / (1 - std::pow(b1, 3)),
                     inv_bc2 = 1 / std::sqrt(1 - std::pow(b2, 3));
        adam_run(pp.data(), g.data(), m.data(), v.data(), n, T(c), T(b1), T(b2), T(step), T(inv_bc2), T(eps));
        bool ok = true;
        for (int64_t j = 0; j < n; ++j) {
          const double gj = clamp(g[j]), mj = a[j] + (1 - b1) * (gj - a[j]), vj = b2 * b[j] + (1 - b2) * gj * gj;
          const double want = p[j] - step * mj / (std::sqrt(vj) * inv_bc2 + eps);
          ok &= std::fabs(double(pp[j]) - want) <= tol * (1 + std::fabs(want));
        }
        expect(ok, "adam_run", n, int64_t(clip * 10), int64_t(sizeof(T)));
      }
      {  // AdaGrad
        std::vector<T> pp = p, sum = b;
        adagrad_run(pp.data(), g.data(), sum.data(), n, T(c), T(0.1), T(1e-10));
        bool ok = true;
        for (int64_t j = 0; j < n; ++j) {
          const double gj = clamp(g[j]), sj = b[j] + gj * gj, want = p[j] - 0.1 * gj / (std::sqrt(sj) + 1e-10);
          ok &= std::fabs(double(pp[j]) - want) <= tol * (1 + std::fabs(want));
        }
        expect(ok, "adagrad_run", n, int64_t(clip * 10), int64_t(sizeof(T)));
      }
    }
  }
}

void check_flush() {
  volatile float tiny = 1e-38f, half = 0.5f;  // volatile: computed at run time, under the mode in force
  volatile float product;  // a volatile store: the multiply cannot move out of the scope
  {
    const FlushDenormals flush;
    product = tiny * half;  // 5e-39: subnormal, flushed
  }
  const volatile float outside = tiny * half;
  expect(product == 0.0f && outside != 0.0f, "FlushDenormals", 0, 0, 0);
}

}  // namespace

int main(int argc, char** argv) {
  rng.seed(argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 0);
  check_compaction();
  check_selection<float>();
  check_selection<double>();
  check_weighted_sums<float, false>();
  check_weighted_sums<float, true>();
  check_weighted_sums<double, false>();
  check_weighted_sums<double, true>();
  check_row_updates<float>();
  check_row_updates<double>();
  check_flush();
  if (failures > 0) {
    std::printf("%lld of %lld checks failed (%s)\n", (long long)failures, (long long)checks, kSimd);
    return 1;
  }
  std::printf("ok %s %lld\n", kSimd, (long long)checks);
  return 0;
}

// Out-of-line copies of the hot loops, for tests/test_cpu_arch.py to read in the generated assembly.
namespace mesimp_cpu {
template void row_sum_pass<float, false, false>(const float*, int64_t, const int64_t*, const float*, int64_t, int64_t,
                                                float*);
template void row_sum_pass<float, false, true>(const float*, int64_t, const int64_t*, const float*, int64_t, int64_t,
                                               float*);
template int64_t compact_at_least<uint32_t>(const uint32_t*, int64_t, uint32_t, int32_t*);
template bool select_row<float>(const float*, int64_t, int64_t, int64_t*, SelectScratch<float>&);
template void sgd_run<float>(float*, const float*, float*, int64_t, float, float, float);
template void adam_run<float>(float*, const float*, float*, float*, int64_t, float, float, float, float, float, float);
template void adagrad_run<float>(float*, const float*, float*, int64_t, float, float, float);
}  // namespace mesimp_cpu

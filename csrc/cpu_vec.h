// Small vector helpers for the CPU attention kernels, on top of at::vec.
//
// A torch extension is compiled without ATen's CPU_CAPABILITY macros, so at::vec would fall back
// to its generic (scalar-array) Vectorized. setup.py builds with -march=native; here we pick the
// matching at::vec ISA from the compiler's own feature macros. CPU_CAPABILITY names the inline
// namespace, so these instantiations cannot clash with generic ones in another translation unit.
// This header must be included before any other ATen/torch header.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

// gcc 12 flags its own AVX-512 intrinsics (`__Y = __Y`, reported where they are inlined, so a
// push/pop around the includes does not help) and ATen's '#pragma unroll'. Noise, silenced per file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace razor {

using fVec = at::vec::Vectorized<float>;

// dst[0:n) = float(src[0:n)).
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    using tVec = at::vec::Vectorized<T>;
    int64_t d = 0;
    for (; d + tVec::size() <= n; d += tVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(tVec::loadu(src + d));
      lo.store(dst + d);
      hi.store(dst + d + fVec::size());
    }
    for (; d < n; ++d) dst[d] = static_cast<float>(src[d]);
  }
}

// dst[0:n) += float(src[0:n)).
template <typename T>
inline void add_as_float(const T* src, float* dst, int64_t n) {
  int64_t d = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; d + fVec::size() <= n; d += fVec::size())
      (fVec::loadu(dst + d) + fVec::loadu(src + d)).store(dst + d);
  } else {
    using tVec = at::vec::Vectorized<T>;
    for (; d + tVec::size() <= n; d += tVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(tVec::loadu(src + d));
      (fVec::loadu(dst + d) + lo).store(dst + d);
      (fVec::loadu(dst + d + fVec::size()) + hi).store(dst + d + fVec::size());
    }
  }
  for (; d < n; ++d) dst[d] += static_cast<float>(src[d]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  fVec acc0(0.f), acc1(0.f);
  int64_t d = 0;
  for (; d + 2 * fVec::size() <= n; d += 2 * fVec::size()) {
    acc0 = at::vec::fmadd(fVec::loadu(a + d), fVec::loadu(b + d), acc0);
    acc1 = at::vec::fmadd(fVec::loadu(a + d + fVec::size()), fVec::loadu(b + d + fVec::size()), acc1);
  }
  for (; d + fVec::size() <= n; d += fVec::size())
    acc0 = at::vec::fmadd(fVec::loadu(a + d), fVec::loadu(b + d), acc0);
  float sum = (acc0 + acc1).reduce_add();
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// x[0:n) = exp(x - shift); returns the sum. exp_u20 is accurate to ~1e-6 relative.
inline float exp_shift_sum(float* x, float shift, int64_t n) {
  const fVec vs(shift);
  fVec acc(0.f);
  int64_t d = 0;
  for (; d + fVec::size() <= n; d += fVec::size()) {
    fVec e = (fVec::loadu(x + d) - vs).exp_u20();
    e.store(x + d);
    acc = acc + e;
  }
  float sum = acc.reduce_add();
  for (; d < n; ++d) {
    x[d] = std::exp(x[d] - shift);
    sum += x[d];
  }
  return sum;
}

inline float max_of(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

}  // namespace razor

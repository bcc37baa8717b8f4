// The CPU path's copy of an item that cannot be read in place: oriented so that
// rows <= cols, negated for maximisation, checked for entries that are NaN or -inf, in the
// type the solver then reads (lsa_cpu.cpp). Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace lsa {

// The type an entry of dtype T is stored as when it is copied: float32 where that is exact
// (bool, 8- and 16-bit integers, float16, bfloat16, float32), else float64.
template <typename T>
using Stored = std::conditional_t<std::is_same_v<T, double> || std::is_same_v<T, int32_t> ||
                                      std::is_same_v<T, int64_t>,
                                  double, float>;

#if defined(__AVX__)
// out[c * ld + r] = x[r * s_row + c] (negated if Negate) for an 8 x 8 tile of floats, each
// entry also added to sum[4] (see load_oriented). Rows k and k + 4 share a vector from the
// load on (columns 0-3, then 4-7), so a 4 x 4 transpose within each 128-bit lane finishes
// the tile: no shuffle across lanes, which is slow where a 256-bit operation is two
// 128-bit ones.
template <bool Negate>
inline void transpose8(const float* x, int64_t s_row, float* out, int64_t ld, __m256 sum[4]) {
  for (int half = 0; half < 2; ++half) {
    __m256 a[4];
    for (int k = 0; k < 4; ++k) {
      const float* p = x + k * s_row + 4 * half;
      a[k] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), _mm_loadu_ps(p + 4 * s_row), 1);
      if constexpr (Negate) a[k] = _mm256_xor_ps(a[k], _mm256_set1_ps(-0.0f));
      sum[k] = _mm256_add_ps(sum[k], a[k]);
    }
    const __m256 b0 = _mm256_unpacklo_ps(a[0], a[1]), b1 = _mm256_unpackhi_ps(a[0], a[1]);
    const __m256 b2 = _mm256_unpacklo_ps(a[2], a[3]), b3 = _mm256_unpackhi_ps(a[2], a[3]);
    float* o = out + 4 * half * ld;
    _mm256_storeu_ps(o, _mm256_shuffle_ps(b0, b2, 0x44));
    _mm256_storeu_ps(o + ld, _mm256_shuffle_ps(b0, b2, 0xee));
    _mm256_storeu_ps(o + 2 * ld, _mm256_shuffle_ps(b1, b3, 0x44));
    _mm256_storeu_ps(o + 3 * ld, _mm256_shuffle_ps(b1, b3, 0xee));
  }
}
#endif

// Copies one item, entry (r, c) at item[r * s_row + c * s_col], as the rows x cols problem
// it is solved as (its transpose if `transpose`), negated if `maximize`, into out
// (row-major, leading dimension ld). Written in order: a transposed item is read down
// its columns, or, for float32 rows of at least 8 x 8, in 8 x 8 tiles (the last tile of
// a row or column shifted back to end at the edge: it writes some entries twice,
// identically). Returns whether every entry (as copied) is above -inf, that is, neither
// NaN nor -inf: the solver need not look again.
template <typename scalar_t, typename T>
bool load_oriented(const scalar_t* item, int64_t s_row, int64_t s_col, int64_t rows,
                   int64_t cols, bool transpose, bool maximize, T* out, int64_t ld) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (transpose && s_col == 1 && rows >= 8 && cols >= 8) {
      // The check as sums from +inf: one stays +inf unless an entry added to it is NaN or
      // -inf, which makes it NaN for good (four of them: consecutive tiles need not wait).
      const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
      __m256 sum[4] = {inf, inf, inf, inf};
      const auto tiles = [&](auto negate) {
        for (int64_t i = 0; i < rows; i += 8) {  // oriented row i: input column i
          for (int64_t j = 0; j < cols; j += 8) {
            const int64_t i0 = std::min(i, rows - 8), j0 = std::min(j, cols - 8);
            transpose8<decltype(negate)::value>(item + j0 * s_row + i0, s_row, out + i0 * ld + j0, ld, sum);
          }
        }
      };
      maximize ? tiles(std::true_type{}) : tiles(std::false_type{});
      const __m256 all = _mm256_add_ps(_mm256_add_ps(sum[0], sum[1]), _mm256_add_ps(sum[2], sum[3]));
      return _mm256_movemask_ps(_mm256_cmp_ps(all, inf, _CMP_EQ_OQ)) == 0xff;
    }
  }
#endif
  const int64_t sr = transpose ? s_col : s_row, sc = transpose ? s_row : s_col;
  const T ninf = -std::numeric_limits<T>::infinity();
  int64_t invalid = 0;  // a count: no branch in the copy
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const T x = static_cast<T>(item[r * sr + c * sc]);
      const T y = maximize ? -x : x;
      out[r * ld + c] = y;
      invalid += !(y > ninf);
    }
  }
  return invalid == 0;
}

}  // namespace lsa

// CPU kernel of maskformer_fast::mask_cost_sums: the pixel sums a matching cost is made of,
// for a batch of images, with each activation computed once per logit.
//
// With x a mask logit, p = sigmoid(x), y a target in [0, 1], and per pixel the loss terms of
// the two target values, neg (y = 0) and pos (y = 1):
//   BCE:   neg = softplus(x) = BCE(x, 0),   pos = softplus(-x) = BCE(x, 1),   neg - pos = x
//   focal: neg = (1 - alpha) p^gamma softplus(x),   pos = alpha (1 - p)^gamma softplus(-x)
// the mask cost * P is sum(pos y + neg (1 - y)) = sum neg - (neg - pos) . y, and the dice
// needs p . y and sum p. So, per query q and target t of image b:
//   dots[b, 0, q, t] = sum_i (neg - pos)[q, i] y[t, i]     sums[b, 0, q] = sum_i neg[q, i]
//   dots[b, 1, q, t] = sum_i p[q, i] y[t, i]               sums[b, 1, q] = sum_i p[q, i]
// (targets beyond an image's count are never read; their dots are 0).
//
// Work: an image's pixels are cut into chunks of `chunk` pixels. The terms of a chunk are
// computed in one vectorised pass over its logits (one exp, two divisions and a short
// polynomial per logit) into a [2Q, c] buffer that stays in cache (rows: neg - pos, then p),
// then a blocked dot-product kernel adds the chunk's [2Q, n] products with its targets. The
// chunks of an image are split into at most kGroups runs of consecutive chunks, each with its
// own partial sums; the runs of all images go in parallel and their partials are added in a
// fixed order, so the result does not depend on the number of threads.
//
// Why not at::exp / at::log1p / at::mm: SLEEF's vectorised log1p costs several exps, and
// MKL's GEMM is slow on this skinny shape (n <= a few dozen targets) and on AMD CPUs; the
// forms below are accurate to a few ulp, enough for costs compared at fp32 rounding.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"

namespace maskformer_fast {
namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;

constexpr int64_t kGroups = 4;  // runs of chunks per image: parallel work when B is small

struct Loss {
  bool focal;
  float alpha, gamma;
};

// p^gamma, exactly p * p for the usual gamma = 2 (as torch.pow).
inline Vec power(const Vec& p, float gamma) { return gamma == 2.f ? p * p : p.pow(Vec(gamma)); }

inline float lane_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// e^t for t <= 0 (NaN stays NaN): t = n ln2 + r with n an integer and |r| <= ln2 / 2 (ln2 in
// two parts, so that r is exact), e^t = 2^n e^r, e^r by its Taylor series to r^7 (truncated
// there: relative error < 1e-8, then a few ulp of rounding). Below ln(FLT_MIN), 0: no
// subnormals.
inline Vec exp_nonpositive(const Vec& t) {
  constexpr float kMin = -87.3f;  // e^kMin ~ FLT_MIN = 2^-126
  const Vec u = at::vec::maximum(t, Vec(kMin));
  const Vec n = (u * Vec(1.44269504f)).round();                  // u / ln2, rounded
  Vec r = at::vec::fmadd(n, Vec(-0.693145751953125f), u);        // ln2, high bits (n * them exact)
  r = at::vec::fmadd(n, Vec(-1.428606765330187e-06f), r);        // ln2, low bits
  Vec e(1.f / 5040);
  for (float k : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 1.f / 2, 1.f, 1.f}) {
    e = at::vec::fmadd(e, r, Vec(k));
  }
  const IVec exponent = at::vec::convert_to_int_of_same_size(n) + IVec(127);  // 2^n as float bits
  const Vec two_n = at::vec::cast<float>(exponent * IVec(1 << 23));
  return Vec::blendv(e * two_n, Vec(0.f), t < Vec(kMin));
}

// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) in [0, 1/3], by its series
// 2 s (1 + s^2/3 + s^4/5 + ... + s^12/13) (truncated there: relative error < 2e-8, the next
// term being s^14/15 <= 9^-7 / 15).
inline Vec log1p_unit(const Vec& e) {
  const Vec s = e / (Vec(2.f) + e);
  const Vec s2 = s * s;
  Vec sum(1.f / 13);
  for (float k : {1.f / 11, 1.f / 9, 1.f / 7, 1.f / 5, 1.f / 3, 1.f}) {
    sum = at::vec::fmadd(sum, s2, Vec(k));
  }
  return Vec(2.f) * s * sum;
}

// The terms of one row of c logits: d[i] = (neg - pos)[i], p[i] = sigmoid(x[i]); adds
// sum neg and sum p to neg_sum and p_sum.
//
// Numerically careful forms: with e = e^-|x| in (0, 1] and r = 1 / (1 + e) = sigmoid(|x|),
// sigmoid(x) and sigmoid(-x) are r and e r (which is which: the sign of x), never 1 - p;
// softplus(+-x) = max(+-x, 0) + log1p(e). No overflow for any |x|; NaN stays NaN.
template <bool kFocal>
void row_terms(const float* x, int64_t c, const Loss& loss, float* d, float* p, float& neg_sum,
               float& p_sum) {
  const Vec zero(0.f), one(1.f), alpha(loss.alpha), one_minus_alpha(1.f - loss.alpha);
  Vec neg_acc(0.f), p_acc(0.f);
  auto step = [&](int64_t i, int64_t len) {  // lanes past len: the terms of x = 0, not summed
    const Vec xv = Vec::loadu(x + i, len);
    const Vec e = exp_nonpositive(xv.abs().neg());
    const Vec r = one / (one + e);
    const Vec er = e * r;
    const Vec nonneg = xv >= zero;
    Vec pv = Vec::blendv(er, r, nonneg);          // sigmoid(x)
    const Vec l = log1p_unit(e);                  // log(1 + e^-|x|)
    Vec neg = at::vec::maximum(xv, zero) + l;     // softplus(x) = BCE(x, 0)
    Vec dv = xv;                                  // BCE: neg - pos = x
    if constexpr (kFocal) {
      const Vec qv = Vec::blendv(r, er, nonneg);  // 1 - p = sigmoid(-x)
      const Vec pos = alpha * power(qv, loss.gamma) * (at::vec::maximum(xv.neg(), zero) + l);
      neg = one_minus_alpha * power(pv, loss.gamma) * neg;
      dv = neg - pos;
    }
    dv.store(d + i, len);
    pv.store(p + i, len);
    if (len < Vec::size()) {
      neg = Vec::set(zero, neg, len);
      pv = Vec::set(zero, pv, len);
    }
    neg_acc += neg;
    p_acc += pv;
  };
  int64_t i = 0;
  for (; i + Vec::size() <= c; i += Vec::size()) step(i, Vec::size());
  if (i < c) step(i, c - i);
  neg_sum += lane_sum(neg_acc);
  p_sum += lane_sum(p_acc);
}

// out[i, j] += sum_k a[i, k] y[j, k] for R rows of a (row stride lda), C rows of y (ldy), k < c:
// R x C dot products at once, a vector of k at a time, in R x C accumulators (registers).
template <int R, int C>
void dot_block(const float* a, int64_t lda, const float* y, int64_t ldy, int64_t c, float* out,
               int64_t ldo) {
  Vec acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) acc[i][j] = Vec(0.f);
  auto step = [&](int64_t k, int64_t len) {  // lanes past len: zeros
    Vec av[R], yv[C];
    for (int i = 0; i < R; ++i) av[i] = Vec::loadu(a + i * lda + k, len);
    for (int j = 0; j < C; ++j) yv[j] = Vec::loadu(y + j * ldy + k, len);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j) acc[i][j] = at::vec::fmadd(av[i], yv[j], acc[i][j]);
  };
  int64_t k = 0;
  for (; k + Vec::size() <= c; k += Vec::size()) step(k, Vec::size());
  if (k < c) step(k, c - k);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) out[i * ldo + j] += lane_sum(acc[i][j]);
}

// The same for R rows of a and all n rows of y: blocks of R x 4, then R x (n mod 4).
template <int R>
void dot_rows(const float* a, int64_t lda, const float* y, int64_t ldy, int64_t n, int64_t c,
              float* out, int64_t ldo) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) dot_block<R, 4>(a, lda, y + j * ldy, ldy, c, out + j, ldo);
  switch (n - j) {
    case 3: dot_block<R, 3>(a, lda, y + j * ldy, ldy, c, out + j, ldo); break;
    case 2: dot_block<R, 2>(a, lda, y + j * ldy, ldy, c, out + j, ldo); break;
    case 1: dot_block<R, 1>(a, lda, y + j * ldy, ldy, c, out + j, ldo); break;
  }
}

// out [rows, n] (row stride ldo) += a [rows, c] . y [n, c]^T.
void add_dots(const float* a, int64_t lda, int64_t rows, const float* y, int64_t ldy, int64_t n,
              int64_t c, float* out, int64_t ldo) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) dot_rows<4>(a + i * lda, lda, y, ldy, n, c, out + i * ldo, ldo);
  for (; i < rows; ++i) dot_rows<1>(a + i * lda, lda, y, ldy, n, c, out + i * ldo, ldo);
}

// Logits as float32: in place if they are, else converted into `scratch`.
inline const float* as_float(const float* x, int64_t, float*) { return x; }
template <typename T>
const float* as_float(const T* x, int64_t c, float* scratch) {
  std::transform(x, x + c, scratch, [](T v) { return float(v); });
  return scratch;
}

std::tuple<Tensor, Tensor> mask_cost_sums_cpu(const Tensor& logits, const Tensor& targets,
                                              const std::optional<Tensor>& counts,
                                              c10::string_view mask_cost, double alpha,
                                              double gamma, int64_t chunk) {
  TORCH_CHECK(logits.dim() == 3 && targets.dim() == 3 && targets.size(0) == logits.size(0) &&
                  targets.size(2) == logits.size(2),
              "mask_cost_sums: expected logits [B, Q, P] and targets [B, T, P], got ",
              logits.sizes(), " and ", targets.sizes());
  TORCH_CHECK(mask_cost == "bce" || mask_cost == "focal",
              "mask_cost_sums: mask_cost must be 'bce' or 'focal', got '", mask_cost, "'");
  TORCH_CHECK(chunk >= 1, "mask_cost_sums: chunk must be >= 1, got ", chunk);
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "mask_cost_sums: logits must be floating point, got ", logits.scalar_type());
  const int64_t B = logits.size(0), Q = logits.size(1), P = logits.size(2), T = targets.size(1);
  std::vector<int64_t> n(B, T);  // targets read per image
  if (counts.has_value()) {
    TORCH_CHECK(counts->dim() == 1 && counts->size(0) == B,
                "mask_cost_sums: counts must have shape [B] = [", B, "], got ", counts->sizes());
    const Tensor c = counts->to(at::kCPU, at::kLong).contiguous();
    for (int64_t b = 0; b < B; ++b) n[b] = std::clamp<int64_t>(c.data_ptr<int64_t>()[b], 0, T);
  }
  const auto f32 = logits.options().dtype(at::kFloat);
  Tensor dots = at::zeros({B, 2, Q, T}, f32), sums = at::zeros({B, 2, Q}, f32);
  if (B == 0 || Q == 0 || P == 0) return {dots, sums};

  const Tensor x = logits.stride(2) == 1 ? logits : logits.contiguous();
  Tensor y = targets.to(at::kFloat);  // only targets[b, :n[b]] are read: padding may hold NaN
  if (y.stride(2) != 1) y = y.contiguous();
  const Loss loss{mask_cost == "focal", float(alpha), float(gamma)};
  const int64_t chunks = (P + chunk - 1) / chunk, groups = std::min(chunks, kGroups);
  // partial sums of each run: dots [B, groups, 2Q, T], sums [B, groups, 2, Q]
  Tensor part_dots = at::zeros({B, groups, 2 * Q, T}, f32);
  Tensor part_sums = at::zeros({B, groups, 2, Q}, f32);
  float* ps = part_sums.data_ptr<float>();
  float* pd = part_dots.data_ptr<float>();
  const float* yp = y.const_data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mask_cost_sums", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const auto row_terms_of = loss.focal ? row_terms<true> : row_terms<false>;
    // per thread: the terms [2Q, width] (rows: neg - pos, then p), a row of logits as float32
    const int64_t width = std::min(chunk, P);
    const int64_t scratch = 2 * Q * width + (std::is_same_v<scalar_t, float> ? 0 : width);
    Tensor buffers = at::empty({at::get_num_threads(), scratch}, f32);
    at::parallel_for(0, B * groups, 1, [&](int64_t begin, int64_t end) {
      float* terms = buffers.data_ptr<float>() + at::get_thread_num() * scratch;
      float* row = terms + 2 * Q * width;
      for (int64_t run = begin; run < end; ++run) {
        const int64_t b = run / groups, g = run % groups;
        float* neg_sum = ps + run * 2 * Q;
        float* p_sum = neg_sum + Q;
        for (int64_t k = g * chunks / groups; k < (g + 1) * chunks / groups; ++k) {
          const int64_t start = k * chunk, c = std::min(chunk, P - start);
          for (int64_t q = 0; q < Q; ++q) {
            const scalar_t* xq = xp + b * x.stride(0) + q * x.stride(1) + start;
            row_terms_of(as_float(xq, c, row), c, loss, terms + q * width,
                         terms + (Q + q) * width, neg_sum[q], p_sum[q]);
          }
          // part_dots[b, g, :, :n] += terms[:, :c] . y[b, :n, start : start + c]^T
          add_dots(terms, width, 2 * Q, yp + b * y.stride(0) + start, y.stride(1), n[b], c,
                   pd + run * 2 * Q * T, T);
        }
      }
    });
  });

  // the runs' partials, added in run order
  float* dp = dots.data_ptr<float>();
  float* sp = sums.data_ptr<float>();
  const int64_t dot_size = 2 * Q * T, sum_size = 2 * Q;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* from = pd + (b * groups + g) * dot_size;
      for (int64_t i = 0; i < dot_size; ++i) dp[b * dot_size + i] += from[i];
      const float* from_sums = ps + (b * groups + g) * sum_size;
      for (int64_t i = 0; i < sum_size; ++i) sp[b * sum_size + i] += from_sums[i];
    }
  }
  return {dots, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskformer_fast, CPU, m) { m.impl("mask_cost_sums", &mask_cost_sums_cpu); }

}  // namespace maskformer_fast

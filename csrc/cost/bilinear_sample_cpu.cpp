// CPU kernel of maskformer_fast::bilinear_sample: planes [B, N, H, W] sampled at the points
// grid [B, P, 2] (x, y in [-1, 1]) of their image -> [B, N, P], the values of
// F.grid_sample(planes[b, :, None], grid[b] for every plane, mode="bilinear",
// padding_mode="zeros", align_corners=False), bit for bit.
//
// Bilinear interpolation at a point: its pixel coordinates are
//   x = (gx + 1) W / 2 - 0.5,   y = (gy + 1) H / 2 - 0.5
// and, with (x0, y0) = floor(x, y), dx = x - x0, dy = y - y0, the value is
//   (1-dy)(1-dx) v[y0, x0] + (1-dy) dx v[y0, x0+1] + dy (1-dx) v[y0+1, x0] + dy dx v[y0+1, x0+1]
// where a corner outside the plane reads 0.
//
// The corners and weights depend on the point only: they are computed once per image. Each
// plane is then copied into a buffer with a border of zeros (one row above, two below, one
// column each side), where every corner of every point can be read without a test: a corner
// just outside the plane reads the border, and a point whose four corners are all outside
// reads a 2 x 2 block of the border. Per point and plane: four loads (two pairs of
// neighbours) and four multiply-adds. (grid_sample computes the weights again for every
// plane, or, given all planes at once, walks all N planes for each point, out of cache.)
//
// Rounding as torch's own CPU kernel (aten/src/ATen/native/cpu/GridSamplerKernel.cpp, built
// with FMA contraction): x = fma(gx + 1, W / 2, -0.5), and the four products summed as
// fma(v11, w11, fma(v10, w10, fma(v01, w01, v00 * w00))). tests/test_cpu_cost_ops.py checks
// the equality with F.grid_sample.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace maskformer_fast {
namespace {

using at::Tensor;

// A plane of H x W inside its zero border: rows -1 .. H + 1, columns -1 .. W.
struct Padded {
  int64_t H, W;
  int64_t width() const { return W + 2; }
  int64_t size() const { return (H + 3) * width(); }
  int64_t offset(int64_t y, int64_t x) const { return (y + 1) * width() + x + 1; }
};

// A point's corner (y0, x0) in the padded plane (its offset) and the weights of its four
// corners, in the order (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
void point(float gx, float gy, const Padded& pad, int32_t& offset, float* weight) {
  const float x = std::fma(gx + 1.f, float(pad.W) / 2, -0.5f);
  const float y = std::fma(gy + 1.f, float(pad.H) / 2, -0.5f);
  const float x0 = std::floor(x), y0 = std::floor(y);
  const float dx = x - x0, dy = y - y0;
  weight[0] = (1 - dy) * (1 - dx);
  weight[1] = (1 - dy) * dx;
  weight[2] = dy * (1 - dx);
  weight[3] = dy * dx;
  // Some corner inside the plane: x0 in [-1, W - 1], y0 in [-1, H - 1], compared as
  // integers (float(W - 1) rounds above 2**24), once x0 and y0 are known to convert
  // (false for NaN).
  const float limit = float(pad.size());
  const bool small = x0 >= -1 && x0 <= limit && y0 >= -1 && y0 <= limit;
  const int64_t ix = small ? int64_t(x0) : -2, iy = small ? int64_t(y0) : -2;
  const bool near = ix >= -1 && ix <= pad.W - 1 && iy >= -1 && iy <= pad.H - 1;
  offset = int32_t(near ? pad.offset(iy, ix) : pad.offset(pad.H, -1));
}

// One plane at the P points: offsets [P] and weights [P, 4] from point(); `padded`: scratch
// of pad.size() floats whose border is 0.
void sample_plane(const float* plane, const Padded& pad, const int32_t* offsets,
                  const float* weights, int64_t P, float* padded, float* out) {
  const int64_t w = pad.width();
  for (int64_t y = 0; y < pad.H; ++y) {
    std::memcpy(padded + pad.offset(y, 0), plane + y * pad.W, pad.W * sizeof(float));
  }
  for (int64_t i = 0; i < P; ++i) {
    const float* v = padded + offsets[i];
    const float* k = weights + 4 * i;
    out[i] = std::fma(v[w + 1], k[3], std::fma(v[w], k[2], std::fma(v[1], k[1], v[0] * k[0])));
  }
}

Tensor bilinear_sample_cpu(const Tensor& planes, const Tensor& grid) {
  TORCH_CHECK(planes.dim() == 4 && grid.dim() == 3 && grid.size(2) == 2 &&
                  grid.size(0) == planes.size(0),
              "bilinear_sample: expected planes [B, N, H, W] and grid [B, P, 2], got ",
              planes.sizes(), " and ", grid.sizes());
  TORCH_CHECK(planes.scalar_type() == at::kFloat && grid.scalar_type() == at::kFloat,
              "bilinear_sample: expected float32 planes and grid, got ", planes.scalar_type(),
              " and ", grid.scalar_type());
  const int64_t B = planes.size(0), N = planes.size(1), H = planes.size(2), W = planes.size(3);
  const int64_t P = grid.size(1);
  const Padded pad{H, W};
  TORCH_CHECK(pad.size() <= std::numeric_limits<int32_t>::max(), "bilinear_sample: planes of ",
              H, " x ", W, " pixels are too large");
  Tensor out = at::empty({B, N, P}, planes.options());
  if (out.numel() == 0) return out;
  const Tensor v = planes.contiguous(), g = grid.contiguous();
  const float* gp = g.const_data_ptr<float>();
  // every point's offset and weights
  Tensor offsets = at::empty({B, P}, planes.options().dtype(at::kInt));
  Tensor weights = at::empty({B, P, 4}, planes.options());
  int32_t* offset = offsets.data_ptr<int32_t>();
  float* weight = weights.data_ptr<float>();
  at::parallel_for(0, B * P, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      point(gp[2 * i], gp[2 * i + 1], pad, offset[i], weight + 4 * i);
    }
  });
  const float* vp = v.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  // a padded plane per thread, whose border stays 0
  Tensor padded = at::zeros({at::get_num_threads(), pad.size()}, planes.options());
  at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
    float* scratch = padded.data_ptr<float>() + at::get_thread_num() * pad.size();
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / N;
      sample_plane(vp + plane * H * W, pad, offset + b * P, weight + 4 * b * P, P, scratch,
                   op + plane * P);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskformer_fast, CPU, m) { m.impl("bilinear_sample", &bilinear_sample_cpu); }

}  // namespace maskformer_fast

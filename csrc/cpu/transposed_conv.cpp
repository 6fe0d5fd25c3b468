// CPU kernels of ahnet_fast::transposed_conv_shuffle / transposed_conv_unshuffle: the data movement of a transposed
// convolution whose kernel equals its stride (AH-Net's x2 up-transitions, kernel = stride = 2).
//
// Such a convolution has no overlapping windows: each input voxel's Ci values, multiplied by the
// (Ci, Co * f0 * f1 * f2) weight matrix, give a whole f0 x f1 x f2 block of the output. So it is one
// matrix product T = W^T X (T: (N, Co * F, H, W, D), F = f0 * f1 * f2, channel co * F + tap) and a
// rearrangement of T's taps into the blocks (transposed_conv_shuffle, the 3D pixel shuffle):
//
//   out[n, co, h * f0 + a, w * f1 + b, d * f2 + c] = T[n, (co * f0 + a) * f1 * f2 + b * f2 + c, h, w, d]
//
// transposed_conv_unshuffle is its inverse (the gradient's way back). Done with torch's permute + copy this
// transposition is a strided gather over the whole map; here each output row (fixed n, co, h, a, w,
// b: D * f2 contiguous values) interleaves f2 contiguous rows of T, and the rows are split across
// threads. 2D maps (N, C, H, W) are (N, C, H, W, 1) with f2 = 1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <vector>

namespace ahnet_fast {
namespace {

struct Geometry {
  int64_t N, C, H, W, D;  // coarse (shuffle input) sizes, C = output channels
  std::array<int64_t, 3> f;
  int64_t taps() const { return f[0] * f[1] * f[2]; }
};

// kShuffle: rows of the fine map (the shuffle's output) are written from the coarse taps;
// otherwise the reverse (unshuffle). One row = (n, co, h, a, w, b), D * f2 fine values.
template <typename scalar_t, bool kShuffle>
void move(const Geometry& g, const scalar_t* src, scalar_t* dst) {
  const int64_t f0 = g.f[0], f1 = g.f[1], f2 = g.f[2], F = g.taps();
  const int64_t S = g.H * g.W * g.D;                     // coarse plane
  const int64_t fine_w = g.W * f1, fine_d = g.D * f2;    // fine row lengths
  const int64_t fine_plane = g.H * f0 * fine_w * fine_d;
  const int64_t rows = g.N * g.C * g.H * f0 * g.W * f1;  // (n, co, h, a, w, b)
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, fine_d)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t q = r;
      const int64_t b = q % f1;
      q /= f1;
      const int64_t w = q % g.W;
      q /= g.W;
      const int64_t a = q % f0;
      q /= f0;
      const int64_t h = q % g.H;
      q /= g.H;
      const int64_t co = q % g.C;
      const int64_t n = q / g.C;
      const int64_t fine = (n * g.C + co) * fine_plane + ((h * f0 + a) * fine_w + (w * f1 + b)) * fine_d;
      const int64_t coarse = ((n * g.C + co) * F + (a * f1 + b) * f2) * S + (h * g.W + w) * g.D;
      if (f2 == 1) {
        if (kShuffle)
          std::copy_n(src + coarse, g.D, dst + fine);
        else
          std::copy_n(src + fine, g.D, dst + coarse);
      } else if (f2 == 2) {  // AH-Net's case: two rows interleaved (vectorises)
        if (kShuffle) {
          const scalar_t* __restrict t0 = src + coarse;
          const scalar_t* __restrict t1 = t0 + S;
          scalar_t* __restrict o = dst + fine;
          for (int64_t d = 0; d < g.D; ++d) {
            o[2 * d] = t0[d];
            o[2 * d + 1] = t1[d];
          }
        } else {
          const scalar_t* __restrict o = src + fine;
          scalar_t* __restrict t0 = dst + coarse;
          scalar_t* __restrict t1 = t0 + S;
          for (int64_t d = 0; d < g.D; ++d) {
            t0[d] = o[2 * d];
            t1[d] = o[2 * d + 1];
          }
        }
      } else {
        for (int64_t c = 0; c < f2; ++c)
          for (int64_t d = 0; d < g.D; ++d) {
            if (kShuffle)
              dst[fine + d * f2 + c] = src[coarse + c * S + d];
            else
              dst[coarse + c * S + d] = src[fine + d * f2 + c];
          }
      }
    }
  });
}

std::array<int64_t, 3> factors_of(at::IntArrayRef factors, int64_t spatial) {
  TORCH_CHECK(static_cast<int64_t>(factors.size()) == spatial, "transposed_conv_shuffle: expected ", spatial,
              " factors, got ", factors.size());
  std::array<int64_t, 3> f{1, 1, 1};
  for (int64_t i = 0; i < spatial; ++i) {
    TORCH_CHECK(factors[i] >= 1, "transposed_conv_shuffle: factors must be >= 1, got ", factors);
    f[i] = factors[i];
  }
  return f;
}

at::Tensor transposed_conv_shuffle_cpu(const at::Tensor& x, at::IntArrayRef factors) {
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, "transposed_conv_shuffle: input must be 4D or 5D, got ", x.dim(), "D");
  const auto f = factors_of(factors, x.dim() - 2);
  const int64_t F = f[0] * f[1] * f[2];
  TORCH_CHECK(x.size(1) % F == 0, "transposed_conv_shuffle: ", x.size(1), " channels are not a multiple of ", F);
  const at::Tensor t = x.contiguous();
  Geometry g{x.size(0), x.size(1) / F, x.size(2), x.size(3), x.dim() == 5 ? x.size(4) : 1, f};
  std::vector<int64_t> size{g.N, g.C, g.H * f[0], g.W * f[1]};
  if (x.dim() == 5) size.push_back(g.D * f[2]);
  at::Tensor out = at::empty(size, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "transposed_conv_shuffle_cpu", [&] {
    move<scalar_t, true>(g, t.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor transposed_conv_unshuffle_cpu(const at::Tensor& y, at::IntArrayRef factors) {
  TORCH_CHECK(y.dim() == 4 || y.dim() == 5, "transposed_conv_unshuffle: input must be 4D or 5D, got ", y.dim(), "D");
  const auto f = factors_of(factors, y.dim() - 2);
  for (int64_t i = 0; i < y.dim() - 2; ++i)
    TORCH_CHECK(y.size(2 + i) % f[i] == 0, "transposed_conv_unshuffle: size ", y.sizes(), " is not divisible by ", factors);
  const at::Tensor t = y.contiguous();
  Geometry g{y.size(0), y.size(1), y.size(2) / f[0], y.size(3) / f[1], y.dim() == 5 ? y.size(4) / f[2] : 1, f};
  std::vector<int64_t> size{g.N, g.C * g.taps(), g.H, g.W};
  if (y.dim() == 5) size.push_back(g.D);
  at::Tensor out = at::empty(size, y.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "transposed_conv_unshuffle_cpu", [&] {
    move<scalar_t, false>(g, t.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ahnet_fast, CPU, m) {
  m.impl("transposed_conv_shuffle", &transposed_conv_shuffle_cpu);
  m.impl("transposed_conv_unshuffle", &transposed_conv_unshuffle_cpu);
}

}  // namespace ahnet_fast

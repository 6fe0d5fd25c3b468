// CPU kernels of ahnet_fast::pyramid_pool / pyramid_pool_backward: pyramid volumetric pooling (MONAI's PSP)
// with one read of the feature map for every pyramid level.
//
// The map is seen as (N, C, H, W, D) (a 2D map (N, C, H, W) as (N, C, H, 1, W)). Level L pools
// windows of s = 8 << L rows by sw = s (pool_w) or 1 columns, depth 1, floor mode.
//
// Forward, per (sample, band of 8 rows), channels inner: one pass over the band computes the
// level-0 window maxima and their position in the window, the 1-channel projection of level 0
// (sum over channels of weight * max, accumulated while the band is in cache) and, when
// concat_input, copies the band into the output channels after the pyramid ones (so the
// concatenation [psp, x] needs no separate copy). Coarser levels take the maxima of 2x2 (or 2x1)
// level-below cells (the cascade 8 -> 16 -> 32 -> 64), then their projection. The projections are
// padded with a ring of bias values (MONAI's 1x1 conv with padding (1, 1, 0)) and upsampled
// straight into the output channels 0..P-1: the tables index_h/index_w say which padded cells
// each output row/column reads and lambda_* the linear weights (nearest and transpose read one
// cell); transpose then multiplies by the transposed-convolution weight of the output's phase in
// the window and adds its bias.
//
// Ties and NaN follow PyTorch's max pooling exactly: in window scan order (rows, then columns)
// the first maximum wins and a NaN wins over numbers (the last NaN when there are several). The
// cascade keeps this: between children, a NaN beats a number (later NaN wins), larger beats
// smaller, and equal values go to the one earlier in row-major order of the whole window.
//
// Backward routes each level's gradient to the argmax position (stored as int8 for level 0 and
// int16 above, positions inside the window) and adds the gradient of the concatenated input: no
// int64 index and no copy of the input is kept.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace ahnet_fast {
namespace {

struct Geometry {
  int64_t N, C, H, W, D;
  int64_t levels;
  bool pool_w;
  std::vector<int64_t> s, sw, h, w;  // per level: window rows/cols, pooled rows/cols
  int64_t pad_w() const { return pool_w ? 1 : 0; }
};

Geometry geometry(at::IntArrayRef size, int64_t levels, bool pool_w) {
  Geometry g;
  g.N = size[0];
  g.C = size[1];
  g.H = size[2];
  g.W = size[3];
  g.D = size[4];
  g.levels = levels;
  g.pool_w = pool_w;
  for (int64_t l = 0; l < levels; ++l) {
    const int64_t s = int64_t{8} << l;
    const int64_t sw = pool_w ? s : 1;
    g.s.push_back(s);
    g.sw.push_back(sw);
    g.h.push_back(g.H / s);
    g.w.push_back(g.W / sw);
  }
  return g;
}

struct Strides5 {
  int64_t n, c, h, w, d;
};

Strides5 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)}; }

// `a` (value va at window position pa) beats `b`: PyTorch's scan rule, applied to two candidates.
template <typename T>
inline bool beats(T va, int64_t pa, T vb, int64_t pb) {
  const bool na = std::isnan(va), nb = std::isnan(vb);
  if (na || nb) return na && (!nb || pa > pb);
  return va > vb || (va == vb && pa < pb);
}

// Running maximum and its window position over n contiguous elements (vectorised: no branches,
// restrict pointers). Takes v when v > m or v is NaN: PyTorch's max-pooling rule.
template <typename scalar_t, typename opmath_t>
inline void max_update(const scalar_t* __restrict src, opmath_t* __restrict m, int32_t* __restrict idx, int32_t pos,
                       int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    const opmath_t v = static_cast<opmath_t>(src[d]);
    const opmath_t cur = m[d];
    const bool take = (v > cur) | (v != v);
    m[d] = take ? v : cur;
    idx[d] = take ? pos : idx[d];
  }
}

// The same over a whole band of one channel, float, dense rows (row r at x + r * row_stride,
// element (w, d) at w * D + d): the hot loop of the forward. Compiled for AVX-512, AVX2 and baseline,
// picked once at load time (GCC function multiversioning).
// With `out`, each element read is also written to out + a * out_row_stride + its offset (the fused
// concatenation), from the same register.
__attribute__((target_clones("avx512f", "avx2", "default"))) void band_max_f32(
    const float* __restrict x, int64_t row_stride, int64_t rows, int64_t sw, int64_t w0, int64_t D,
    float* __restrict m, int32_t* __restrict idx, float* __restrict out, int64_t out_row_stride) {
  for (int64_t a = 0; a < rows; ++a)
    for (int64_t j = 0; j < w0; ++j)
      for (int64_t b = 0; b < sw; ++b) {
        const int64_t offset = (j * sw + b) * D;
        const float* src = x + a * row_stride + offset;
        float* mj = m + j * D;
        int32_t* ij = idx + j * D;
        const int32_t pos = static_cast<int32_t>(a * sw + b);
        if (out != nullptr) {
          float* dst = out + a * out_row_stride + offset;
          for (int64_t d = 0; d < D; ++d) {
            const float v = src[d];
            dst[d] = v;
            const float cur = mj[d];
            const bool take = (v > cur) | (v != v);
            mj[d] = take ? v : cur;
            ij[d] = take ? pos : ij[d];
          }
        } else {
          for (int64_t d = 0; d < D; ++d) {
            const float v = src[d];
            const float cur = mj[d];
            const bool take = (v > cur) | (v != v);
            mj[d] = take ? v : cur;
            ij[d] = take ? pos : ij[d];
          }
        }
      }
}

// Level 0 for one (sample, band of s rows): maxima, argmax, projection, copy of the band.
// kContig: the depth axis is contiguous in x and out (the vectorised path).
template <typename scalar_t, typename opmath_t, bool kContig>
void level0_band(const scalar_t* x, const Strides5& xs, scalar_t* out, const Strides5& os, int64_t out_c0,
                 scalar_t* pooled, int8_t* arg, const opmath_t* pw, opmath_t* proj_row, const Geometry& g,
                 int64_t n, int64_t i, bool copy, std::vector<opmath_t>& m, std::vector<int32_t>& idx) {
  const int64_t s = g.s[0], sw = g.sw[0], w0 = g.w[0], D = g.D, W = g.W;
  const int64_t cells = w0 * D;
  for (int64_t c = 0; c < g.C; ++c) {
    std::fill(m.begin(), m.end(), -std::numeric_limits<opmath_t>::infinity());
    std::fill(idx.begin(), idx.end(), 0);
    bool done = false;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (kContig && xs.w == D && (!copy || os.w == D)) {  // the vectorised band, copy fused in
        band_max_f32(x + n * xs.n + c * xs.c + i * s * xs.h, xs.h, s, sw, w0, D, m.data(), idx.data(),
                     copy ? out + n * os.n + (out_c0 + c) * os.c + i * s * os.h : nullptr, os.h);
        done = true;  // columns right of the last whole window: copy_tail
      }
    }
    for (int64_t a = 0; a < s && !done; ++a) {
      const int64_t hh = i * s + a;
      const scalar_t* row = x + n * xs.n + c * xs.c + hh * xs.h;
      if (copy) {
        scalar_t* orow = out + n * os.n + (out_c0 + c) * os.c + hh * os.h;
        if (kContig && xs.w == D && os.w == D) {
          std::copy(row, row + W * D, orow);
        } else {
          for (int64_t ww = 0; ww < W; ++ww) {
            if (kContig) {
              std::copy(row + ww * xs.w, row + ww * xs.w + D, orow + ww * os.w);
            } else {
              for (int64_t d = 0; d < D; ++d) orow[ww * os.w + d * os.d] = row[ww * xs.w + d * xs.d];
            }
          }
        }
      }
      for (int64_t j = 0; j < w0; ++j) {
        opmath_t* mj = m.data() + j * D;
        int32_t* ij = idx.data() + j * D;
        for (int64_t b = 0; b < sw; ++b) {
          const scalar_t* src = row + (j * sw + b) * xs.w;
          const int32_t pos = static_cast<int32_t>(a * sw + b);
          if (kContig) {
            max_update(src, mj, ij, pos, D);
          } else {
            for (int64_t d = 0; d < D; ++d) {
              const opmath_t v = static_cast<opmath_t>(src[d * xs.d]);
              const bool take = (v > mj[d]) | (v != v);
              mj[d] = take ? v : mj[d];
              ij[d] = take ? pos : ij[d];
            }
          }
        }
      }
    }
    // pooled and arg are contiguous (N, C, h0, w0, D)
    const int64_t base = ((n * g.C + c) * g.h[0] + i) * cells;
    const opmath_t wc = pw[c];
    for (int64_t k = 0; k < cells; ++k) {
      pooled[base + k] = static_cast<scalar_t>(m[k]);
      arg[base + k] = static_cast<int8_t>(idx[k]);
      proj_row[k] += wc * m[k];
    }
  }
}

template <typename scalar_t>
void copy_tail(const scalar_t* x, const Strides5& xs, scalar_t* out, const Strides5& os, int64_t out_c0,
               const Geometry& g) {
  // Rows below the last whole level-0 band, and columns right of the last whole window: not pooled,
  // only copied into the concatenation.
  const int64_t h_cov = g.h[0] * g.s[0], w_cov = g.w[0] * g.sw[0];
  if (h_cov == g.H && w_cov == g.W) return;
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t nc = lo; nc < hi; ++nc) {
      const int64_t n = nc / g.C, c = nc % g.C;
      for (int64_t hh = 0; hh < g.H; ++hh) {
        const int64_t w_from = hh < h_cov ? w_cov : 0;
        for (int64_t ww = w_from; ww < g.W; ++ww)
          for (int64_t d = 0; d < g.D; ++d)
            out[n * os.n + (out_c0 + c) * os.c + hh * os.h + ww * os.w + d * os.d] =
                x[n * xs.n + c * xs.c + hh * xs.h + ww * xs.w + d * xs.d];
      }
    }
  });
}

// Level l from level l-1 (both contiguous (N, C, h, w, D)).
template <typename scalar_t, typename arg_in_t>
void coarsen(const scalar_t* pin, const arg_in_t* ain, scalar_t* pout, int16_t* aout, const Geometry& g, int64_t l) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t hi_ = g.h[l - 1], wi = g.w[l - 1], ho = g.h[l], wo = g.w[l], D = g.D;
  const int64_t sp = g.s[l - 1], swp = g.sw[l - 1], sw = g.sw[l];
  const int64_t cw = g.pool_w ? 2 : 1;
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t nc = lo; nc < hi; ++nc) {
      for (int64_t i = 0; i < ho; ++i)
        for (int64_t j = 0; j < wo; ++j)
          for (int64_t d = 0; d < D; ++d) {
            opmath_t best = 0;
            int64_t best_pos = -1;
            for (int64_t ci = 0; ci < 2; ++ci)
              for (int64_t cj = 0; cj < cw; ++cj) {
                const int64_t k = ((nc * hi_ + 2 * i + ci) * wi + cj + j * cw) * D + d;
                const opmath_t v = static_cast<opmath_t>(pin[k]);
                const int64_t p = static_cast<int64_t>(ain[k]);
                const int64_t pos = (ci * sp + p / swp) * sw + cj * swp + p % swp;
                if (best_pos < 0 || beats(v, pos, best, best_pos)) {
                  best = v;
                  best_pos = pos;
                }
              }
            const int64_t o = ((nc * ho + i) * wo + j) * D + d;
            pout[o] = static_cast<scalar_t>(best);
            aout[o] = static_cast<int16_t>(best_pos);
          }
    }
  });
}

// proj_pad[l] (N, h+2, w+2*pad_w, D): ring = bias, interior = bias + sum_c weight[c] * pooled[c].
template <typename scalar_t, typename opmath_t>
void project(const scalar_t* pooled, const opmath_t* pw, opmath_t bias, opmath_t* pp, const Geometry& g, int64_t l) {
  const int64_t h = g.h[l], w = g.w[l], D = g.D, pad = g.pad_w(), wp = w + 2 * pad;
  const int64_t cells = w * D;
  at::parallel_for(0, g.N * h, 1, [&](int64_t lo, int64_t hi) {
    std::vector<opmath_t> acc(cells);
    for (int64_t ni = lo; ni < hi; ++ni) {
      const int64_t n = ni / h, i = ni % h;
      std::fill(acc.begin(), acc.end(), opmath_t(0));
      for (int64_t c = 0; c < g.C; ++c) {
        const scalar_t* src = pooled + ((n * g.C + c) * h + i) * cells;
        const opmath_t wc = pw[c];
        for (int64_t k = 0; k < cells; ++k) acc[k] += wc * static_cast<opmath_t>(src[k]);
      }
      opmath_t* row = pp + ((n * (h + 2) + i + 1) * wp + pad) * D;
      for (int64_t k = 0; k < cells; ++k) row[k] = acc[k] + bias;
    }
  });
}

void fill_ring(at::Tensor& pp, double bias, bool pad_w) {
  // pp: (N, h+2, w+2*pad_w, D)
  pp.select(1, 0).fill_(bias);
  pp.select(1, pp.size(1) - 1).fill_(bias);
  if (pad_w) {
    pp.select(2, 0).fill_(bias);
    pp.select(2, pp.size(2) - 1).fill_(bias);
  }
}

// Output channel l from proj_pad[l].
template <typename scalar_t, typename opmath_t, bool kContig>
void upsample(const opmath_t* pp, scalar_t* out, const Strides5& os, const Geometry& g, int64_t l,
              const int64_t* ih, const opmath_t* lh, const int64_t* iw, const opmath_t* lw, bool linear,
              const opmath_t* upw, opmath_t upb) {
  const int64_t D = g.D, W = g.W, H = g.H;
  const int64_t wp = g.w[l] + 2 * g.pad_w();
  const int64_t s = g.s[l], sw = g.sw[l];
  at::parallel_for(0, g.N * H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t nh = lo; nh < hi; ++nh) {
      const int64_t n = nh / H, oh = nh % H;
      const int64_t i0 = ih[oh], i1 = ih[H + oh];
      const opmath_t b1 = lh[oh], b0 = opmath_t(1) - b1;
      const opmath_t* r0 = pp + (n * (g.h[l] + 2) + i0) * wp * D;
      const opmath_t* r1 = pp + (n * (g.h[l] + 2) + i1) * wp * D;
      scalar_t* orow = out + n * os.n + l * os.c + oh * os.h;
      for (int64_t ow = 0; ow < W; ++ow) {
        const int64_t j0 = iw[ow], j1 = iw[W + ow];
        const opmath_t a1 = lw[ow], a0 = opmath_t(1) - a1;
        const opmath_t* p00 = r0 + j0 * D;
        const opmath_t* p01 = r0 + j1 * D;
        const opmath_t* p10 = r1 + j0 * D;
        const opmath_t* p11 = r1 + j1 * D;
        scalar_t* o = orow + ow * os.w;
        const int64_t od = kContig ? 1 : os.d;
        if (upw != nullptr) {  // transpose: one cell times the weight of this phase, plus the bias
          const opmath_t k = upw[(oh % s) * sw + (ow % sw)];
          for (int64_t d = 0; d < D; ++d) o[d * od] = static_cast<scalar_t>(p00[d] * k + upb);
        } else if (!linear) {
          for (int64_t d = 0; d < D; ++d) o[d * od] = static_cast<scalar_t>(p00[d]);
        } else {
          for (int64_t d = 0; d < D; ++d)
            o[d * od] = static_cast<scalar_t>(b0 * (a0 * p00[d] + a1 * p01[d]) + b1 * (a0 * p10[d] + a1 * p11[d]));
        }
      }
    }
  });
}

void check_forward_args(const at::Tensor& x, const at::Tensor& proj_weight, const at::Tensor& proj_bias,
                        int64_t levels) {
  TORCH_CHECK(x.dim() == 5, "pyramid_pool: x must be 5-D (N, C, H, W, D), got ", x.sizes());
  TORCH_CHECK(levels >= 1 && levels <= 4, "pyramid_pool: levels must be 1..4, got ", levels);
  TORCH_CHECK(proj_weight.dim() == 2 && proj_weight.size(0) == levels && proj_weight.size(1) == x.size(1),
              "pyramid_pool: proj_weight must be (levels, C), got ", proj_weight.sizes());
  TORCH_CHECK(proj_bias.numel() == levels, "pyramid_pool: proj_bias must have `levels` elements");
  TORCH_CHECK(x.size(2) >= (int64_t{8} << (levels - 1)), "pyramid_pool: H smaller than the largest window");
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> pyramid_pool_cpu(
    const at::Tensor& x_in, const at::Tensor& proj_weight, const at::Tensor& proj_bias,
    const std::optional<at::Tensor>& up_weight, const std::optional<at::Tensor>& up_bias, const at::Tensor& index_h,
    const at::Tensor& lambda_h, const at::Tensor& index_w, const at::Tensor& lambda_w, int64_t levels, bool pool_w,
    bool linear, bool concat_input) {
  check_forward_args(x_in, proj_weight, proj_bias, levels);
  const Geometry g = geometry(x_in.sizes(), levels, pool_w);
  TORCH_CHECK(!pool_w || g.W >= g.sw[levels - 1], "pyramid_pool: W smaller than the largest window");
  const at::Tensor x = x_in;  // any strides
  const bool channels_last = x.stride(1) == 1 && g.C > 1;
  const int64_t out_channels = levels + (concat_input ? g.C : 0);
  at::Tensor out = at::empty({g.N, out_channels, g.H, g.W, g.D}, x.options(),
                             channels_last ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous);
  const auto op_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> pooled, args, proj;
  for (int64_t l = 0; l < levels; ++l) {
    pooled.push_back(at::empty({g.N, g.C, g.h[l], g.w[l], g.D}, x.options()));
    args.push_back(at::empty({g.N, g.C, g.h[l], g.w[l], g.D}, x.options().dtype(l == 0 ? at::kChar : at::kShort)));
    proj.push_back(at::empty({g.N, g.h[l] + 2, g.w[l] + 2 * g.pad_w(), g.D}, x.options().dtype(op_dtype)));
  }
  const at::Tensor pw = proj_weight.to(op_dtype).contiguous();
  const at::Tensor pb = proj_bias.to(at::kDouble).contiguous();
  at::Tensor uw, ub;
  if (up_weight.has_value()) {
    uw = up_weight->to(op_dtype).contiguous();
    ub = up_bias.value().to(at::kDouble).contiguous();
  }
  const at::Tensor ih = index_h.to(at::kLong).contiguous(), iw = index_w.to(at::kLong).contiguous();
  const at::Tensor lh = lambda_h.to(op_dtype).contiguous(), lw = lambda_w.to(op_dtype).contiguous();
  TORCH_CHECK(ih.size(0) == levels && ih.size(1) == 2 && ih.size(2) == g.H, "pyramid_pool: index_h must be (levels, 2, H)");
  TORCH_CHECK(iw.size(0) == levels && iw.size(1) == 2 && iw.size(2) == g.W, "pyramid_pool: index_w must be (levels, 2, W)");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pyramid_pool_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const Strides5 xs = strides_of(x), os = strides_of(out);
    const bool contig = xs.d == 1 && os.d == 1;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const opmath_t* pwp = pw.const_data_ptr<opmath_t>();
    const double* pbp = pb.const_data_ptr<double>();
    // level 0: one pass over the map
    {
      at::Tensor pp0 = proj[0];
      fill_ring(pp0, pbp[0], pool_w);
      opmath_t* pp = pp0.mutable_data_ptr<opmath_t>();
      scalar_t* p0 = pooled[0].mutable_data_ptr<scalar_t>();
      int8_t* a0 = args[0].mutable_data_ptr<int8_t>();
      const int64_t h0 = g.h[0], cells = g.w[0] * g.D, wp = g.w[0] + 2 * g.pad_w();
      at::parallel_for(0, g.N * h0, 1, [&](int64_t lo, int64_t hi) {
        std::vector<opmath_t> m(cells), acc(cells);
        std::vector<int32_t> idx(cells);
        for (int64_t ni = lo; ni < hi; ++ni) {
          const int64_t n = ni / h0, i = ni % h0;
          std::fill(acc.begin(), acc.end(), opmath_t(0));
          if (contig)
            level0_band<scalar_t, opmath_t, true>(xp, xs, op, os, levels, p0, a0, pwp, acc.data(), g, n, i,
                                                  concat_input, m, idx);
          else
            level0_band<scalar_t, opmath_t, false>(xp, xs, op, os, levels, p0, a0, pwp, acc.data(), g, n, i,
                                                   concat_input, m, idx);
          opmath_t* row = pp + ((n * (h0 + 2) + i + 1) * wp + g.pad_w()) * g.D;
          const opmath_t b = static_cast<opmath_t>(pbp[0]);
          for (int64_t k = 0; k < cells; ++k) row[k] = acc[k] + b;
        }
        });
    }
    if (concat_input) copy_tail<scalar_t>(xp, xs, op, os, levels, g);
    // coarser levels from the level below
    for (int64_t l = 1; l < levels; ++l) {
      if (l == 1)
        coarsen<scalar_t, int8_t>(pooled[0].const_data_ptr<scalar_t>(), args[0].const_data_ptr<int8_t>(),
                                  pooled[1].mutable_data_ptr<scalar_t>(), args[1].mutable_data_ptr<int16_t>(), g, l);
      else
        coarsen<scalar_t, int16_t>(pooled[l - 1].const_data_ptr<scalar_t>(), args[l - 1].const_data_ptr<int16_t>(),
                                   pooled[l].mutable_data_ptr<scalar_t>(), args[l].mutable_data_ptr<int16_t>(), g, l);
      at::Tensor ppl = proj[l];
      fill_ring(ppl, pbp[l], pool_w);
      project<scalar_t, opmath_t>(pooled[l].const_data_ptr<scalar_t>(), pwp + l * g.C, static_cast<opmath_t>(pbp[l]),
                                  ppl.mutable_data_ptr<opmath_t>(), g, l);
    }
    // upsampling into output channels 0..levels-1
    for (int64_t l = 0; l < levels; ++l) {
      const opmath_t* upw = uw.defined() ? uw.const_data_ptr<opmath_t>() + l * uw.size(1) : nullptr;
      const opmath_t upb = ub.defined() ? static_cast<opmath_t>(ub.const_data_ptr<double>()[l]) : opmath_t(0);
      const int64_t* ihp = ih.const_data_ptr<int64_t>() + l * 2 * g.H;
      const int64_t* iwp = iw.const_data_ptr<int64_t>() + l * 2 * g.W;
      const opmath_t* lhp = lh.const_data_ptr<opmath_t>() + l * g.H;
      const opmath_t* lwp = lw.const_data_ptr<opmath_t>() + l * g.W;
      if (os.d == 1)
        upsample<scalar_t, opmath_t, true>(proj[l].const_data_ptr<opmath_t>(), op, os, g, l, ihp, lhp, iwp, lwp,
                                           linear, upw, upb);
      else
        upsample<scalar_t, opmath_t, false>(proj[l].const_data_ptr<opmath_t>(), op, os, g, l, ihp, lhp, iwp, lwp,
                                            linear, upw, upb);
    }
  });
  return {out, pooled, args, proj};
}

// grad_x = grad_identity (or 0) + sum over levels of grad_pooled[l] routed to its argmax.
template <typename scalar_t, typename opmath_t>
void route_band(const scalar_t* gid, const Strides5& gs, scalar_t* gx, const Strides5& xs,
                const std::vector<const opmath_t*>& gp, const std::vector<const void*>& ap, const Geometry& g,
                int64_t n, int64_t c, int64_t r0, int64_t r1, std::vector<opmath_t>& buf) {
  // Rows r0..r1 of this (n, c) plane are accumulated in place in gx when it holds opmath_t in dense
  // rows (float32/float64, contiguous), else in buf (rows, W, D) and converted at the end.
  const int64_t W = g.W, D = g.D, WD = W * D;
  const bool direct = std::is_same_v<scalar_t, opmath_t> && xs.d == 1 && xs.w == D;
  auto work_row = [&](int64_t hh) -> opmath_t* {
    return direct ? reinterpret_cast<opmath_t*>(gx + n * xs.n + c * xs.c + hh * xs.h) : buf.data() + (hh - r0) * WD;
  };
  for (int64_t hh = r0; hh < r1; ++hh) {
    opmath_t* b = work_row(hh);
    if (gid != nullptr) {
      const scalar_t* src = gid + n * gs.n + c * gs.c + hh * gs.h;
      if (direct && gs.d == 1 && gs.w == D) {
        // in place (pyramid_pool_backward_: the identity gradient is gx itself) there is nothing to copy
        if (static_cast<const void*>(src) != static_cast<const void*>(b))
          std::copy(src, src + WD, reinterpret_cast<scalar_t*>(b));
      } else if (gs.d == 1) {
        for (int64_t ww = 0; ww < W; ++ww)
          for (int64_t d = 0; d < D; ++d) b[ww * D + d] = static_cast<opmath_t>(src[ww * gs.w + d]);
      } else {
        for (int64_t ww = 0; ww < W; ++ww)
          for (int64_t d = 0; d < D; ++d) b[ww * D + d] = static_cast<opmath_t>(src[ww * gs.w + d * gs.d]);
      }
    } else {
      std::fill(b, b + WD, opmath_t(0));
    }
  }
  for (int64_t l = 0; l < g.levels; ++l) {
    const int64_t s = g.s[l], sw = g.sw[l], h = g.h[l], w = g.w[l];
    // pooled rows whose windows overlap [r0, r1)
    const int64_t i_lo = r0 / s, i_hi = std::min(h, (r1 + s - 1) / s);
    for (int64_t i = i_lo; i < i_hi; ++i) {
      const int64_t base = ((n * g.C + c) * h + i) * w * D;
      const opmath_t* gpl = gp[l] + base;
      for (int64_t k = 0; k < w * D; ++k) {
        const int64_t p = l == 0 ? static_cast<int64_t>(static_cast<const int8_t*>(ap[l])[base + k])
                                 : static_cast<int64_t>(static_cast<const int16_t*>(ap[l])[base + k]);
        const int64_t hh = i * s + p / sw;
        if (hh < r0 || hh >= r1) continue;
        const int64_t j = k / D, d = k % D;
        const int64_t ww = j * sw + p % sw;
        work_row(hh)[ww * D + d] += gpl[k];
      }
    }
  }
  if (direct) return;
  for (int64_t hh = r0; hh < r1; ++hh) {
    const opmath_t* b = buf.data() + (hh - r0) * WD;
    scalar_t* dst = gx + n * xs.n + c * xs.c + hh * xs.h;
    if (xs.d == 1) {
      for (int64_t ww = 0; ww < W; ++ww)
        for (int64_t d = 0; d < D; ++d) dst[ww * xs.w + d] = static_cast<scalar_t>(b[ww * D + d]);
    } else {
      for (int64_t ww = 0; ww < W; ++ww)
        for (int64_t d = 0; d < D; ++d) dst[ww * xs.w + d * xs.d] = static_cast<scalar_t>(b[ww * D + d]);
    }
  }
}

// Whether no two indices of t address one element (sufficient test: ordered by stride, each axis'
// stride passes the furthest element the axes inside it reach). A channel slice of a dense gradient
// passes; an expanded one does not.
bool no_overlap(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> axes;  // (stride, size) of the axes longer than one
  for (int64_t i = 0; i < t.dim(); ++i)
    if (t.size(i) > 1) axes.emplace_back(t.stride(i), t.size(i));
  std::sort(axes.begin(), axes.end());
  int64_t reach = 0;  // the largest offset the inner axes address
  for (const auto& [stride, size] : axes) {
    if (stride <= reach) return false;
    reach += stride * (size - 1);
  }
  return true;
}

// Routes each level's pooled gradient to its argmax, over gid (the identity gradient, or nullptr:
// zeros), into gx; gid may be gx itself (in place).
void route_pooled_gradient(const at::Tensor& gid, at::Tensor& gx, at::TensorList grad_pooled, at::TensorList argmax,
                           bool pool_w, const char* name) {
  const int64_t levels = static_cast<int64_t>(grad_pooled.size());
  TORCH_CHECK(gx.dim() == 5, name, ": the gradient must be (N, C, H, W, D)");
  TORCH_CHECK(levels >= 1 && levels <= 4 && static_cast<int64_t>(argmax.size()) == levels,
              name, ": one grad_pooled and one argmax per level (1..4)");
  const Geometry g = geometry(gx.sizes(), levels, pool_w);
  const at::ScalarType dtype = gx.scalar_type();
  const auto op_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> gps, aps;
  for (int64_t l = 0; l < levels; ++l) {
    TORCH_CHECK(grad_pooled[l].sizes() == at::IntArrayRef({g.N, g.C, g.h[l], g.w[l], g.D}),
                name, ": grad_pooled[", l, "] has shape ", grad_pooled[l].sizes());
    TORCH_CHECK(argmax[l].scalar_type() == (l == 0 ? at::kChar : at::kShort), name, ": argmax dtype");
    TORCH_CHECK(argmax[l].sizes() == grad_pooled[l].sizes(), name, ": argmax[", l, "] has shape ", argmax[l].sizes());
    gps.push_back(grad_pooled[l].to(op_dtype).contiguous());
    aps.push_back(argmax[l].contiguous());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "pyramid_pool_route", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<const opmath_t*> gp;
    std::vector<const void*> ap;
    for (int64_t l = 0; l < levels; ++l) {
      gp.push_back(gps[l].const_data_ptr<opmath_t>());
      ap.push_back(aps[l].const_data_ptr());
    }
    const scalar_t* gidp = gid.defined() ? gid.const_data_ptr<scalar_t>() : nullptr;
    const Strides5 gs = gid.defined() ? strides_of(gid) : Strides5{0, 0, 0, 0, 0};
    const Strides5 xs = strides_of(gx);
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const int64_t band = 8;
    const int64_t bands = (g.H + band - 1) / band;
    at::parallel_for(0, g.N * g.C * bands, 1, [&](int64_t lo, int64_t hi) {
      std::vector<opmath_t> buf(band * g.W * g.D);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t nc = t / bands, r = t % bands;
        const int64_t r0 = r * band, r1 = std::min(g.H, r0 + band);
        route_band<scalar_t, opmath_t>(gidp, gs, gxp, xs, gp, ap, g, nc / g.C, nc % g.C, r0, r1, buf);
      }
    });
  });
}

at::Tensor pyramid_pool_backward_cpu(const std::optional<at::Tensor>& grad_identity, at::TensorList grad_pooled,
                            at::TensorList argmax, at::IntArrayRef size, bool pool_w, at::ScalarType dtype,
                            bool channels_last) {
  TORCH_CHECK(size.size() == 5, "pyramid_pool_backward: size must be (N, C, H, W, D)");
  TORCH_CHECK(!grad_pooled.empty(), "pyramid_pool_backward: one grad_pooled and one argmax per level (1..4)");
  at::Tensor gx = at::empty(size, grad_pooled[0].options().dtype(dtype),
                            channels_last ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous);
  at::Tensor gid;
  if (grad_identity.has_value()) {
    gid = *grad_identity;
    TORCH_CHECK(gid.sizes() == gx.sizes() && gid.scalar_type() == dtype, "pyramid_pool_backward: grad_identity must be ",
                size, " of dtype ", dtype);
  }
  route_pooled_gradient(gid, gx, grad_pooled, argmax, pool_w, "pyramid_pool_backward");
  return gx;
}

void pyramid_pool_backward_inplace_cpu(at::Tensor& grad_x, at::TensorList grad_pooled, at::TensorList argmax,
                                       bool pool_w) {
  // rows are read and written band by band by one thread each: no element is read after another
  // thread wrote it, so the identity gradient can be the destination
  TORCH_CHECK(no_overlap(grad_x), "pyramid_pool_backward_: grad_x's elements must not overlap, got strides ",
              grad_x.strides(), " for sizes ", grad_x.sizes());
  route_pooled_gradient(grad_x, grad_x, grad_pooled, argmax, pool_w, "pyramid_pool_backward_");
}

}  // namespace

TORCH_LIBRARY_IMPL(ahnet_fast, CPU, m) {
  m.impl("pyramid_pool", &pyramid_pool_cpu);
  m.impl("pyramid_pool_backward", &pyramid_pool_backward_cpu);
  m.impl("pyramid_pool_backward_", &pyramid_pool_backward_inplace_cpu);
}

}  // namespace ahnet_fast

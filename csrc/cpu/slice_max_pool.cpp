// CPU kernels of ahnet_fast::slice_max_pool / slice_max_pool_backward: max pooling along the last
// axis only (windows (1, 1, k), stride k, floor mode), keeping one byte per output (the winning
// position in its window) instead of the input and int64 indices.
//
// The input may have any dense strides. Besides the contiguous and channels-last layouts this
// takes the stem's convolution output as it comes from the slice-folded conv2d: (N, C, H, W, D)
// viewed on (N, D, C, H, W) memory, whose slice axis is the outermost. Pooling reads it there and
// writes a contiguous output, so the transposition costs no separate pass.
//
// The map is seen as (N, C, H, W, D) (a 2D map (N, C, H, W) as (N, C, H, 1, W)). Of the four
// non-pooled axes, the one with the smallest input stride is walked innermost ("lane" axis);
// the other three are flattened into rows, split across threads. Contiguous input is one stream
// of windows; the folded stem's planes are read a tile of lanes at a time (unit stride) and the
// tile transposed into the output; other layouts take a plain strided loop.
//
// Ties and NaN follow PyTorch's max pooling: the first maximum in the window wins and a NaN wins
// over any number (the last NaN when there are several).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace ahnet_fast {
namespace {

// Five sizes and strides of a (N, C, H, W, D) view, 2D maps with W = 1.
struct View5 {
  std::array<int64_t, 5> size, stride;
};

View5 view5(at::IntArrayRef size, at::IntArrayRef stride) {
  View5 v;
  if (size.size() == 5) {
    for (int i = 0; i < 5; ++i) {
      v.size[i] = size[i];
      v.stride[i] = stride[i];
    }
  } else {  // (N, C, H, W): the pooled axis W becomes D, a unit W is inserted
    v.size = {size[0], size[1], size[2], 1, size[3]};
    v.stride = {stride[0], stride[1], stride[2], 0, stride[3]};
  }
  return v;
}

// How the non-pooled axes are walked: `lane` is innermost; rows enumerate the other three.
struct Walk {
  int lane;
  std::array<int, 3> outer;  // axes of the row index, slowest first
  int64_t rows, lanes;
};

Walk walk_of(const View5& x) {
  Walk w;
  w.lane = 3;  // W by default (a size-1 axis is never the lane unless every axis is)
  int64_t best = -1;
  for (int a = 0; a < 4; ++a) {
    if (x.size[a] == 1) continue;
    if (best < 0 || x.stride[a] < best) {
      best = x.stride[a];
      w.lane = a;
    }
  }
  int j = 0;
  for (int a = 0; a < 4; ++a)
    if (a != w.lane) w.outer[j++] = a;
  w.rows = x.size[w.outer[0]] * x.size[w.outer[1]] * x.size[w.outer[2]];
  w.lanes = x.size[w.lane];
  return w;
}

// Offset of row r (in `outer` order) under strides s.
inline int64_t row_offset(int64_t r, const Walk& w, const View5& v, const std::array<int64_t, 5>& s) {
  const int64_t i2 = r % v.size[w.outer[2]];
  r /= v.size[w.outer[2]];
  const int64_t i1 = r % v.size[w.outer[1]];
  const int64_t i0 = r / v.size[w.outer[1]];
  return i0 * s[w.outer[0]] + i1 * s[w.outer[1]] + i2 * s[w.outer[2]];
}

template <typename scalar_t>
inline bool isnan_(scalar_t v) {
  return v != v;
}

// The window maxima of `rows` contiguous rows of d_in slices into rows of d_out (the contiguous
// layout): one streaming pass.
template <typename scalar_t>
void rows_forward(const scalar_t* __restrict x, scalar_t* __restrict out, uint8_t* __restrict pos, int64_t rows,
                  int64_t d_in, int64_t d_out, int64_t k) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = x + r * d_in;
    scalar_t* o = out + r * d_out;
    uint8_t* p = pos + r * d_out;
    for (int64_t j = 0; j < d_out; ++j) {
      scalar_t best = s[j * k];
      uint8_t at = 0;
      for (int64_t i = 1; i < k; ++i) {
        const scalar_t v = s[j * k + i];
        const bool take = (v > best) | isnan_(v);
        best = take ? v : best;
        at = take ? static_cast<uint8_t>(i) : at;
      }
      o[j] = best;
      p[j] = at;
    }
  }
}

// k = 2 over n windows laid end to end (float, no leftover slices): branch-free, vectorised.
__attribute__((target_clones("avx512f", "avx2", "default"))) void pairs_forward_f32(
    const float* __restrict x, float* __restrict out, uint8_t* __restrict pos, int64_t n) {
  for (int64_t m = 0; m < n; ++m) {
    const float a = x[2 * m], b = x[2 * m + 1];
    const bool take = (b > a) | (b != b);
    out[m] = take ? b : a;
    pos[m] = take;
  }
}

// The gradient of pairs_forward_f32: each output's gradient to its window's winner, 0 to the other.
__attribute__((target_clones("avx512f", "avx2", "default"))) void pairs_backward_f32(
    const float* __restrict grad, const uint8_t* __restrict pos, float* __restrict grad_x, int64_t n) {
  for (int64_t m = 0; m < n; ++m) {
    const float g = grad[m];
    const bool second = pos[m] != 0;
    grad_x[2 * m] = second ? 0.f : g;
    grad_x[2 * m + 1] = second ? g : 0.f;
  }
}

// The inner loops of the slice-major paths, apart so that their pointers are restrict-qualified
// (in place, the compiler assumed the output could alias the tile buffers and kept them scalar).
template <typename scalar_t>
inline void first_slice(const scalar_t* __restrict src, scalar_t* __restrict best, uint8_t* __restrict at,
                        int64_t n) {
  for (int64_t l = 0; l < n; ++l) {
    best[l] = src[l];
    at[l] = 0;
  }
}

template <typename scalar_t>
inline void next_slice(const scalar_t* __restrict src, scalar_t* __restrict best, uint8_t* __restrict at,
                       uint8_t i, int64_t n) {
  for (int64_t l = 0; l < n; ++l) {
    const scalar_t v = src[l];
    const bool take = (v > best[l]) | isnan_(v);
    best[l] = take ? v : best[l];
    at[l] = take ? i : at[l];
  }
}

template <typename scalar_t>
inline void route(const scalar_t* __restrict grad, const uint8_t* __restrict at, uint8_t i,
                  scalar_t* __restrict grad_x, int64_t n) {
  const scalar_t zero(0);
  for (int64_t l = 0; l < n; ++l) {
    const scalar_t g = grad[l];  // loaded unconditionally, so the select vectorises
    grad_x[l] = at[l] == i ? g : zero;
  }
}

// tile (rows x pitch, row-major) -> out (cols x rows, row-major), cols = n
template <typename T>
inline void untile(const T* __restrict tile, T* __restrict out, int64_t rows, int64_t n, int64_t pitch) {
  for (int64_t l = 0; l < n; ++l)
    for (int64_t j = 0; j < rows; ++j) out[l * rows + j] = tile[j * pitch + l];
}

template <typename T>
inline void retile(const T* __restrict in, T* __restrict tile, int64_t rows, int64_t n, int64_t pitch) {
  for (int64_t l = 0; l < n; ++l)
    for (int64_t j = 0; j < rows; ++j) tile[j * pitch + l] = in[l * rows + j];
}

constexpr int64_t kTile = 1024;  // plane elements per tile of the slice-major paths
// Row pitch of a tile buffer: not a power of two, so that the transposition's column walk does not
// hit one cache set (rows 4 KiB apart alias in L1).
constexpr int64_t kPitch = kTile + 16;

// x (N, C, H, W, D) with each sample's slices as whole planes: (C, H, W) contiguous within a
// plane, the slice axis outside it (the stem's conv2d output over slices, viewed as 5D).
bool slice_major(const View5& v) {
  const int64_t plane = v.size[1] * v.size[2] * v.size[3];
  return v.stride[3] == 1 && (v.size[2] == 1 || v.stride[2] == v.size[3]) &&
         (v.size[1] == 1 || v.stride[1] == v.size[2] * v.size[3]) && v.stride[4] >= plane && v.size[4] > 1;
}

template <typename scalar_t>
void pool_forward(const at::Tensor& x, at::Tensor& out, at::Tensor& position, int64_t k) {
  const View5 xv = view5(x.sizes(), x.strides());
  const View5 ov = view5(out.sizes(), out.strides());
  const int64_t d_in = xv.size[4], d_out = ov.size[4];
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  uint8_t* pp = position.mutable_data_ptr<uint8_t>();  // laid out as out

  if (x.is_contiguous() && out.is_contiguous()) {  // rows of slices, end to end
    const int64_t rows = x.numel() / d_in;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (k == 2 && d_in == 2 * d_out) {
        at::parallel_for(0, rows * d_out, 1 << 14, [&](int64_t begin, int64_t end) {
          pairs_forward_f32(xp + 2 * begin, op + begin, pp + begin, end - begin);
        });
        return;
      }
    }
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / d_in), [&](int64_t begin, int64_t end) {
      rows_forward(xp + begin * d_in, op + begin * d_out, pp + begin * d_out, end - begin, d_in, d_out, k);
    });
    return;
  }

  if (slice_major(xv) && out.is_contiguous()) {
    // The slice-folded stem: per tile of a sample's plane, the maxima of unit-stride plane
    // segments into a buffer, then the small transposition into out's rows.
    const int64_t plane = xv.size[1] * xv.size[2] * xv.size[3], tiles = (plane + kTile - 1) / kTile;
    at::parallel_for(0, xv.size[0] * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> best(kPitch * d_out);
      std::vector<uint8_t> at(kPitch * d_out);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / tiles, l0 = (t % tiles) * kTile, len = std::min(kTile, plane - l0);
        const scalar_t* src = xp + n * xv.stride[0] + l0;
        for (int64_t j = 0; j < d_out; ++j) {
          const scalar_t* s0 = src + j * k * xv.stride[4];
          first_slice(s0, best.data() + j * kPitch, at.data() + j * kPitch, len);
          for (int64_t i = 1; i < k; ++i)
            next_slice(s0 + i * xv.stride[4], best.data() + j * kPitch, at.data() + j * kPitch,
                       static_cast<uint8_t>(i), len);
        }
        const int64_t o = (n * plane + l0) * d_out;
        untile(best.data(), op + o, d_out, len, kPitch);
        untile(at.data(), pp + o, d_out, len, kPitch);
      }
    });
    return;
  }

  const Walk w = walk_of(xv);
  const int64_t xl = xv.stride[w.lane], xd = xv.stride[4];
  const int64_t ol = ov.stride[w.lane], od = ov.stride[4];

  // Any other dense layout (channels-last among them): lanes along the densest non-pooled axis.
  at::parallel_for(0, w.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = xp + row_offset(r, w, xv, xv.stride);
      const int64_t o = row_offset(r, w, ov, ov.stride);
      for (int64_t j = 0; j < d_out; ++j)
        for (int64_t l = 0; l < w.lanes; ++l) {
          const scalar_t* s = src + l * xl + j * k * xd;
          scalar_t best = s[0];
          uint8_t at = 0;
          for (int64_t i = 1; i < k; ++i) {
            const scalar_t v = s[i * xd];
            const bool take = (v > best) | isnan_(v);
            best = take ? v : best;
            at = take ? static_cast<uint8_t>(i) : at;
          }
          op[o + l * ol + j * od] = best;
          pp[o + l * ol + j * od] = at;
        }
    }
  });
}

template <typename scalar_t>
void pool_backward(const at::Tensor& grad, const at::Tensor& position, at::Tensor& grad_x, int64_t k) {
  const View5 gv = view5(grad.sizes(), grad.strides());
  const View5 xv = view5(grad_x.sizes(), grad_x.strides());
  const int64_t d_out = gv.size[4], d_in = xv.size[4];
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const uint8_t* pp = position.const_data_ptr<uint8_t>();  // laid out as grad
  scalar_t* xp = grad_x.mutable_data_ptr<scalar_t>();
  const scalar_t zero(0);

  if (grad_x.is_contiguous() && grad.is_contiguous()) {
    const int64_t rows = grad_x.numel() / d_in;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (k == 2 && d_in == 2 * d_out) {
        at::parallel_for(0, rows * d_out, 1 << 14, [&](int64_t begin, int64_t end) {
          pairs_backward_f32(gp + begin, pp + begin, xp + 2 * begin, end - begin);
        });
        return;
      }
    }
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / d_in), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = gp + r * d_out;
        const uint8_t* p = pp + r * d_out;
        scalar_t* d = xp + r * d_in;
        for (int64_t j = 0; j < d_out; ++j)
          for (int64_t i = 0; i < k; ++i) d[j * k + i] = p[j] == i ? g[j] : zero;
        for (int64_t s = d_out * k; s < d_in; ++s) d[s] = zero;  // slices past the last window
      }
    });
    return;
  }

  if (slice_major(xv) && grad.is_contiguous()) {  // the slice-folded stem, as in the forward
    const int64_t plane = xv.size[1] * xv.size[2] * xv.size[3], tiles = (plane + kTile - 1) / kTile;
    at::parallel_for(0, xv.size[0] * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> gt(kPitch * d_out);
      std::vector<uint8_t> pt(kPitch * d_out);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / tiles, l0 = (t % tiles) * kTile, len = std::min(kTile, plane - l0);
        const int64_t o = (n * plane + l0) * d_out;
        retile(gp + o, gt.data(), d_out, len, kPitch);
        retile(pp + o, pt.data(), d_out, len, kPitch);
        scalar_t* dst = xp + n * xv.stride[0] + l0;
        for (int64_t j = 0; j < d_out; ++j)
          for (int64_t i = 0; i < k; ++i)
            route(gt.data() + j * kPitch, pt.data() + j * kPitch, static_cast<uint8_t>(i),
                  dst + (j * k + i) * xv.stride[4], len);
        for (int64_t s = d_out * k; s < d_in; ++s) std::fill_n(dst + s * xv.stride[4], len, zero);
      }
    });
    return;
  }

  // Any other dense layout: lanes along the densest non-pooled axis, strided.
  const Walk w = walk_of(xv);
  const int64_t xl = xv.stride[w.lane], xd = xv.stride[4];
  const int64_t gl = gv.stride[w.lane], gd = gv.stride[4];
  at::parallel_for(0, w.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = row_offset(r, w, gv, gv.stride);
      scalar_t* dst = xp + row_offset(r, w, xv, xv.stride);
      for (int64_t l = 0; l < w.lanes; ++l)
        for (int64_t j = 0; j < d_out; ++j) {
          const scalar_t v = gp[o + l * gl + j * gd];
          const uint8_t at = pp[o + l * gl + j * gd];
          for (int64_t i = 0; i < k; ++i) dst[l * xl + (j * k + i) * xd] = i == at ? v : zero;
        }
      for (int64_t s = d_out * k; s < d_in; ++s)
        for (int64_t l = 0; l < w.lanes; ++l) dst[l * xl + s * xd] = zero;
    }
  });
}

bool channels_last(const at::Tensor& x) {
  return x.dim() >= 4 && x.size(1) > 1 && x.stride(1) == 1 && !x.is_contiguous();
}

void check_input(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, "slice_max_pool: input must be 4D or 5D, got ", x.dim(), "D");
  TORCH_CHECK(k >= 1 && k <= 255, "slice_max_pool: window must be in [1, 255], got ", k);
  TORCH_CHECK(x.size(-1) >= k, "slice_max_pool: the last axis (", x.size(-1), ") is shorter than the window (", k,
              ")");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "slice_max_pool: input must be dense (no overlapping or gaps)");
}

std::tuple<at::Tensor, at::Tensor> slice_max_pool_cpu(const at::Tensor& x, int64_t k) {
  check_input(x, k);
  std::vector<int64_t> size(x.sizes().begin(), x.sizes().end());
  size.back() /= k;
  const auto format = !channels_last(x) ? at::MemoryFormat::Contiguous
                      : x.dim() == 5    ? at::MemoryFormat::ChannelsLast3d
                                        : at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty(size, x.options().memory_format(format));
  at::Tensor position = at::empty(size, x.options().dtype(at::kByte).memory_format(format));
  if (out.numel() == 0) return {out, position};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "slice_max_pool_cpu",
                                  [&] { pool_forward<scalar_t>(x, out, position, k); });
  return {out, position};
}

at::Tensor slice_max_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& position, int64_t k,
                                       at::IntArrayRef size, at::IntArrayRef stride) {
  TORCH_CHECK(grad.sizes() == position.sizes(), "slice_max_pool_backward: grad and position shapes differ");
  TORCH_CHECK(size.size() == static_cast<size_t>(grad.dim()) && stride.size() == size.size(),
              "slice_max_pool_backward: size/stride do not match the gradient's dimensions");
  TORCH_CHECK(k >= 1 && size.back() / k == grad.size(-1), "slice_max_pool_backward: window ", k,
              " does not map ", size.back(), " slices to ", grad.size(-1));
  at::Tensor grad_x = at::empty_strided(size, stride, grad.options());
  if (grad_x.numel() == 0) return grad_x;
  // the kernel reads grad with the position's strides (the incoming gradient may be laid out otherwise)
  const at::Tensor g = grad.strides() == position.strides() ? grad : at::empty_like(position, grad.options()).copy_(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "slice_max_pool_backward_cpu",
                                  [&] { pool_backward<scalar_t>(g, position, grad_x, k); });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(ahnet_fast, CPU, m) {
  m.impl("slice_max_pool", &slice_max_pool_cpu);
  m.impl("slice_max_pool_backward", &slice_max_pool_backward_cpu);
}

}  // namespace ahnet_fast

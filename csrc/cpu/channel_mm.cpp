// CPU kernel of ahnet_fast::channel_mm_: out (+)= weight @ act(x), the matrix product behind AH-Net's
// convolutions on channel-first maps (see channel_mm.avx512.cpp for why it is ours and how it is blocked).
//
//   weight (M, K), any strides (read in place); x (K, N) with contiguous rows (a band of a map is a row-strided view);
//   out (M, N) with contiguous rows, not overlapping weight or x; scale, shift: K values each or both
//   absent; act(v) = max(0, v * scale[k] + shift[k]) (BatchNorm folded to one multiply-add, then ReLU),
//   or v. float32 only: other dtypes take torch.mm (ahnet_fast/ops/channel_mm.py chooses).
//
// Without AVX-512 (or with AHNET_FAST_NO_AVX512=1) the same result comes from ATen (mm / addmm_ on the
// activated x), so the op runs everywhere; the Python side only calls it where the kernel runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "channel_mm.h"
#include "isa.h"

namespace ahnet_fast {
namespace {

bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const char* a0 = static_cast<const char*>(a.data_ptr());
  const char* b0 = static_cast<const char*>(b.data_ptr());
  const auto extent = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return (last + 1) * static_cast<int64_t>(t.element_size());
  };
  return a0 < b0 + extent(b) && b0 < a0 + extent(a);
}

void check(const at::Tensor& out, const at::Tensor& weight, const at::Tensor& x,
           const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() == 2 && out.dim() == 2,
              "channel_mm_: weight, x and out must be matrices, got ", weight.sizes(), ", ", x.sizes(), ", ",
              out.sizes());
  TORCH_CHECK(weight.size(1) == x.size(0) && out.size(0) == weight.size(0) && out.size(1) == x.size(1),
              "channel_mm_: shapes do not chain: weight ", weight.sizes(), ", x ", x.sizes(), ", out ", out.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "channel_mm_: float32 tensors only, got weight ", weight.scalar_type(), ", x ", x.scalar_type(),
              ", out ", out.scalar_type());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "channel_mm_: x's rows must be contiguous, strides ", x.strides());
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1, "channel_mm_: out's rows must be contiguous, strides ",
              out.strides());
  TORCH_CHECK(scale.has_value() == shift.has_value(), "channel_mm_: give scale and shift together");
  if (scale) {
    TORCH_CHECK(scale->numel() == x.size(0) && shift->numel() == x.size(0) && scale->scalar_type() == at::kFloat &&
                    shift->scalar_type() == at::kFloat,
                "channel_mm_: scale and shift need ", x.size(0), " float32 values each");
  }
  TORCH_CHECK(!overlaps(out, x) && !overlaps(out, weight) && !(scale && (overlaps(out, *scale) || overlaps(out, *shift))),
              "channel_mm_: out overlaps an input");
  TORCH_CHECK(out.size(0) <= 1 || out.size(1) == 0 || out.stride(0) >= out.size(1),
              "channel_mm_: out's rows overlap each other, strides ", out.strides());
}

// channel_mm_'s kernel (AVX-512 builds): out (+)= weight @ act(x), weight (M, K) read with its strides, over a
// convolution's taps when `taps` is set (K = channels * T; see ChannelMmJob).
void run_product(const at::Tensor& weight, const at::Tensor& x, const c10::optional<at::Tensor>& scale,
                 const c10::optional<at::Tensor>& shift, at::Tensor& out, bool accumulate,
                 const ChannelConvTaps* taps) {
#ifdef AHNET_FAST_HAVE_AVX2_VARIANT
  const at::Tensor s = scale ? scale->contiguous() : at::Tensor();
  const at::Tensor b = shift ? shift->contiguous() : at::Tensor();
  ChannelMmJob job{weight.data_ptr<float>(),
                   weight.stride(0),
                   weight.stride(1),
                   weight.size(0),
                   weight.size(1),
                   out.size(1),
                   x.data_ptr<float>(),
                   x.size(0) > 0 ? x.stride(0) : 0,
                   scale ? s.data_ptr<float>() : nullptr,
                   shift ? b.data_ptr<float>() : nullptr,
                   out.data_ptr<float>(),
                   out.stride(0),
                   accumulate,
                   taps};
  channel_mm_kernels::isa_avx512::run(job);
#endif
}

void channel_mm_cpu(at::Tensor out, const at::Tensor& weight, const at::Tensor& x,
                    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                    bool accumulate) {
  check(out, weight, x, scale, shift);
  const int64_t M = out.size(0), N = out.size(1), K = x.size(0);
  if (M == 0 || N == 0) return;
  if (chosen_isa() != Isa::avx512) {
    at::Tensor act = x;
    if (scale) act = at::relu(x * scale->reshape({K, 1}) + shift->reshape({K, 1}));
    if (accumulate)
      out.addmm_(weight, act);
    else
      at::mm_out(out, weight, act);
    return;
  }
  run_product(weight, x, scale, shift, out, accumulate, nullptr);
}

// The taps of a kernel over a map (stride 1, the size kept), in the weight's row-major tap order, each offset
// from the centre; fewer than three axes are padded with leading axes of size 1.
ChannelConvTaps conv_taps(at::IntArrayRef spatial, at::IntArrayRef kernel_sizes) {
  const int64_t nd = static_cast<int64_t>(spatial.size());
  ChannelConvTaps geometry{};
  int64_t sizes[3] = {1, 1, 1}, kernel[3] = {1, 1, 1};
  geometry.count = 1;
  for (int64_t d = 0; d < nd; ++d) {
    sizes[3 - nd + d] = spatial[d];
    kernel[3 - nd + d] = kernel_sizes[d];
    geometry.count *= kernel_sizes[d];
  }
  for (int d = 0; d < 3; ++d) geometry.size[d] = static_cast<int32_t>(sizes[d]);
  for (int64_t t = 0; t < geometry.count; ++t) {
    int64_t rest = t, flat = 0, stride = 1;
    for (int d = 2; d >= 0; --d) {
      const int64_t o = rest % kernel[d] - (kernel[d] - 1) / 2;
      rest /= kernel[d];
      geometry.offset[t][d] = static_cast<int32_t>(o);
      flat += o * stride;
      stride *= sizes[d];
    }
    geometry.flat[t] = flat;
  }
  return geometry;
}

// The ATen fallbacks' view of (channels, voxels) rows as a batch of one map, and their padding (the size kept).
at::Tensor as_map(const at::Tensor& rows, at::IntArrayRef spatial) {
  std::vector<int64_t> shape{1, rows.size(0)};
  shape.insert(shape.end(), spatial.begin(), spatial.end());
  return rows.reshape(shape);
}

std::vector<int64_t> same_padding(at::IntArrayRef kernel) {
  std::vector<int64_t> padding;
  for (const int64_t k : kernel) padding.push_back((k - 1) / 2);
  return padding;
}

// The checks channel_mm_conv_ and channel_mm_nt_conv_ share: 1 to 3 spatial axes of sizes in [1, 2^30), odd
// kernel sizes, at most kMaxTaps taps; returns (voxels, taps).
std::pair<int64_t, int64_t> check_conv_geometry(const char* op, at::IntArrayRef spatial, at::IntArrayRef kernel) {
  TORCH_CHECK(spatial.size() >= 1 && spatial.size() <= 3 && kernel.size() == spatial.size(), op,
              ": a kernel over 1 to 3 spatial axes, got kernel ", kernel, " for spatial ", spatial);
  int64_t voxels = 1, taps = 1;
  for (size_t d = 0; d < spatial.size(); ++d) {
    TORCH_CHECK(spatial[d] >= 1 && spatial[d] < (int64_t{1} << 30), op, ": spatial sizes must be in [1, 2^30), got ",
                spatial);
    TORCH_CHECK(kernel[d] % 2 == 1 && kernel[d] > 0, op, ": odd kernel sizes only, got ", kernel);
    // bounded before multiplying: a wrapped product could pass the checks below (the kernel sizes of
    // channel_mm_nt_conv_ are a free argument)
    TORCH_CHECK(kernel[d] <= kMaxTaps, op, ": at most ", kMaxTaps, " taps, got kernel ", kernel);
    TORCH_CHECK(voxels <= std::numeric_limits<int64_t>::max() / spatial[d], op, ": a map of ", spatial,
                " voxels overflows");
    voxels *= spatial[d];
    taps *= kernel[d];
  }
  TORCH_CHECK(taps <= kMaxTaps, op, ": at most ", kMaxTaps, " taps, got ", taps);
  return {voxels, taps};
}

// out (+)= conv(act(x), weight) (channel_mm_conv_): x (Ci, S) a channel-first map of `spatial` (S voxels, rows
// contiguous), weight (Co, Ci, *kernel) contiguous with odd kernel sizes, stride 1, zero padding (k - 1) / 2
// per axis (the size kept), out (Co, S) with contiguous rows. The kernel's panel reads the taps in place
// (channel_mm.avx512.cpp: pack_taps); the weight, contiguous, is the (Co, Ci * T) matrix of that panel.
void channel_mm_conv_cpu(at::Tensor out, const at::Tensor& weight, const at::Tensor& x, at::IntArrayRef spatial,
                      const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, bool accumulate) {
  const int64_t nd = static_cast<int64_t>(spatial.size());
  TORCH_CHECK(nd >= 1 && nd <= 3 && weight.dim() == nd + 2,
              "channel_mm_conv_: a weight (Co, Ci, *kernel) over 1 to 3 spatial axes, got weight ", weight.sizes(),
              " for spatial ", spatial);
  const auto [voxels, taps] = check_conv_geometry("channel_mm_conv_", spatial, weight.sizes().slice(2));
  TORCH_CHECK(weight.is_contiguous(), "channel_mm_conv_: the weight must be contiguous, strides ", weight.strides());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == voxels && x.size(0) == weight.size(1),
              "channel_mm_conv_: x must be (", weight.size(1), ", ", voxels, "), got ", x.sizes());
  const at::Tensor w2 = weight.view({weight.size(0), weight.size(1) * taps});
  TORCH_CHECK(out.dim() == 2 && out.size(0) == weight.size(0) && out.size(1) == voxels,
              "channel_mm_conv_: out must be (", weight.size(0), ", ", voxels, "), got ", out.sizes());
  // dtypes, row strides, overlaps (the first Ci columns of the weight stand for its rows; the whole
  // weight is checked after); scale and shift: Ci values
  check(out, w2.narrow(1, 0, x.size(0)), x, scale, shift);
  TORCH_CHECK(!overlaps(out, weight), "channel_mm_conv_: out overlaps an input");
  const int64_t M = out.size(0), N = out.size(1);
  if (M == 0 || N == 0) return;
  if (x.size(0) == 0) {  // no input channels: a sum of nothing (ATen's convolution would answer an empty tensor)
    if (!accumulate) out.zero_();
    return;
  }
  if (chosen_isa() != Isa::avx512) {
    at::Tensor act = x;
    if (scale) act = at::relu(x * scale->reshape({-1, 1}) + shift->reshape({-1, 1}));
    const at::Tensor y = at::convolution(as_map(act, spatial), weight, c10::nullopt, std::vector<int64_t>(nd, 1),
                                         same_padding(weight.sizes().slice(2)), std::vector<int64_t>(nd, 1), false,
                                         std::vector<int64_t>(nd, 0), 1)
                             .view({M, N});
    if (accumulate)
      out.add_(y);
    else
      out.copy_(y);
    return;
  }
  const ChannelConvTaps geometry = conv_taps(spatial, weight.sizes().slice(2));
  run_product(w2, x, scale, shift, out, accumulate, &geometry);
}

// channel_mm_nt_'s kernel (AVX-512 builds): out (+)= a @ b^T over the voxels, or with `taps` the weight gradient
// of a convolution over b's map (see ChannelMmNtJob).
void run_weight_grad(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                     const ChannelConvTaps* taps) {
#ifdef AHNET_FAST_HAVE_AVX2_VARIANT
  ChannelMmNtJob job{a.data_ptr<float>(), a.size(1) > 0 ? a.stride(0) : 0, b.data_ptr<float>(),
                     b.size(1) > 0 ? b.stride(0) : 0, out.size(0), out.size(1), a.size(1), out.data_ptr<float>(),
                     out.stride(0), accumulate, taps};
  channel_mm_kernels::isa_avx512::run_nt(job);
#endif
}

// The weight-gradient kernels' checks beyond shapes: float32, rows of a, b and out contiguous, out overlapping
// neither input nor itself.
void check_nt_operands(const char* op, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, op,
              ": float32 tensors only, got a ", a.scalar_type(), ", b ", b.scalar_type(), ", out ", out.scalar_type());
  TORCH_CHECK((a.size(1) <= 1 || a.stride(1) == 1) && (b.size(1) <= 1 || b.stride(1) == 1), op,
              ": a's and b's rows must be contiguous, strides ", a.strides(), ", ", b.strides());
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1, op, ": out's rows must be contiguous, strides ", out.strides());
  TORCH_CHECK(!overlaps(out, a) && !overlaps(out, b), op, ": out overlaps an input");
  TORCH_CHECK(out.size(0) <= 1 || out.size(1) == 0 || out.stride(0) >= out.size(1), op,
              ": out's rows overlap each other, strides ", out.strides());
}

// out (+)= a @ b^T (channel_mm_nt_): a (M, L) and b (K, L) with contiguous rows, out (M, K) with contiguous rows.
void channel_mm_nt_cpu(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(1) && out.size(0) == a.size(0) &&
                  out.size(1) == b.size(0),
              "channel_mm_nt_: shapes do not chain: a ", a.sizes(), ", b ", b.sizes(), ", out ", out.sizes());
  check_nt_operands("channel_mm_nt_", out, a, b);
  if (out.numel() == 0) return;
  if (chosen_isa() != Isa::avx512) {
    if (accumulate)
      out.addmm_(a, b.t());
    else
      at::mm_out(out, a, b.t());
    return;
  }
  run_weight_grad(out, a, b, accumulate, nullptr);
}

// out (+)= a @ taps(x)^T (channel_mm_nt_conv_): the weight gradient of channel_mm_conv_'s convolution, a (M, S)
// its output gradient, x (Ci, S) its input map of `spatial` (both with contiguous rows), out (M, Ci * T) with
// contiguous rows: out[m, c * T + t] = sum over voxels p of a[m, p] * x[c, p + offset_t] (zero outside the map).
void channel_mm_nt_conv_cpu(at::Tensor out, const at::Tensor& a, const at::Tensor& x, at::IntArrayRef spatial,
                            at::IntArrayRef kernel, bool accumulate) {
  const auto [voxels, taps] = check_conv_geometry("channel_mm_nt_conv_", spatial, kernel);
  TORCH_CHECK(a.dim() == 2 && x.dim() == 2 && out.dim() == 2 && a.size(1) == voxels && x.size(1) == voxels &&
                  out.size(0) == a.size(0) && out.size(1) == x.size(0) * taps,
              "channel_mm_nt_conv_: shapes do not fit: a ", a.sizes(), ", x ", x.sizes(), ", out ", out.sizes(),
              " for spatial ", spatial, " and kernel ", kernel);
  check_nt_operands("channel_mm_nt_conv_", out, a, x);
  if (out.numel() == 0) return;
  if (chosen_isa() != Isa::avx512) {
    std::vector<int64_t> w_shape{a.size(0), x.size(0)};
    w_shape.insert(w_shape.end(), kernel.begin(), kernel.end());
    const int64_t nd = static_cast<int64_t>(spatial.size());
    const at::Tensor w = at::empty(w_shape, out.options());
    const at::Tensor grad_w = std::get<1>(at::convolution_backward(
        as_map(a, spatial), as_map(x, spatial), w, c10::nullopt, std::vector<int64_t>(nd, 1), same_padding(kernel),
        std::vector<int64_t>(nd, 1), false, std::vector<int64_t>(nd, 0), 1, {false, true, false}));
    if (accumulate)
      out.add_(grad_w.view({out.size(0), out.size(1)}));
    else
      out.copy_(grad_w.view({out.size(0), out.size(1)}));
    return;
  }
  const ChannelConvTaps geometry = conv_taps(spatial, kernel);
  run_weight_grad(out, a, x, accumulate, &geometry);
}

// Which variant channel_mm_ runs here ("avx512", or "avx2" / "baseline": ATen's mm): the Python side
// sends products to channel_mm_ only where its own kernel runs.
std::string channel_mm_isa_cpu() { return isa_name(chosen_isa()); }

}  // namespace

TORCH_LIBRARY_IMPL(ahnet_fast, CPU, m) {
  m.impl("channel_mm_", &channel_mm_cpu);
  m.impl("channel_mm_nt_", &channel_mm_nt_cpu);
  m.impl("channel_mm_conv_", &channel_mm_conv_cpu);
  m.impl("channel_mm_nt_conv_", &channel_mm_nt_conv_cpu);
}

// A query with no tensor to dispatch on: defined with its implementation (a catch-all kernel), here
// beside the kernel whose variant it reports rather than in ops.cpp.
TORCH_LIBRARY_FRAGMENT(ahnet_fast, m) { m.def("channel_mm_isa() -> str", &channel_mm_isa_cpu); }

}  // namespace ahnet_fast

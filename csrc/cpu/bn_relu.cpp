// CPU kernels of ahnet_fast::bn_relu, bn_relu_backward and the pieces bn_relu_conv and dense_block
// call (bn_relu_stats, bn_relu_apply_, bn_relu_backward_into_).
//
// BatchNorm + ReLU in one pass over the data instead of PyTorch's two (normalise, then ReLU), and a
// backward that recomputes the ReLU mask from the input, so the activation need not be stored.
#include "batch_norm.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace ahnet_fast {
namespace {

using namespace bn_detail;

template <typename scalar_t, typename opmath_t>
struct ApplyBnRelu {
  const scalar_t* x;
  scalar_t* y;
  const opmath_t* scale;
  const opmath_t* shift;
  void plane(int64_t off, int64_t c, int64_t n) const {
    const opmath_t sc = scale[c], sh = shift[c];
    const scalar_t* xp = x + off;
    scalar_t* yp = y + off;
    for (int64_t i = 0; i < n; ++i) {
      yp[i] = static_cast<scalar_t>(relu(relu_pre(static_cast<opmath_t>(xp[i]), sc, sh)));
    }
  }
  void row(int64_t off, int64_t C) const {
    const scalar_t* xp = x + off;
    scalar_t* yp = y + off;
    for (int64_t c = 0; c < C; ++c) {
      yp[c] = static_cast<scalar_t>(relu(relu_pre(static_cast<opmath_t>(xp[c]), scale[c], shift[c])));
    }
  }
};

// Backward pass 1: per channel, the sum of the masked gradient gm and of gm * (x - mean).
template <typename scalar_t, typename opmath_t>
struct GradSums {
  const scalar_t* x;
  const scalar_t* g;
  const opmath_t* scale;
  const opmath_t* shift;
  const opmath_t* mean;
  void plane(int64_t off, int64_t c, int64_t n, opmath_t& a, opmath_t& b) const {
    const opmath_t sc = scale[c], sh = shift[c], m = mean[c];
    const scalar_t* xp = x + off;
    const scalar_t* gp = g + off;
    lane_sums<opmath_t>(n, [&](int64_t i, opmath_t& sa, opmath_t& sb) {
      const opmath_t xv = static_cast<opmath_t>(xp[i]);
      const opmath_t gv = static_cast<opmath_t>(gp[i]);  // loaded unconditionally: a select, not a branch
      const opmath_t gm = passes(relu_pre(xv, sc, sh)) ? gv : opmath_t(0);
      sa += gm;
      sb += gm * (xv - m);
    }, a, b);
  }
  void row(int64_t off, int64_t C, opmath_t* a, opmath_t* b) const {
    const scalar_t* xp = x + off;
    const scalar_t* gp = g + off;
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t xv = static_cast<opmath_t>(xp[c]);
      const opmath_t gv = static_cast<opmath_t>(gp[c]);
      const opmath_t gm = passes(relu_pre(xv, scale[c], shift[c])) ? gv : opmath_t(0);
      a[c] += gm;
      b[c] += gm * (xv - mean[c]);
    }
  }
};

// Backward pass 2: dx = k * gm + a + b * (x - mean) per channel (k = weight * invstd; a and b fold
// in the batch-statistics terms in training, and are zero in eval).
template <typename scalar_t, typename opmath_t, bool accumulate = false>
struct GradInput {
  const scalar_t* x;
  const scalar_t* g;
  scalar_t* dx;
  const opmath_t* scale;
  const opmath_t* shift;
  const opmath_t* mean;
  const opmath_t* k;
  const opmath_t* a;
  const opmath_t* b;
  void plane(int64_t off, int64_t c, int64_t n) const {
    const opmath_t sc = scale[c], sh = shift[c], m = mean[c], kc = k[c], ac = a[c], bc = b[c];
    const scalar_t* xp = x + off;
    const scalar_t* gp = g + off;
    scalar_t* dp = dx + off;
    for (int64_t i = 0; i < n; ++i) {
      const opmath_t xv = static_cast<opmath_t>(xp[i]);
      const opmath_t gv = static_cast<opmath_t>(gp[i]);  // loaded unconditionally: a select, not a branch
      const opmath_t gm = passes(relu_pre(xv, sc, sh)) ? gv : opmath_t(0);
      dp[i] = store(dp[i], kc * gm + ac + bc * (xv - m));
    }
  }
  void row(int64_t off, int64_t C) const {
    const scalar_t* xp = x + off;
    const scalar_t* gp = g + off;
    scalar_t* dp = dx + off;
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t xv = static_cast<opmath_t>(xp[c]);
      const opmath_t gv = static_cast<opmath_t>(gp[c]);
      const opmath_t gm = passes(relu_pre(xv, scale[c], shift[c])) ? gv : opmath_t(0);
      dp[c] = store(dp[c], k[c] * gm + a[c] + b[c] * (xv - mean[c]));
    }
  }
  // dx, or (accumulate) old + dx with dx rounded to scalar_t first: bitwise what `out.add_(dx)` gives.
  static scalar_t store(scalar_t old, opmath_t v) {
    const scalar_t r = static_cast<scalar_t>(v);
    if constexpr (accumulate) {
      return static_cast<scalar_t>(static_cast<opmath_t>(old) + static_cast<opmath_t>(r));
    } else {
      (void)old;
      return r;
    }
  }
};

// The statistics bn_relu(training=True) normalises with, without normalising: for callers that apply
// them later in pieces (a convolution over row chunks, a reused buffer) with bn_relu_apply_.
std::tuple<at::Tensor, at::Tensor> bn_relu_stats_cpu(const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "bn_relu_stats: input must have shape (N, C, ...), got ", input.sizes());
  TORCH_CHECK(input.device().is_cpu(), "bn_relu_stats: the CPU kernel got a tensor on ", input.device());
  const at::Tensor x = readable(input);
  const Geometry g = geometry(x);
  TORCH_CHECK(g.N * g.S > 0, "bn_relu_stats: batch statistics need at least one value per channel, got input of shape ",
              x.sizes());
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_stats_cpu", [&] {
    batch_stats<scalar_t, at::opmath_type<scalar_t>>(x, g, mean, var);
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_cpu(const at::Tensor& input, const at::Tensor& weight,
                                                           const at::Tensor& bias,
                                                           const std::optional<at::Tensor>& running_mean,
                                                           const std::optional<at::Tensor>& running_var,
                                                           bool training, double eps) {
  check_inputs(input, weight, bias, "bn_relu");
  const bool use_batch_stats = training || !running_mean.has_value() || !running_var.has_value();
  const at::Tensor x = readable(input);
  const Geometry g = geometry(x);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean, var;
  if (use_batch_stats) {
    TORCH_CHECK(g.N * g.S > 0, "bn_relu: batch statistics need at least one value per channel, got input of shape ",
                x.sizes());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<opmath_t> scale, shift;
    batch_norm_affine<scalar_t, opmath_t>(x, g, weight, bias, running_mean, running_var, use_batch_stats, eps, mean,
                                          var, scale, shift);
    channel_map(g, ApplyBnRelu<scalar_t, opmath_t>{x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                                   scale.data(), shift.data()});
  });
  return {y, mean, var};
}

// relu(batch_norm(x)) with given statistics, written into `out` (x's shape, dtype and layout): the
// recomputation in backward writes into a buffer its caller reuses instead of a fresh allocation.
void bn_relu_apply_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& out) {
  check_inputs(input, weight, bias, "bn_relu_apply_");
  const at::Tensor x = readable(input);
  const bool same_layout_class = is_channels_last(x) ? is_channels_last(out) : out.is_contiguous();
  TORCH_CHECK(out.sizes() == x.sizes() && same_layout_class && out.scalar_type() == x.scalar_type() &&
                  out.device() == x.device(),
              "bn_relu_apply_: out must have the input's shape, layout (contiguous or channels-last, as the input "
              "is read), dtype and device; got ", out.sizes(), " ", out.strides(), " ", out.scalar_type(), " for ",
              x.sizes(), " ", x.strides(), " ", x.scalar_type());
  const Geometry g = geometry(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_apply_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<opmath_t> scale, shift;
    at::Tensor m, v;
    batch_norm_affine<scalar_t, opmath_t>(x, g, weight, bias, mean, var, false, eps, m, v, scale, shift);
    channel_map(g, ApplyBnRelu<scalar_t, opmath_t>{x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                   scale.data(), shift.data()});
  });
}

// bn_relu's gradient written into dx (laid out as x, which is readable()), or added to it
// (accumulate); dx may be go itself (each element is read before it is written). Returns the weight
// and bias gradients.
std::tuple<at::Tensor, at::Tensor> bn_relu_backward_into(const at::Tensor& go, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& bias,
                                                         const at::Tensor& mean, const at::Tensor& var,
                                                         bool training, double eps, const at::Tensor& dx,
                                                         bool accumulate) {
  const Geometry g = geometry(x);
  at::Tensor dw_acc = at::empty({g.C}, x.options().dtype(at::kDouble));
  at::Tensor db_acc = at::empty({g.C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const BackwardAffine<opmath_t> p(mean, var, weight, bias, eps, g.C, stats_dtype(x.scalar_type()));
    const opmath_t* mp = p.mean.const_data_ptr<opmath_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    std::vector<double> sum_g, sum_gd;  // sum of gm, sum of gm * (x - mean)
    channel_sums<opmath_t>(g, GradSums<scalar_t, opmath_t>{xp, gp, p.scale.data(), p.shift.data(), mp}, sum_g, sum_gd);
    std::vector<opmath_t> k, a, bb;
    input_grad_coefficients(sum_g, sum_gd, p.invstd, p.weight.const_data_ptr<opmath_t>(), training,
                            static_cast<double>(g.N * g.S), dw_acc.mutable_data_ptr<double>(),
                            db_acc.mutable_data_ptr<double>(), k, a, bb);
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    if (accumulate) {
      channel_map(g, GradInput<scalar_t, opmath_t, true>{xp, gp, dp, p.scale.data(), p.shift.data(), mp, k.data(),
                                                         a.data(), bb.data()});
    } else {
      channel_map(g, GradInput<scalar_t, opmath_t>{xp, gp, dp, p.scale.data(), p.shift.data(), mp, k.data(), a.data(),
                                                   bb.data()});
    }
  });
  return {dw_acc.to(weight.scalar_type()), db_acc.to(bias.scalar_type())};
}

void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
                           const at::Tensor& bias, const char* op) {
  check_inputs(input, weight, bias, op);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
              " but input has shape ", input.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cpu(const at::Tensor& grad_out,
                                                                    const at::Tensor& input,
                                                                    const at::Tensor& weight, const at::Tensor& bias,
                                                                    const at::Tensor& mean, const at::Tensor& var,
                                                                    bool training, double eps) {
  check_backward_inputs(grad_out, input, weight, bias, "bn_relu_backward");
  const at::Tensor x = readable(input);
  const at::Tensor go = same_layout(grad_out.to(x.scalar_type()), x);
  at::Tensor dx = at::empty_like(x);
  auto [dw, db] = bn_relu_backward_into(go, x, weight, bias, mean, var, training, eps, dx, false);
  return {dx, dw, db};
}

// bn_relu_backward's input gradient written into `out` (or added to it, accumulate) instead of a new
// tensor: out may be grad_out itself (in place), or a view such as a prefix of a gradient buffer. A
// layout the kernel does not write directly goes through a temporary. Returns (grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor> bn_relu_backward_into_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                             const at::Tensor& weight, const at::Tensor& bias,
                                                             const at::Tensor& mean, const at::Tensor& var,
                                                             bool training, double eps, const at::Tensor& out,
                                                             bool accumulate) {
  check_backward_inputs(grad_out, input, weight, bias, "bn_relu_backward_into_");
  TORCH_CHECK(out.sizes() == input.sizes() && out.scalar_type() == input.scalar_type() && out.device().is_cpu(),
              "bn_relu_backward_into_: out must have the input's shape and dtype on the CPU; got ", out.sizes(), " ",
              out.scalar_type(), " ", out.device(), " for input ", input.sizes(), " ", input.scalar_type());
  const at::Tensor x = readable(input);
  const at::Tensor go = same_layout(grad_out.to(x.scalar_type()), x);
  const bool direct = is_channels_last(x) ? is_channels_last(out) : out.is_contiguous();
  if (direct) {
    return bn_relu_backward_into(go, x, weight, bias, mean, var, training, eps, out, accumulate);
  }
  at::Tensor dx = at::empty_like(x);
  auto grads = bn_relu_backward_into(go, x, weight, bias, mean, var, training, eps, dx, false);
  if (accumulate) {
    out.add_(dx);
  } else {
    out.copy_(dx);
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(ahnet_fast, CPU, m) {
  m.impl("bn_relu", &bn_relu_cpu);
  m.impl("bn_relu_backward", &bn_relu_backward_cpu);
  m.impl("bn_relu_apply_", &bn_relu_apply_cpu);
  m.impl("bn_relu_stats", &bn_relu_stats_cpu);
  m.impl("bn_relu_backward_into_", &bn_relu_backward_into_cpu);
}

}  // namespace ahnet_fast

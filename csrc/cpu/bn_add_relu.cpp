// CPU kernels of ahnet_fast::bn_add_relu and bn_add_relu_backward: the ResNet bottleneck's last
// BatchNorm, the residual sum and the ReLU in one pass; backward reads the ReLU mask from the output.
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

// bn_add_relu: y = max(0, x * scale + shift + r), the ResNet bottleneck's last BatchNorm, residual
// sum and ReLU in one pass.
template <typename scalar_t, typename opmath_t>
struct ApplyBnAddRelu {
  const scalar_t* x;
  const scalar_t* r;
  scalar_t* y;
  const opmath_t* scale;
  const opmath_t* shift;
  void plane(int64_t off, int64_t c, int64_t n) const {
    const opmath_t sc = scale[c], sh = shift[c];
    const scalar_t* xp = x + off;
    const scalar_t* rp = r + off;
    scalar_t* yp = y + off;
    for (int64_t i = 0; i < n; ++i) {
      // rounded to scalar_t before the sum, as batch_norm's output is in the composition
      const opmath_t v = static_cast<opmath_t>(static_cast<scalar_t>(relu_pre(static_cast<opmath_t>(xp[i]), sc, sh)));
      yp[i] = static_cast<scalar_t>(relu(v + static_cast<opmath_t>(rp[i])));
    }
  }
  void row(int64_t off, int64_t C) const {
    const scalar_t* xp = x + off;
    const scalar_t* rp = r + off;
    scalar_t* yp = y + off;
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t v =
          static_cast<opmath_t>(static_cast<scalar_t>(relu_pre(static_cast<opmath_t>(xp[c]), scale[c], shift[c])));
      yp[c] = static_cast<scalar_t>(relu(v + static_cast<opmath_t>(rp[c])));
    }
  }
};

// bn_add_relu backward, pass 1: the ReLU's gradient gm = g except where the output y <= 0 (torch's
// rule for a ReLU whose output is kept: a NaN output passes the gradient), and per channel the sums
// of gm and of gm * (x - mean).
template <typename scalar_t, typename opmath_t>
struct GradSumsFromOutput {
  const scalar_t* x;
  const scalar_t* y;
  const scalar_t* g;
  const opmath_t* mean;
  void plane(int64_t off, int64_t c, int64_t n, opmath_t& a, opmath_t& b) const {
    const opmath_t m = mean[c];
    const scalar_t* xp = x + off;
    const scalar_t* yp = y + off;
    const scalar_t* gp = g + off;
    lane_sums<opmath_t>(n, [&](int64_t i, opmath_t& sa, opmath_t& sb) {
      const opmath_t gv = static_cast<opmath_t>(gp[i]);
      const opmath_t gm = passes(static_cast<opmath_t>(yp[i])) ? gv : opmath_t(0);
      sa += gm;
      sb += gm * (static_cast<opmath_t>(xp[i]) - m);
    }, a, b);
  }
  void row(int64_t off, int64_t C, opmath_t* a, opmath_t* b) const {
    const scalar_t* xp = x + off;
    const scalar_t* yp = y + off;
    const scalar_t* gp = g + off;
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t gv = static_cast<opmath_t>(gp[c]);
      const opmath_t gm = passes(static_cast<opmath_t>(yp[c])) ? gv : opmath_t(0);
      a[c] += gm;
      b[c] += gm * (static_cast<opmath_t>(xp[c]) - mean[c]);
    }
  }
};

// bn_add_relu backward, pass 2: dr = gm, dx = k * gm + a + b * (x - mean).
template <typename scalar_t, typename opmath_t>
struct GradInputFromOutput {
  const scalar_t* x;
  const scalar_t* y;
  const scalar_t* g;
  scalar_t* dx;
  scalar_t* dr;
  const opmath_t* mean;
  const opmath_t* k;
  const opmath_t* a;
  const opmath_t* b;
  void plane(int64_t off, int64_t c, int64_t n) const {
    const opmath_t m = mean[c], kc = k[c], ac = a[c], bc = b[c];
    const scalar_t* xp = x + off;
    const scalar_t* yp = y + off;
    const scalar_t* gp = g + off;
    scalar_t* dxp = dx + off;
    scalar_t* drp = dr + off;
    for (int64_t i = 0; i < n; ++i) {
      const opmath_t gv = static_cast<opmath_t>(gp[i]);
      const opmath_t gm = passes(static_cast<opmath_t>(yp[i])) ? gv : opmath_t(0);
      drp[i] = static_cast<scalar_t>(gm);
      dxp[i] = static_cast<scalar_t>(kc * gm + ac + bc * (static_cast<opmath_t>(xp[i]) - m));
    }
  }
  void row(int64_t off, int64_t C) const {
    const scalar_t* xp = x + off;
    const scalar_t* yp = y + off;
    const scalar_t* gp = g + off;
    scalar_t* dxp = dx + off;
    scalar_t* drp = dr + off;
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t gv = static_cast<opmath_t>(gp[c]);
      const opmath_t gm = passes(static_cast<opmath_t>(yp[c])) ? gv : opmath_t(0);
      drp[c] = static_cast<scalar_t>(gm);
      dxp[c] = static_cast<scalar_t>(k[c] * gm + a[c] + b[c] * (static_cast<opmath_t>(xp[c]) - mean[c]));
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_relu_cpu(const at::Tensor& input, const at::Tensor& residual,
                                                               const at::Tensor& weight, const at::Tensor& bias,
                                                               const std::optional<at::Tensor>& running_mean,
                                                               const std::optional<at::Tensor>& running_var,
                                                               bool training, double eps) {
  check_inputs(input, weight, bias, "bn_add_relu");
  TORCH_CHECK(residual.sizes() == input.sizes() && residual.scalar_type() == input.scalar_type(),
              "bn_add_relu: residual must have the input's shape and dtype, got ", residual.sizes(), " ",
              residual.scalar_type(), " for input ", input.sizes(), " ", input.scalar_type());
  TORCH_CHECK(residual.device().is_cpu(), "bn_add_relu: the CPU kernel got a residual on ", residual.device());
  const bool use_batch_stats = training || !running_mean.has_value() || !running_var.has_value();
  const at::Tensor x = readable(input);
  const at::Tensor r = same_layout(residual, x);
  const Geometry g = geometry(x);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean, var;
  if (use_batch_stats) {
    TORCH_CHECK(g.N * g.S > 0, "bn_add_relu: batch statistics need at least one value per channel, got input of "
                "shape ", x.sizes());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_add_relu_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<opmath_t> scale, shift;
    batch_norm_affine<scalar_t, opmath_t>(x, g, weight, bias, running_mean, running_var, use_batch_stats, eps, mean,
                                          var, scale, shift);
    channel_map(g, ApplyBnAddRelu<scalar_t, opmath_t>{x.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
                                                      y.mutable_data_ptr<scalar_t>(), scale.data(), shift.data()});
  });
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var, bool training, double eps) {
  check_inputs(input, weight, bias, "bn_add_relu_backward");
  TORCH_CHECK(grad_out.sizes() == input.sizes() && output.sizes() == input.sizes(),
              "bn_add_relu_backward: grad_out ", grad_out.sizes(), " and output ", output.sizes(),
              " must have the input's shape ", input.sizes());
  const at::Tensor x = readable(input);
  const at::Tensor go = same_layout(grad_out.to(x.scalar_type()), x);
  const at::Tensor y = same_layout(output.to(x.scalar_type()), x);
  const Geometry g = geometry(x);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dr = at::empty_like(x);
  at::Tensor dw_acc = at::empty({g.C}, x.options().dtype(at::kDouble));
  at::Tensor db_acc = at::empty({g.C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_add_relu_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const BackwardAffine<opmath_t> p(mean, var, weight, bias, eps, g.C, stats_dtype(x.scalar_type()));
    const opmath_t* mp = p.mean.const_data_ptr<opmath_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    std::vector<double> sum_g, sum_gd;
    channel_sums<opmath_t>(g, GradSumsFromOutput<scalar_t, opmath_t>{xp, yp, gp, mp}, sum_g, sum_gd);
    std::vector<opmath_t> k, a, bb;
    input_grad_coefficients(sum_g, sum_gd, p.invstd, p.weight.const_data_ptr<opmath_t>(), training,
                            static_cast<double>(g.N * g.S), dw_acc.mutable_data_ptr<double>(),
                            db_acc.mutable_data_ptr<double>(), k, a, bb);
    channel_map(g, GradInputFromOutput<scalar_t, opmath_t>{xp, yp, gp, dx.mutable_data_ptr<scalar_t>(),
                                                           dr.mutable_data_ptr<scalar_t>(), mp, k.data(), a.data(),
                                                           bb.data()});
  });
  return {dx, dr, dw_acc.to(weight.scalar_type()), db_acc.to(bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ahnet_fast, CPU, m) {
  m.impl("bn_add_relu", &bn_add_relu_cpu);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_cpu);
}

}  // namespace ahnet_fast

// CPU kernels of ahnet_fast::bn_relu and ahnet_fast::bn_relu_backward.
//
// BatchNorm + ReLU in one pass over the data instead of PyTorch's two (normalise, then ReLU), and a
// backward that recomputes the ReLU mask from the input, so the activation need not be stored.
// Two memory layouts are read directly: contiguous channel-first (N, C, *spatial) and
// channels-last (N, *spatial, C in memory, i.e. channels_last / channels_last_3d); anything
// else is made contiguous first. Reductions accumulate in double for every input dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace ahnet_fast {
namespace {

struct Geometry {
  int64_t N = 0;  // batch
  int64_t C = 0;  // channels
  int64_t S = 0;  // voxels per (sample, channel)
  bool channels_last = false;
};

bool is_channels_last(const at::Tensor& x) {
  return x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}

// The input in a layout the loops below read directly.
at::Tensor readable(const at::Tensor& x) {
  return (x.is_contiguous() || is_channels_last(x)) ? x : x.contiguous();
}

// `t` laid out exactly like `like` (which is readable()).
at::Tensor same_layout(const at::Tensor& t, const at::Tensor& like) {
  if (is_channels_last(like)) {
    return t.movedim(1, -1).contiguous().movedim(-1, 1);
  }
  return t.contiguous();
}

Geometry geometry(const at::Tensor& x) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = g.C == 0 || g.N == 0 ? 0 : x.numel() / (g.N * g.C);
  g.channels_last = is_channels_last(x);
  return g;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": input must have shape (N, C, ...), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": the CPU kernel got a tensor on ", x.device());
  TORCH_CHECK(weight.numel() == x.size(1) && bias.numel() == x.size(1), op, ": weight and bias need ",
              x.size(1), " elements (one per channel), got ", weight.numel(), " and ", bias.numel());
}

// Per-channel scale and shift such that y = max(0, x * scale + shift). Forward and backward both
// call this with the same (rounded) statistics, so the recomputed ReLU mask equals the forward one.
template <typename opmath_t>
void channel_affine(const opmath_t* mean, const opmath_t* var, const opmath_t* weight, const opmath_t* bias,
                    double eps, int64_t C, std::vector<opmath_t>& scale, std::vector<opmath_t>& shift,
                    std::vector<opmath_t>& invstd) {
  scale.resize(C);
  shift.resize(C);
  invstd.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    invstd[c] = static_cast<opmath_t>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps));
    scale[c] = weight[c] * invstd[c];
    shift[c] = bias[c] - mean[c] * scale[c];
  }
}

template <typename opmath_t>
inline opmath_t relu_pre(opmath_t x, opmath_t scale, opmath_t shift) {
  return x * scale + shift;
}

// ReLU that propagates NaN like torch.relu.
template <typename opmath_t>
inline opmath_t relu(opmath_t v) {
  return v < opmath_t(0) ? opmath_t(0) : v;
}

// True where torch's ReLU passes the gradient (threshold_backward: output <= 0 blocks it).
template <typename opmath_t>
inline bool passes(opmath_t v) {
  return !(v <= opmath_t(0));
}

// Sums over every element of each channel of f(x_element, channel), for two functions at once.
// Channel-first: each (n, c) plane is a contiguous run of S elements. Channels-last: each voxel is
// a contiguous run of C elements. Per-thread partial sums keep the result independent of data races.
template <typename F>
void channel_sums(const Geometry& g, F&& f, std::vector<double>& sum_a, std::vector<double>& sum_b) {
  const int64_t C = g.C;
  const int nthreads = at::get_num_threads();
  std::vector<double> part_a(static_cast<size_t>(nthreads) * C, 0.0), part_b(static_cast<size_t>(nthreads) * C, 0.0);
  if (!g.channels_last) {
    at::parallel_for(0, g.N * C, 1, [&](int64_t begin, int64_t end) {
      double* pa = part_a.data() + at::get_thread_num() * C;
      double* pb = part_b.data() + at::get_thread_num() * C;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        double a = 0.0, b = 0.0;
        f.plane(p * g.S, c, g.S, a, b);
        pa[c] += a;
        pb[c] += b;
      }
    });
  } else {
    const int64_t rows = g.N * g.S;
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
      double* pa = part_a.data() + at::get_thread_num() * C;
      double* pb = part_b.data() + at::get_thread_num() * C;
      for (int64_t r = begin; r < end; ++r) {
        f.row(r * C, C, pa, pb);
      }
    });
  }
  sum_a.assign(C, 0.0);
  sum_b.assign(C, 0.0);
  for (int t = 0; t < nthreads; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      sum_a[c] += part_a[t * C + c];
      sum_b[c] += part_b[t * C + c];
    }
  }
}

// Applies out[i] = f(in..., channel) elementwise in either layout.
template <typename F>
void channel_map(const Geometry& g, F&& f) {
  if (!g.channels_last) {
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) f.plane(p * g.S, p % g.C, g.S);
    });
  } else {
    at::parallel_for(0, g.N * g.S, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.C, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) f.row(r * g.C, g.C);
                     });
  }
}

// Pass 1 of the batch statistics: sum of x. Pass 2: sum of squared deviations from the mean
// (two passes rather than sum of squares, which cancels badly for large means).
template <typename scalar_t>
struct SumX {
  const scalar_t* x;
  void plane(int64_t off, int64_t, int64_t n, double& a, double&) const {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[off + i]);
    a = s;
  }
  void row(int64_t off, int64_t C, double* a, double*) const {
    for (int64_t c = 0; c < C; ++c) a[c] += static_cast<double>(x[off + c]);
  }
};

template <typename scalar_t>
struct SumSqDev {
  const scalar_t* x;
  const double* mean;
  void plane(int64_t off, int64_t c, int64_t n, double& a, double&) const {
    const double m = mean[c];
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = static_cast<double>(x[off + i]) - m;
      s += d * d;
    }
    a = s;
  }
  void row(int64_t off, int64_t C, double* a, double*) const {
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(x[off + c]) - mean[c];
      a[c] += d * d;
    }
  }
};

template <typename scalar_t, typename opmath_t>
struct ApplyBnRelu {
  const scalar_t* x;
  scalar_t* y;
  const opmath_t* scale;
  const opmath_t* shift;
  void plane(int64_t off, int64_t c, int64_t n) const {
    const opmath_t sc = scale[c], sh = shift[c];
    for (int64_t i = 0; i < n; ++i) {
      y[off + i] = static_cast<scalar_t>(relu(relu_pre(static_cast<opmath_t>(x[off + i]), sc, sh)));
    }
  }
  void row(int64_t off, int64_t C) const {
    for (int64_t c = 0; c < C; ++c) {
      y[off + c] = static_cast<scalar_t>(relu(relu_pre(static_cast<opmath_t>(x[off + c]), scale[c], shift[c])));
    }
  }
};

// Backward pass 1: sum of the masked gradient gm and of gm * (x - mean), per channel.
template <typename scalar_t, typename opmath_t>
struct GradSums {
  const scalar_t* x;
  const scalar_t* g;
  const opmath_t* scale;
  const opmath_t* shift;
  const opmath_t* mean;
  void plane(int64_t off, int64_t c, int64_t n, double& a, double& b) const {
    const opmath_t sc = scale[c], sh = shift[c], m = mean[c];
    double sa = 0.0, sb = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const opmath_t xv = static_cast<opmath_t>(x[off + i]);
      const opmath_t gm = passes(relu_pre(xv, sc, sh)) ? static_cast<opmath_t>(g[off + i]) : opmath_t(0);
      sa += static_cast<double>(gm);
      sb += static_cast<double>(gm) * static_cast<double>(xv - m);
    }
    a = sa;
    b = sb;
  }
  void row(int64_t off, int64_t C, double* a, double* b) const {
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t xv = static_cast<opmath_t>(x[off + c]);
      const opmath_t gm = passes(relu_pre(xv, scale[c], shift[c])) ? static_cast<opmath_t>(g[off + c]) : opmath_t(0);
      a[c] += static_cast<double>(gm);
      b[c] += static_cast<double>(gm) * static_cast<double>(xv - mean[c]);
    }
  }
};

// Backward pass 2: dx = k * gm + a + b * (x - mean) per channel (k = weight * invstd; a and b fold
// in the batch-statistics terms in training, and are zero in eval).
template <typename scalar_t, typename opmath_t>
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
    for (int64_t i = 0; i < n; ++i) {
      const opmath_t xv = static_cast<opmath_t>(x[off + i]);
      const opmath_t gm = passes(relu_pre(xv, sc, sh)) ? static_cast<opmath_t>(g[off + i]) : opmath_t(0);
      dx[off + i] = static_cast<scalar_t>(kc * gm + ac + bc * (xv - m));
    }
  }
  void row(int64_t off, int64_t C) const {
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t xv = static_cast<opmath_t>(x[off + c]);
      const opmath_t gm = passes(relu_pre(xv, scale[c], shift[c])) ? static_cast<opmath_t>(g[off + c]) : opmath_t(0);
      dx[off + c] = static_cast<scalar_t>(k[c] * gm + a[c] + b[c] * (xv - mean[c]));
    }
  }
};

at::ScalarType stats_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
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
  const auto sdt = stats_dtype(x.scalar_type());
  at::Tensor y = at::empty_like(x);
  at::Tensor mean, var;
  if (use_batch_stats) {
    TORCH_CHECK(g.N * g.S > 0, "bn_relu: batch statistics need at least one value per channel, got input of shape ",
                x.sizes());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (use_batch_stats) {
      std::vector<double> sum, unused, sqdev;
      channel_sums(g, SumX<scalar_t>{xp}, sum, unused);
      const double count = static_cast<double>(g.N * g.S);
      std::vector<double> mean_d(g.C);
      for (int64_t c = 0; c < g.C; ++c) mean_d[c] = sum[c] / count;
      channel_sums(g, SumSqDev<scalar_t>{xp, mean_d.data()}, sqdev, unused);
      mean = at::empty({g.C}, x.options().dtype(sdt));
      var = at::empty({g.C}, x.options().dtype(sdt));
      auto* mp = mean.mutable_data_ptr<opmath_t>();
      auto* vp = var.mutable_data_ptr<opmath_t>();
      for (int64_t c = 0; c < g.C; ++c) {
        mp[c] = static_cast<opmath_t>(mean_d[c]);
        vp[c] = static_cast<opmath_t>(sqdev[c] / count);
      }
    } else {
      mean = running_mean->to(sdt).contiguous().clone();
      var = running_var->to(sdt).contiguous().clone();
    }
    const at::Tensor w = weight.to(sdt).contiguous(), b = bias.to(sdt).contiguous();
    std::vector<opmath_t> scale, shift, invstd;
    channel_affine(mean.const_data_ptr<opmath_t>(), var.const_data_ptr<opmath_t>(), w.const_data_ptr<opmath_t>(),
                   b.const_data_ptr<opmath_t>(), eps, g.C, scale, shift, invstd);
    channel_map(g, ApplyBnRelu<scalar_t, opmath_t>{xp, y.mutable_data_ptr<scalar_t>(), scale.data(), shift.data()});
  });
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cpu(const at::Tensor& grad_out,
                                                                    const at::Tensor& input,
                                                                    const at::Tensor& weight, const at::Tensor& bias,
                                                                    const at::Tensor& mean, const at::Tensor& var,
                                                                    bool training, double eps) {
  check_inputs(input, weight, bias, "bn_relu_backward");
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bn_relu_backward: grad_out has shape ", grad_out.sizes(),
              " but input has shape ", input.sizes());
  const at::Tensor x = readable(input);
  const at::Tensor go = same_layout(grad_out.to(x.scalar_type()), x);
  const Geometry g = geometry(x);
  const auto sdt = stats_dtype(x.scalar_type());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw, db;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const at::Tensor m = mean.to(sdt).contiguous(), v = var.to(sdt).contiguous();
    const at::Tensor w = weight.to(sdt).contiguous(), b = bias.to(sdt).contiguous();
    const opmath_t* mp = m.const_data_ptr<opmath_t>();
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    std::vector<opmath_t> scale, shift, invstd;
    channel_affine(mp, v.const_data_ptr<opmath_t>(), wp, b.const_data_ptr<opmath_t>(), eps, g.C, scale, shift, invstd);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    std::vector<double> sum_g, sum_gd;  // sum of gm, sum of gm * (x - mean)
    channel_sums(g, GradSums<scalar_t, opmath_t>{xp, gp, scale.data(), shift.data(), mp}, sum_g, sum_gd);
    const double count = static_cast<double>(g.N * g.S);
    std::vector<opmath_t> k(g.C), a(g.C), bb(g.C);
    dw = at::empty({g.C}, weight.options());
    db = at::empty({g.C}, bias.options());
    at::Tensor dw_acc = at::empty({g.C}, x.options().dtype(at::kDouble));
    at::Tensor db_acc = at::empty({g.C}, x.options().dtype(at::kDouble));
    double* dwp = dw_acc.mutable_data_ptr<double>();
    double* dbp = db_acc.mutable_data_ptr<double>();
    for (int64_t c = 0; c < g.C; ++c) {
      const double is = static_cast<double>(invstd[c]);
      dwp[c] = sum_gd[c] * is;  // sum of gm * xhat
      dbp[c] = sum_g[c];
      k[c] = wp[c] * invstd[c];
      if (training) {
        // dx = k * (gm - sum_g / M - xhat * sum(gm * xhat) / M), with xhat = (x - mean) * invstd.
        const double kd = static_cast<double>(k[c]);
        bb[c] = static_cast<opmath_t>(-kd * is * dwp[c] / count);
        a[c] = static_cast<opmath_t>(-kd * sum_g[c] / count);
      } else {
        a[c] = opmath_t(0);
        bb[c] = opmath_t(0);
      }
    }
    channel_map(g, GradInput<scalar_t, opmath_t>{xp, gp, dx.mutable_data_ptr<scalar_t>(), scale.data(), shift.data(),
                                                 mp, k.data(), a.data(), bb.data()});
    dw.copy_(dw_acc);
    db.copy_(db_acc);
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(ahnet_fast, CPU, m) {
  m.impl("bn_relu", &bn_relu_cpu);
  m.impl("bn_relu_backward", &bn_relu_backward_cpu);
}

}  // namespace ahnet_fast

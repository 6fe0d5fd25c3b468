// CPU kernels of ahnet_fast::bn_relu, bn_relu_backward and their relatives (bn_stats, bn_relu_apply_,
// bn_relu_backward_into_, bn_add_relu, bn_add_relu_backward).
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

#include "layout.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
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

// Per-channel sums of two quantities over every element of each channel, in either layout.
// The functor adds its two quantities into accumulators of type acc_t:
//   plane(offset, channel, n, a, b): a contiguous run of n elements of one channel (channel-first);
//   row(offset, C, a[], b[]):        one voxel's C channels (channels-last).
// Inner loops accumulate in acc_t (float for float/half/bfloat16) over short blocks, with independent
// lanes so that the compiler vectorises them without reassociating; blocks are summed in double,
// per thread, then across threads in a fixed order (deterministic for a given thread count).
constexpr int kLanes = 16;
constexpr int64_t kBlock = 1024;  // elements per float block: rounding stays ~kBlock/kLanes ulps

template <typename acc_t, typename F>
void channel_sums(const Geometry& g, const F& f, std::vector<double>& sum_a, std::vector<double>& sum_b) {
  const int64_t C = g.C;
  const int nthreads = at::get_num_threads();
  std::vector<double> part_a(static_cast<size_t>(nthreads) * C, 0.0), part_b(static_cast<size_t>(nthreads) * C, 0.0);
  if (!g.channels_last) {
    at::parallel_for(0, g.N * C, 1, [&](int64_t begin, int64_t end) {
      double* pa = part_a.data() + at::get_thread_num() * C;
      double* pb = part_b.data() + at::get_thread_num() * C;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        for (int64_t i0 = 0; i0 < g.S; i0 += kBlock) {
          const int64_t n = std::min(kBlock, g.S - i0);
          acc_t a = 0, b = 0;
          f.plane(p * g.S + i0, c, n, a, b);
          pa[c] += static_cast<double>(a);
          pb[c] += static_cast<double>(b);
        }
      }
    });
  } else {
    const int64_t rows = g.N * g.S;
    const int64_t rows_per_block = std::max<int64_t>(1, kBlock / kLanes);
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
      double* pa = part_a.data() + at::get_thread_num() * C;
      double* pb = part_b.data() + at::get_thread_num() * C;
      std::vector<acc_t> fa(C), fb(C);
      for (int64_t r0 = begin; r0 < end; r0 += rows_per_block) {
        std::fill(fa.begin(), fa.end(), acc_t(0));
        std::fill(fb.begin(), fb.end(), acc_t(0));
        const int64_t r1 = std::min(end, r0 + rows_per_block);
        for (int64_t r = r0; r < r1; ++r) f.row(r * C, C, fa.data(), fb.data());
        for (int64_t c = 0; c < C; ++c) {
          pa[c] += static_cast<double>(fa[c]);
          pb[c] += static_cast<double>(fb[c]);
        }
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

// Sums f(i, a, b) over i in [0, n) with kLanes independent accumulators per quantity.
template <typename acc_t, typename F>
inline void lane_sums(int64_t n, const F& f, acc_t& out_a, acc_t& out_b) {
  acc_t la[kLanes] = {}, lb[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) f(i + k, la[k], lb[k]);
  }
  for (int k = 0; i < n; ++i, ++k) f(i, la[k], lb[k]);
  acc_t a = 0, b = 0;
  for (int k = 0; k < kLanes; ++k) {
    a += la[k];
    b += lb[k];
  }
  out_a = a;
  out_b = b;
}

// The float case of ShiftedMoments::plane with the kLanes lanes as explicit 4-wide vectors: the
// generic lane_sums form compiled, for this body only, to shuffles and stack spills (perf annotate:
// 11 GB/s against 42 GB/s for a plain sum). Same lanes, same order of additions, so the same bits.
using float4_t = float __attribute__((vector_size(16)));

inline void shifted_moments_f32(const float* xp, float k, int64_t n, float& out_a, float& out_b) {
  static_assert(kLanes % 4 == 0, "kLanes must be a multiple of the vector width");
  constexpr int kVecs = kLanes / 4;
  float4_t va[kVecs] = {}, vb[kVecs] = {};
  const float4_t kv = {k, k, k, k};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int v = 0; v < kVecs; ++v) {
      float4_t xv;
      std::memcpy(&xv, xp + i + 4 * v, sizeof(xv));
      const float4_t d = xv - kv;
      va[v] += d;
      vb[v] += d * d;
    }
  }
  float la[kLanes], lb[kLanes];
  std::memcpy(la, va, sizeof(la));
  std::memcpy(lb, vb, sizeof(lb));
  for (int lane = 0; i < n; ++i, ++lane) {
    const float d = xp[i] - k;
    la[lane] += d;
    lb[lane] += d * d;
  }
  float a = 0, b = 0;
  for (int lane = 0; lane < kLanes; ++lane) {
    a += la[lane];
    b += lb[lane];
  }
  out_a = a;
  out_b = b;
}

// Applies f elementwise in either layout: plane(offset, channel, n) or row(offset, C).
template <typename F>
void channel_map(const Geometry& g, const F& f) {
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

// Batch statistics in one pass: sums of (x - K) and (x - K)^2 with K a sample of the channel
// (its first element), which keeps the variance free of the cancellation that raw sums of
// squares suffer when the mean is large compared with the spread.
template <typename scalar_t, typename acc_t>
struct ShiftedMoments {
  const scalar_t* x;
  const acc_t* shift;
  void plane(int64_t off, int64_t c, int64_t n, acc_t& a, acc_t& b) const {
    const scalar_t* xp = x + off;
    const acc_t k = shift[c];
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      shifted_moments_f32(xp, k, n, a, b);
    } else {
      lane_sums<acc_t>(n, [&](int64_t i, acc_t& sa, acc_t& sb) {
        const acc_t d = static_cast<acc_t>(xp[i]) - k;
        sa += d;
        sb += d * d;
      }, a, b);
    }
  }
  void row(int64_t off, int64_t C, acc_t* a, acc_t* b) const {
    const scalar_t* xp = x + off;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(xp[c]) - shift[c];
      a[c] += d;
      b[c] += d * d;
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

at::ScalarType stats_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Mean and biased variance per channel of x (statistics dtype: float, double for double input).
template <typename scalar_t, typename opmath_t>
void batch_stats(const at::Tensor& x, const Geometry& g, at::Tensor& mean, at::Tensor& var) {
  const auto sdt = stats_dtype(x.scalar_type());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  std::vector<opmath_t> first(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    first[c] = static_cast<opmath_t>(xp[g.channels_last ? c : c * g.S]);
  }
  std::vector<double> sum, sumsq;  // of (x - first) and its square
  channel_sums<opmath_t>(g, ShiftedMoments<scalar_t, opmath_t>{xp, first.data()}, sum, sumsq);
  const double count = static_cast<double>(g.N * g.S);
  mean = at::empty({g.C}, x.options().dtype(sdt));
  var = at::empty({g.C}, x.options().dtype(sdt));
  auto* mp = mean.mutable_data_ptr<opmath_t>();
  auto* vp = var.mutable_data_ptr<opmath_t>();
  for (int64_t c = 0; c < g.C; ++c) {
    const double d = sum[c] / count;
    mp[c] = static_cast<opmath_t>(static_cast<double>(first[c]) + d);
    vp[c] = static_cast<opmath_t>(std::max(sumsq[c] / count - d * d, 0.0));
  }
}

// The batch statistics (use_batch_stats) or copies of the running statistics; then the per-channel
// scale and shift of the affine BatchNorm. Shared by bn_relu, bn_relu_apply_ and bn_add_relu.
template <typename scalar_t, typename opmath_t>
void batch_norm_affine(const at::Tensor& x, const Geometry& g, const at::Tensor& weight, const at::Tensor& bias,
                       const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                       bool use_batch_stats, double eps, at::Tensor& mean, at::Tensor& var,
                       std::vector<opmath_t>& scale, std::vector<opmath_t>& shift) {
  const auto sdt = stats_dtype(x.scalar_type());
  if (use_batch_stats) {
    batch_stats<scalar_t, opmath_t>(x, g, mean, var);
  } else {
    mean = running_mean->to(sdt).contiguous().clone();
    var = running_var->to(sdt).contiguous().clone();
  }
  const at::Tensor w = weight.to(sdt).contiguous(), b = bias.to(sdt).contiguous();
  std::vector<opmath_t> invstd;
  channel_affine(mean.const_data_ptr<opmath_t>(), var.const_data_ptr<opmath_t>(), w.const_data_ptr<opmath_t>(),
                 b.const_data_ptr<opmath_t>(), eps, g.C, scale, shift, invstd);
}

// The statistics bn_relu(training=True) normalises with, without normalising: for callers that apply
// them later in pieces (a convolution over row chunks, a reused buffer) with bn_relu_apply_.
std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "bn_stats: input must have shape (N, C, ...), got ", input.sizes());
  TORCH_CHECK(input.device().is_cpu(), "bn_stats: the CPU kernel got a tensor on ", input.device());
  const at::Tensor x = readable(input);
  const Geometry g = geometry(x);
  TORCH_CHECK(g.N * g.S > 0, "bn_stats: batch statistics need at least one value per channel, got input of shape ",
              x.sizes());
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu", [&] {
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

// From the per-channel sums of the ReLU-masked gradient gm and of gm * (x - mean): the weight and
// bias gradients (in double) and the coefficients of dx = k * gm + a + b * (x - mean) (a and b fold in
// the batch-statistics terms in training and are zero in eval). Shared by both backward ops.
template <typename opmath_t>
void input_grad_coefficients(const std::vector<double>& sum_g, const std::vector<double>& sum_gd,
                             const std::vector<opmath_t>& invstd, const opmath_t* weight, bool training, double count,
                             double* dw, double* db, std::vector<opmath_t>& k, std::vector<opmath_t>& a,
                             std::vector<opmath_t>& b) {
  const size_t C = sum_g.size();
  k.resize(C);
  a.resize(C);
  b.resize(C);
  for (size_t c = 0; c < C; ++c) {
    const double is = static_cast<double>(invstd[c]);
    dw[c] = sum_gd[c] * is;  // sum of gm * xhat
    db[c] = sum_g[c];
    k[c] = weight[c] * invstd[c];
    if (training) {
      // dx = k * (gm - sum_g / M - xhat * sum(gm * xhat) / M), with xhat = (x - mean) * invstd.
      const double kd = static_cast<double>(k[c]);
      b[c] = static_cast<opmath_t>(-kd * is * dw[c] / count);
      a[c] = static_cast<opmath_t>(-kd * sum_g[c] / count);
    } else {
      a[c] = opmath_t(0);
      b[c] = opmath_t(0);
    }
  }
}

// What both backward ops need of the statistics and the affine parameters, in the statistics dtype:
// mean, weight, and the forward's per-channel scale, shift and invstd (the same rounding, so the
// recomputed ReLU mask is the forward's).
template <typename opmath_t>
struct BackwardAffine {
  at::Tensor mean, weight;
  std::vector<opmath_t> scale, shift, invstd;
  BackwardAffine(const at::Tensor& mean_, const at::Tensor& var, const at::Tensor& weight_, const at::Tensor& bias,
                 double eps, int64_t C, at::ScalarType sdt)
      : mean(mean_.to(sdt).contiguous()), weight(weight_.to(sdt).contiguous()) {
    const at::Tensor v = var.to(sdt).contiguous(), b = bias.to(sdt).contiguous();
    channel_affine(mean.const_data_ptr<opmath_t>(), v.const_data_ptr<opmath_t>(), weight.const_data_ptr<opmath_t>(),
                   b.const_data_ptr<opmath_t>(), eps, C, scale, shift, invstd);
  }
};

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
  m.impl("bn_relu", &bn_relu_cpu);
  m.impl("bn_relu_backward", &bn_relu_backward_cpu);
  m.impl("bn_relu_apply_", &bn_relu_apply_cpu);
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_relu_backward_into_", &bn_relu_backward_into_cpu);
  m.impl("bn_add_relu", &bn_add_relu_cpu);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_cpu);
}

}  // namespace ahnet_fast

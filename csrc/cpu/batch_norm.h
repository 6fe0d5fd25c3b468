// Shared machinery of the CPU BatchNorm kernels (csrc/cpu/bn_relu.cpp, csrc/cpu/bn_add_relu.cpp):
// the two layouts, per-channel sums that vectorise without reassociating, one-pass batch statistics,
// the affine form of BatchNorm and the input-gradient coefficients both backward ops share.
// Two memory layouts are read directly: contiguous channel-first (N, C, *spatial) and
// channels-last (N, *spatial, C in memory, i.e. channels_last / channels_last_3d); anything
// else is made contiguous first. Reductions accumulate in double for every input dtype.
#pragma once

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
namespace bn_detail {

struct Geometry {
  int64_t N = 0;  // batch
  int64_t C = 0;  // channels
  int64_t S = 0;  // voxels per (sample, channel)
  bool channels_last = false;
};




inline Geometry geometry(const at::Tensor& x) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = g.C == 0 || g.N == 0 ? 0 : x.numel() / (g.N * g.C);
  g.channels_last = is_channels_last(x);
  return g;
}

inline void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const char* op) {
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

inline at::ScalarType stats_dtype(at::ScalarType t) {
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

}  // namespace bn_detail
}  // namespace ahnet_fast

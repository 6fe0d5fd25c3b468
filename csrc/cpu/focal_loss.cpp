// CPU kernel of ahnet_fast::focal_loss: the focal loss and its gradient in one pass.
//
// One read of the logits and the target, one write of the gradient (when asked for), no
// full-size temporaries. Softmax over the classes (per voxel) or sigmoid (per element), a target
// that is either an integer label map (B, S) used directly (no one-hot) or a dense float target
// laid out like the logits. Math in float (double for double inputs). exp/log are evaluated with
// branch-free polynomial approximations (~2 ulp) that the compiler vectorises, since the
// standard-library calls would not be. Work is done in tiles of voxels so that the per-class
// loops run over contiguous voxels in the channel-first layout.
//
// Outputs: per-sample loss sums (unscaled), per-sample counts of voxels that count (not
// ignore_index), the gradient already multiplied by grad_scale[b] (zero on ignored voxels and
// on channels below first_channel), and the number of invalid targets (label out of range, or
// a dense target outside [0, 1] or NaN): Python raises a ValueError when it is not zero.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "layout.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------------------------

namespace ahnet_fast {
namespace {

struct Layout {
  int64_t B, C, S;
  int64_t sb, sc, ss;  // strides of batch, channel and (flattened) voxel
};




Layout layout_of(const at::Tensor& x) {
  Layout l;
  l.B = x.size(0);
  l.C = x.size(1);
  l.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) l.S *= x.size(d);
  l.sb = x.stride(0);
  l.sc = x.stride(1);
  l.ss = is_channels_last(x) ? l.C : 1;
  return l;
}

constexpr int64_t kTile = 64;

struct Options {
  double gamma;
  bool softmax, label_target, has_ignore, alpha_linear, compute_grad;
  int64_t first, ignore_index;
};

// One thread's share: partial sums per sample and the invalid-target count.
struct Partial {
  std::vector<double> loss, count;
  int64_t invalid = 0;
};

// The sigmoid focal loss of a run of n elements of one class: adds the loss to vloss and writes
// dL/dx (unscaled) to d. loss = A * B * M with B = softplus(x) - x t (BCE with logits),

// The kernels, compiled for the baseline ISA and, on x86-64 with GCC/Clang, for AVX2+FMA and for
// AVX-512 (16-wide, mask registers).
#define AHNET_FAST_ISA_NS isa_baseline
#include "focal_loss_kernel.h"
#undef AHNET_FAST_ISA_NS
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AHNET_FAST_HAVE_AVX2_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define AHNET_FAST_ISA_NS isa_avx2
#include "focal_loss_kernel.h"
#undef AHNET_FAST_ISA_NS
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")
#define AHNET_FAST_ISA_NS isa_avx512
#include "focal_loss_kernel.h"
#undef AHNET_FAST_ISA_NS
#pragma GCC pop_options
#endif

// Which compiled variant runs: the widest the CPU has, unless AHNET_FAST_NO_AVX512=1 (then AVX2 at
// most) or AHNET_FAST_NO_AVX2=1 (the baseline) says otherwise.
enum class Isa { baseline, avx2, avx512 };

Isa chosen_isa() {
#ifdef AHNET_FAST_HAVE_AVX2_VARIANT
  static const Isa isa = [] {
    if (std::getenv("AHNET_FAST_NO_AVX2") != nullptr) return Isa::baseline;
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return Isa::baseline;
    if (std::getenv("AHNET_FAST_NO_AVX512") == nullptr && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      return Isa::avx512;
    return Isa::avx2;
  }();
  return isa;
#else
  return Isa::baseline;
#endif
}

template <typename scalar_t, typename target_t>
void run_tiles(const Layout& L, const scalar_t* x, const target_t* tgt, int64_t tgt_sb, int64_t tgt_sc, int64_t tgt_ss,
               scalar_t* grad,
               const at::Tensor& fpos, const at::Tensor& fneg, const at::Tensor& scale, const Options& o,
               std::vector<Partial>& partials) {
  const double *pp = fpos.const_data_ptr<double>(), *np = fneg.const_data_ptr<double>();
  const double* sp = scale.const_data_ptr<double>();
  const bool unit = L.ss == 1 && (o.label_target || tgt_ss == 1);
#ifdef AHNET_FAST_HAVE_AVX2_VARIANT
  if (chosen_isa() == Isa::avx512) {
    if (unit) isa_avx512::focal_tiles<scalar_t, target_t, true>(L, x, tgt, tgt_sb, tgt_sc, tgt_ss, grad, pp, np, sp, o, partials);
    else isa_avx512::focal_tiles<scalar_t, target_t, false>(L, x, tgt, tgt_sb, tgt_sc, tgt_ss, grad, pp, np, sp, o, partials);
    return;
  }
  if (chosen_isa() == Isa::avx2) {
    if (unit) isa_avx2::focal_tiles<scalar_t, target_t, true>(L, x, tgt, tgt_sb, tgt_sc, tgt_ss, grad, pp, np, sp, o, partials);
    else isa_avx2::focal_tiles<scalar_t, target_t, false>(L, x, tgt, tgt_sb, tgt_sc, tgt_ss, grad, pp, np, sp, o, partials);
    return;
  }
#endif
  if (unit) isa_baseline::focal_tiles<scalar_t, target_t, true>(L, x, tgt, tgt_sb, tgt_sc, tgt_ss, grad, pp, np, sp, o, partials);
  else isa_baseline::focal_tiles<scalar_t, target_t, false>(L, x, tgt, tgt_sb, tgt_sc, tgt_ss, grad, pp, np, sp, o, partials);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> focal_loss_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& factor_pos,
    const at::Tensor& factor_neg, const at::Tensor& grad_scale, double gamma, bool softmax, bool label_target,
    int64_t first_channel, int64_t ignore_index, bool has_ignore, bool alpha_linear, bool compute_grad) {
  TORCH_CHECK(logits_in.dim() >= 2, "focal_loss: logits must be (B, C, ...), got ", logits_in.sizes());
  TORCH_CHECK(first_channel >= 0 && first_channel < logits_in.size(1), "focal_loss: first_channel ",
              first_channel, " out of range for ", logits_in.size(1), " channels");
  const at::Tensor logits = readable(logits_in);
  const Layout L = layout_of(logits);
  const int64_t Cu = L.C - first_channel;
  TORCH_CHECK(factor_pos.numel() == Cu && factor_neg.numel() == Cu, "focal_loss: class factors need ", Cu,
              " elements");
  TORCH_CHECK(grad_scale.numel() == L.B, "focal_loss: grad_scale needs ", L.B, " elements");
  at::Tensor target;
  int64_t tgt_sb, tgt_sc = 0, tgt_ss;
  if (label_target) {
    TORCH_CHECK(target_in.numel() == L.B * L.S, "focal_loss: a label map needs B*S = ", L.B * L.S,
                " elements, got ", target_in.sizes());
    target = target_in.reshape({L.B, L.S}).contiguous();
    tgt_sb = L.S;
    tgt_ss = 1;
  } else {
    TORCH_CHECK(target_in.sizes() == logits_in.sizes(), "focal_loss: dense target shape ", target_in.sizes(),
                " differs from logits ", logits_in.sizes());
    target = readable(target_in);  // read in its own layout: no copy to match the logits'
    tgt_sb = target.stride(0);
    tgt_sc = target.stride(1);
    tgt_ss = is_channels_last(target) ? L.C : 1;
  }
  const at::Tensor fpos = factor_pos.to(at::kDouble).contiguous();
  const at::Tensor fneg = factor_neg.to(at::kDouble).contiguous();
  const at::Tensor scale = grad_scale.to(at::kDouble).contiguous();
  at::Tensor grad = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  const Options o{gamma, softmax, label_target, has_ignore, alpha_linear, compute_grad, first_channel, ignore_index};
  std::vector<Partial> partials(at::get_num_threads());
  for (auto& p : partials) {
    p.loss.assign(L.B, 0.0);
    p.count.assign(L.B, 0.0);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "focal_loss_cpu", [&] {
    using scalar_t_ = scalar_t;
    const scalar_t_* xp = logits.const_data_ptr<scalar_t_>();
    scalar_t_* gp = compute_grad ? grad.mutable_data_ptr<scalar_t_>() : nullptr;
    auto run = [&](auto* tp) {
      using target_t = std::remove_const_t<std::remove_pointer_t<decltype(tp)>>;
      run_tiles<scalar_t_, target_t>(L, xp, target.const_data_ptr<target_t>(), tgt_sb, tgt_sc, tgt_ss, gp, fpos,
                                     fneg, scale, o, partials);
    };
    // Target dtypes compiled for (the Python launcher converts others): labels uint8/int32/int64;
    // dense targets float32 or the logits' own dtype. Fewer instantiations, a shorter build.
    const auto tdt = target.scalar_type();
    if (label_target) {
      if (tdt == at::kLong) run(static_cast<const int64_t*>(nullptr));
      else if (tdt == at::kInt) run(static_cast<const int32_t*>(nullptr));
      else if (tdt == at::kByte) run(static_cast<const uint8_t*>(nullptr));
      else TORCH_CHECK(false, "focal_loss: label maps must be uint8, int32 or int64, got ", tdt);
    } else {
      if (tdt == logits.scalar_type()) run(static_cast<const scalar_t_*>(nullptr));
      else if (tdt == at::kFloat) run(static_cast<const float*>(nullptr));
      else TORCH_CHECK(false, "focal_loss: a dense target must be float32 or the logits' dtype, got ", tdt);
    }
  });
  at::Tensor loss_sum = at::zeros({L.B}, logits.options().dtype(at::kDouble));
  at::Tensor count = at::zeros({L.B}, logits.options().dtype(at::kDouble));
  int64_t invalid = 0;
  double* lp = loss_sum.mutable_data_ptr<double>();
  double* cp = count.mutable_data_ptr<double>();
  for (const auto& p : partials) {
    for (int64_t b = 0; b < L.B; ++b) {
      lp[b] += p.loss[b];
      cp[b] += p.count[b];
    }
    invalid += p.invalid;
  }
  return {loss_sum, count, grad, at::scalar_tensor(invalid, logits.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(ahnet_fast, CPU, m) {
  m.impl("focal_loss", &focal_loss_cpu);
}

}  // namespace ahnet_fast

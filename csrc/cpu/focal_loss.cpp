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
#include <torch/library.h>

#include "focal_loss.h"
#include "isa.h"
#include "layout.h"

#include <cstdlib>
#include <tuple>

namespace ahnet_fast {
namespace focal_loss_kernels {
#define AHNET_FAST_ISA_NS isa_baseline
#define AHNET_FAST_ISA_DOUBLE 1
#include "focal_loss_kernel.h"
#undef AHNET_FAST_ISA_DOUBLE
#undef AHNET_FAST_ISA_NS
}  // namespace focal_loss_kernels

namespace {
using namespace focal_loss_kernels;

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

// The widest variant the CPU runs; double logits always take the baseline (see focal_loss.h).
void run_variant(const TileJob& job) {
#ifdef AHNET_FAST_HAVE_AVX2_VARIANT
  if (job.x_dtype != at::kDouble) {
    if (chosen_isa() == Isa::avx512) return isa_avx512::run_tiles(job);
    if (chosen_isa() == Isa::avx2) return isa_avx2::run_tiles(job);
  }
#endif
  isa_baseline::run_tiles(job);
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
  const at::ScalarType xdt = logits.scalar_type();
  TORCH_CHECK(xdt == at::kFloat || xdt == at::kDouble || xdt == at::kHalf || xdt == at::kBFloat16,
              "focal_loss: logits must be float32, float64, float16 or bfloat16, got ", xdt);
  const bool unit = L.ss == 1 && (label_target || tgt_ss == 1);
  TileJob job{L, xdt, target.scalar_type(), logits.const_data_ptr(), target.const_data_ptr(), tgt_sb, tgt_sc, tgt_ss,
              compute_grad ? grad.mutable_data_ptr() : nullptr, fpos.const_data_ptr<double>(),
              fneg.const_data_ptr<double>(), scale.const_data_ptr<double>(), o, unit, &partials};
  run_variant(job);
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

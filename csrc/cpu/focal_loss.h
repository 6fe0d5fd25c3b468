// What the three compiled variants of the focal-loss tile loop share (csrc/cpu/focal_loss.cpp holds
// the op and the baseline variant, focal_loss.avx2.cpp and focal_loss.avx512.cpp the wider ones).
// The variants live in separate translation units so that the build compiles them in parallel:
// in one file they were the longest compile of the extension by a factor of eight.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

// what focal_loss_kernel.h uses, included here, before any variant's target pragma
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace ahnet_fast {
namespace focal_loss_kernels {

struct Layout {
  int64_t B, C, S;
  int64_t sb, sc, ss;  // strides of batch, channel and (flattened) voxel
};

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

// One call of the tile loop, with the dtypes as values: each variant exposes one plain function,
// so the templates stay inside their translation unit (and its instruction-set target).
struct TileJob {
  Layout L;
  at::ScalarType x_dtype, target_dtype;
  const void* x;
  const void* target;
  int64_t tgt_sb, tgt_sc, tgt_ss;
  void* grad;  // nullptr unless o.compute_grad
  const double *fpos, *fneg, *scale;
  Options o;
  bool unit;  // voxels adjacent in memory in the logits (and in a dense target)
  std::vector<Partial>* partials;
};

// Every variant takes uint8/int32/int64 label maps and dense targets of float32 or the logits'
// dtype. The baseline takes double, half and bfloat16 logits besides float; the AVX2 and AVX-512
// variants take float, half and bfloat16 (double goes through std::exp/std::log, which do not
// vectorise, so a wider variant would only lengthen the build).
namespace isa_baseline {
void run_tiles(const TileJob& job);
}
namespace isa_avx2 {
void run_tiles(const TileJob& job);
}
namespace isa_avx512 {
void run_tiles(const TileJob& job);
}

}  // namespace focal_loss_kernels
}  // namespace ahnet_fast

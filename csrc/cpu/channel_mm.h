// The tile loop of ahnet_fast::channel_mm_ (see channel_mm.cpp), compiled per instruction set in its own
// translation unit (channel_mm.avx512.cpp).
#pragma once

#include <cstdint>

namespace ahnet_fast {

// A convolution's taps for channel_mm_conv_ (stride 1, zero padding that keeps the size): the input map has
// `size` (three axes, leading ones of size 1 for fewer), tap t reads the voxel `offset[t]` away from the
// output voxel, `flat[t]` elements away in the row-major map.
constexpr int kMaxTaps = 27;
struct ChannelConvTaps {
  int64_t count;
  int32_t size[3];
  int32_t offset[kMaxTaps][3];
  int64_t flat[kMaxTaps];
};

// y[m, n] (+)= sum_k w[m, k] * act(x[k, n]) for m < M, n < N; act(v) = max(0, v * scale[k] + shift[k]) when
// scale is set, else v. x and y rows are contiguous (ldx, ldy: their row strides, in elements).
// With `taps` set, the product is a convolution over x's map (channel_mm_conv_): row k = c * T + t of the
// product's right operand is act(x[c]) at tap t's offset from each output voxel, zero where that leaves
// the map (the padding is of the activated map); K = channels * T.
struct ChannelMmJob {
  const float* w;  // w[m, k] at w + m * w_sm + k * w_sk
  int64_t w_sm, w_sk;
  int64_t M, K, N;
  const float* x;
  int64_t ldx;
  const float* scale;  // K values, or nullptr (then shift is nullptr too)
  const float* shift;
  float* y;
  int64_t ldy;
  bool accumulate;
  const ChannelConvTaps* taps = nullptr;
};

namespace channel_mm_kernels {
constexpr int kRows = 8;     // output rows per register block
constexpr int kColumns = 48; // output columns per register block (three 16-float vectors)
namespace isa_avx512 {
void run(const ChannelMmJob& job);
}  // namespace isa_avx512
}  // namespace channel_mm_kernels

}  // namespace ahnet_fast

namespace ahnet_fast {

// out[m, k] (+)= sum_l a[m, l] * b[k, l] for m < M, k < K: a weight gradient (a: the output gradient,
// b: the layer's input, l: the voxels). Rows of a and b contiguous (lda, ldb: row strides); out[m, k] at
// out + m * ldo + k.
struct ChannelMmNtJob {
  const float* a;
  int64_t lda;
  const float* b;
  int64_t ldb;
  int64_t M, K, L;
  float* out;
  int64_t ldo;
  bool accumulate;
  // With `taps` set (channel_mm_nt_conv_): b is a convolution's input map (channels rows), and row
  // k = c * T + t of the right operand is b[c] read at tap t's offset, zero where that leaves the map, as
  // in ChannelMmJob's panel: out is then the convolution's weight gradient, (M, channels * T); K counts
  // those virtual rows.
  const ChannelConvTaps* taps = nullptr;
};

namespace channel_mm_kernels {
namespace isa_avx512 {
void run_nt(const ChannelMmNtJob& job);
}  // namespace isa_avx512
}  // namespace channel_mm_kernels

}  // namespace ahnet_fast

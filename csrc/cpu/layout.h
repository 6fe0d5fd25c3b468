// Memory layouts the CPU kernels read directly: contiguous channel-first (N, C, *spatial) and
// channels-last (channels_last / channels_last_3d: C innermost). Anything else is made
// contiguous first.
#pragma once

#include <ATen/ATen.h>

namespace ahnet_fast {

inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}

// The tensor in a layout the kernels read directly.
inline at::Tensor readable(const at::Tensor& x) {
  return (x.is_contiguous() || is_channels_last(x)) ? x : x.contiguous();
}

// `t` laid out exactly like `like` (which is readable()).
inline at::Tensor same_layout(const at::Tensor& t, const at::Tensor& like) {
  return is_channels_last(like) ? t.movedim(1, -1).contiguous().movedim(-1, 1) : t.contiguous();
}

}  // namespace ahnet_fast

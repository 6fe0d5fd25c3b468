// Operator schemas of ahnet_fast. Kernels register per device: the CPU ones in csrc/cpu (the GPU
// kernels are Triton's, ahnet_fast/kernels/triton);
// fake (meta) and autograd formulas are registered from Python (ahnet_fast/ops/*.py).
#include <Python.h>
#include <torch/library.h>

// `import ahnet_fast._C` only has to load this shared library so that the static
// TORCH_LIBRARY registrations below run; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "ahnet_fast C++ operators (registered under torch.ops.ahnet_fast)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(ahnet_fast, m) {
  // BatchNorm followed by ReLU, y = max(0, (x - mean) * invstd * weight + bias).
  // training=True normalises with the batch statistics (biased variance) and returns them;
  // training=False normalises with running_mean / running_var and returns those.
  // Returns (y, mean, var): mean and var are float32 for reduced-precision inputs.
  m.def(
      "bn_relu(Tensor input, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var, "
      "bool training, float eps) -> (Tensor, Tensor, Tensor)");
  // Gradient of bn_relu with respect to input, weight and bias. The ReLU mask is recomputed
  // from the input, so the forward output need not be kept for backward.
  m.def(
      "bn_relu_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor bias, Tensor mean, "
      "Tensor var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  // relu(batch_norm(input)) with the given statistics (eval-mode arithmetic of bn_relu), written into
  // out, which must have the input's shape and dtype and be channels-last when the input is, else
  // contiguous: backward's recomputation into a reused buffer.
  m.def(
      "bn_relu_apply_(Tensor input, Tensor weight, Tensor bias, Tensor mean, Tensor var, float eps, "
      "Tensor(a!) out) -> ()");
  // The batch statistics bn_relu(training=True) uses (mean, biased variance; float32 for reduced
  // precision), without normalising.
  m.def("bn_relu_stats(Tensor input) -> (Tensor, Tensor)");
  // bn_relu_backward's input gradient written into out (out = grad, or out += grad with accumulate);
  // out has the input's shape and dtype and may be grad_out itself (exactly: out overlapping grad_out or
  // input at another offset is not supported). Returns (grad_weight, grad_bias).
  m.def(
      "bn_relu_backward_into_(Tensor grad_out, Tensor input, Tensor weight, Tensor bias, Tensor mean, Tensor var, "
      "bool training, float eps, Tensor(a!) out, bool accumulate) -> (Tensor, Tensor)");
  // The ResNet bottleneck's tail: y = max(0, batch_norm(input) + residual), statistics as bn_relu.
  // Returns (y, mean, var).
  m.def(
      "bn_add_relu(Tensor input, Tensor residual, Tensor weight, Tensor bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  // Gradient of bn_add_relu with respect to input, residual, weight and bias, from the forward's
  // output (the ReLU mask: blocked where output <= 0, as torch's ReLU backward) and input.
  m.def(
      "bn_add_relu_backward(Tensor grad_out, Tensor output, Tensor input, Tensor weight, Tensor bias, Tensor mean, "
      "Tensor var, bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Focal loss and its gradient in one pass over the logits (see ahnet_fast/ops/focal_loss.py).
  // Classes first_channel..C-1 enter the loss. target: an integer label map with B*S elements
  // (label_target) or a float tensor shaped like the logits. factor_pos / factor_neg: per-class
  // factors (alpha times weight) for target 1 / 0 (softmax uses factor_pos). The gradient, when
  // compute_grad, is multiplied by grad_scale[b] per sample. Returns (loss sum per sample, count of
  // voxels that are not ignore_index per sample, gradient or an empty tensor, invalid-target count).
  m.def(
      "focal_loss(Tensor logits, Tensor target, Tensor factor_pos, Tensor factor_neg, "
      "Tensor grad_scale, float gamma, bool softmax, bool label_target, int first_channel, int ignore_index, "
      "bool has_ignore, bool alpha_linear, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // Pyramid volumetric pooling (MONAI's PSP) in one pass over x (N, C, H, W, D); see
  // csrc/cpu/pyramid_pool.cpp. Level l pools windows of 8<<l rows by 8<<l (pool_w) or 1 columns.
  // Returns (out: [levels upsampled channels, then x when concat_input], pooled maxima per level,
  // window positions of the maxima per level (int8 for level 0, int16 above), padded projections
  // per level (float32, float64 for float64 x)).
  m.def(
      "pyramid_pool(Tensor x, Tensor proj_weight, Tensor proj_bias, Tensor? up_weight, Tensor? up_bias, "
      "Tensor index_h, Tensor lambda_h, Tensor index_w, Tensor lambda_w, int levels, bool pool_w, bool linear, "
      "bool concat_input) -> (Tensor, Tensor[], Tensor[], Tensor[])");
  // Gradient of pyramid_pool with respect to x: grad_identity (the gradient of the concatenated x,
  // or None) plus each level's pooled gradient routed to its argmax.
  m.def(
      "pyramid_pool_backward(Tensor? grad_identity, Tensor[] grad_pooled, Tensor[] argmax, int[] size, bool pool_w, "
      "ScalarType dtype, bool channels_last) -> Tensor");
  // The same gradient written over grad_x, which holds the gradient of the concatenated x on entry
  // (pyramid_pool's caller owns that gradient and hands it over: no second tensor of x's size).
  m.def("pyramid_pool_backward_(Tensor(a!) grad_x, Tensor[] grad_pooled, Tensor[] argmax, bool pool_w) -> ()");
  // Max pooling along the last axis only (windows (1, 1, k) / (1, k), stride k, floor mode) of an
  // input of any dense strides; see csrc/cpu/slice_max_pool.cpp. Returns (out: contiguous, or
  // channels-last when the input is; position: uint8, the winning index in each window, laid out
  // as out).
  m.def("slice_max_pool(Tensor x, int k) -> (Tensor, Tensor)");
  // Gradient of slice_max_pool: grad routed to the positions, zeros elsewhere, laid out with the
  // input's size and strides.
  m.def("slice_max_pool_backward(Tensor grad, Tensor position, int k, SymInt[] size, SymInt[] stride) -> Tensor");
  // The 3D (2D) pixel shuffle of a transposed convolution whose kernel equals its stride
  // (csrc/cpu/transposed_conv.cpp): (N, C * f0 * f1 * f2, H, W, D) -> (N, C, H * f0, W * f1, D * f2),
  // channel c * F + tap (tap = (a * f1 + b) * f2 + c) to position (h * f0 + a, w * f1 + b, d * f2 + c);
  // transposed_conv_unshuffle is the inverse. Both return contiguous tensors.
  m.def("transposed_conv_shuffle(Tensor x, int[] factors) -> Tensor");
  m.def("transposed_conv_unshuffle(Tensor y, int[] factors) -> Tensor");
  // out (+)= weight @ act(x) for a channel-first map's channels (csrc/cpu/channel_mm.cpp): weight (M, K), x (K, N)
  // with contiguous rows, out (M, N) with contiguous rows, float32; act(v) = max(0, v * scale[k] + shift[k])
  // when scale and shift are given (BatchNorm-ReLU applied as x is read), else v.
  m.def(
      "channel_mm_(Tensor(a!) out, Tensor weight, Tensor x, Tensor? scale, Tensor? shift, bool accumulate) -> ()");
  // out (+)= a @ b^T, a (M, L) and b (K, L) with contiguous rows (L: the voxels), out (M, K) with contiguous rows,
  // float32: a convolution's weight gradient (a: the output gradient, b: its input).
  m.def("channel_mm_nt_(Tensor(a!) out, Tensor a, Tensor b, bool accumulate) -> ()");
  // out (+)= conv(act(x), weight), stride 1, the size kept (zero padding (k - 1) / 2): x (Ci, S) a channel-first
  // map of the given spatial sizes with contiguous rows, weight (Co, Ci, *kernel) contiguous with odd sizes (at
  // most 27 taps), out (Co, S) with contiguous rows, float32; act as in channel_mm_. A 3x3x1 or 1x1x3
  // convolution without its taps' maps (csrc/cpu/channel_mm.cpp).
  m.def(
      "channel_mm_conv_(Tensor(a!) out, Tensor weight, Tensor x, int[] spatial, Tensor? scale, Tensor? shift, "
      "bool accumulate) -> ()");
  // out (+)= a @ taps(x)^T: channel_mm_conv_'s weight gradient, a (M, S) the output gradient, x (Ci, S) the input
  // map of the given spatial sizes (both with contiguous rows), out (M, Ci * taps) with contiguous rows, float32:
  // out[m, c * T + t] = sum over voxels p of a[m, p] * x[c, p + offset_t], zero where the tap leaves the map.
  m.def("channel_mm_nt_conv_(Tensor(a!) out, Tensor a, Tensor x, int[] spatial, int[] kernel, bool accumulate) -> ()");
}

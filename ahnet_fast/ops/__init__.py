"""Functional ops. Each op module holds its pure-PyTorch reference, its implementation table (the
one place that decides which backend runs a call, see ahnet_fast.backends), the launchers, and the
autograd/fake registration of its compiled kernels."""
from ahnet_fast.ops.bn_add_relu import bn_add_relu, bn_add_relu_reference
from ahnet_fast.ops.bn_relu import bn_relu, bn_relu_reference
from ahnet_fast.ops.bn_relu_conv import bn_relu_conv, bn_relu_conv_reference
from ahnet_fast.ops.dense_block import dense_block, dense_block_input, dense_block_into, dense_block_reference
from ahnet_fast.ops.focal_loss import focal_loss
from ahnet_fast.ops.pointwise_conv import pointwise_conv, pointwise_conv_reference
from ahnet_fast.ops.pyramid_pool import pyramid_pool, pyramid_pool_reference
from ahnet_fast.ops.slice_max_pool import slice_max_pool, slice_max_pool_reference
from ahnet_fast.ops.stem_conv_pool import stem_conv_pool, stem_conv_pool_reference
from ahnet_fast.ops.transposed_conv import transposed_conv, transposed_conv_reference

__all__ = ["bn_add_relu", "bn_add_relu_reference", "bn_relu", "bn_relu_reference",
           "bn_relu_conv", "bn_relu_conv_reference", "dense_block", "dense_block_input", "dense_block_into", "dense_block_reference", "focal_loss",
           "pointwise_conv", "pointwise_conv_reference", "pyramid_pool", "pyramid_pool_reference", "slice_max_pool",
           "slice_max_pool_reference", "stem_conv_pool", "stem_conv_pool_reference", "transposed_conv",
           "transposed_conv_reference"]

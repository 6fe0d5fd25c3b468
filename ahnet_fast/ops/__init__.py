"""Functional ops. Each op module holds its pure-PyTorch reference, the launcher that picks a
backend, and the autograd/fake registration of its compiled kernels."""
from ahnet_fast.ops.bn_add_relu import batch_norm_add_relu, batch_norm_add_relu_reference
from ahnet_fast.ops.bn_relu import batch_norm_relu, batch_norm_relu_reference
from ahnet_fast.ops.bn_relu_conv import bn_relu_conv, bn_relu_conv_reference
from ahnet_fast.ops.dense_block import dense_block, dense_block_reference
from ahnet_fast.ops.focal_loss import focal_loss
from ahnet_fast.ops.pyramid_pool import pyramid_pool, pyramid_pool_reference

__all__ = ["batch_norm_add_relu", "batch_norm_add_relu_reference", "batch_norm_relu", "batch_norm_relu_reference", "bn_relu_conv", "bn_relu_conv_reference", "dense_block",
           "dense_block_reference", "focal_loss", "pyramid_pool", "pyramid_pool_reference"]

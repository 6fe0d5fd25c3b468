"""Modules: they own parameters and call ops."""
from ahnet_fast.nn._bn import set_script_ops
from ahnet_fast.nn.ahnet import AHNet, AHnet, Ahnet, PyramidVolumetricPooling
from ahnet_fast.nn.fcn import FCN, MCFCN
from ahnet_fast.nn.focal_loss import FocalLoss
from ahnet_fast.nn.shapes import ahnet_output_shape, check_ahnet_input

__all__ = ["AHNet", "AHnet", "Ahnet", "FCN", "FocalLoss", "MCFCN", "PyramidVolumetricPooling", "ahnet_output_shape",
           "check_ahnet_input", "set_script_ops"]

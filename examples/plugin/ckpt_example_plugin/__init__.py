"""Example architectures for the checkpoint service, registered through entry points."""

from ckpt_example_plugin.models import BNMLP, BNConvNet, build_bn_convnet, build_bn_mlp

__all__ = ["BNMLP", "BNConvNet", "build_bn_convnet", "build_bn_mlp"]

"""The network: MONAI's DynUNet built from a plan's topology.

``build_network`` is the one bridge between plans and the model; the model itself knows nothing
about plans. Input channels are the image channels plus ``extra_in_channels`` (the cascade's one-hot
previous-stage segmentation), so the cascade needs no other network code.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet
from torch import nn

from segpipe.planning.plans import Configuration


def build_network(
    config: Configuration,
    in_channels: int,
    num_classes: int,
    deep_supervision: bool = True,
    extra_in_channels: int = 0,
) -> nn.Module:
    """A U-Net with per-stage kernels/strides/features from ``config.topology``.

    Instance norm (affine), leaky ReLU (0.01), two convolutions per stage as nnU-Net. In training
    mode with deep supervision the output is ``(B, 1 + D, num_classes, X, Y, Z)``: the full-resolution
    head first, then ``D`` lower decoder heads upsampled to full size; in eval mode ``(B, C, X, Y, Z)``.
    """
    topo = config.topology
    num_ds = max(1, topo.num_stages - 2) if deep_supervision and topo.num_stages > 2 else 0
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels + extra_in_channels,
        out_channels=num_classes,
        kernel_size=topo.kernel_sizes,
        strides=topo.strides,
        upsample_kernel_size=topo.strides[1:],
        filters=topo.features,
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=num_ds > 0,
        deep_supr_num=max(1, num_ds),
        res_block=False,
    )


def deep_supervision_weights(num_heads: int) -> torch.Tensor:
    """Loss weights halving per decoder level, normalized to sum 1 (full resolution first)."""
    w = torch.tensor([0.5**i for i in range(num_heads)])
    return w / w.sum()

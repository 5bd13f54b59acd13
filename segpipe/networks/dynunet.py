"""``dynunet`` (the default) and ``resenc``: U-Nets from MONAI's DynUNet building blocks.

``dynunet`` is nnU-Net's plain U-Net: two convolutions per stage (MONAI's ``DynUNet``), heads kept at
their own resolution. ``resenc`` is nnU-Net's residual-encoder U-Net (ResEnc, its current
recommendation; nnunetv2/experiment_planning/experiment_planners/residual_unets/): residual blocks in
the encoder, ``blocks_per_stage`` of them per stage (ResEnc M: 1, 3, 4, 6, 6, 6, ...), MONAI's up
blocks in the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, UnetUpBlock
from monai.networks.nets import DynUNet
from torch import nn

from segpipe.networks.registry import NETWORKS, NetworkInput

NORM = ("INSTANCE", {"affine": True})
ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})
RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6)  # nnU-Net's ResEncUNet M, encoder blocks per stage


class NativeHeadsDynUNet(DynUNet):
    """MONAI's DynUNet whose deep-supervision heads stay at their own resolution.

    In training with deep supervision the output is a tuple of logits, full resolution first, each
    head at its decoder level's size: nnU-Net's way (the targets are downsampled, see
    :mod:`segpipe.training.losses`), instead of MONAI's stack of heads upsampled to full size, which
    stores ``heads x classes`` full-size tensors (and their softmax and gradients) per batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.output_block(self.skip_layers(x))
        if self.training and self.deep_supervision:
            return (out, *self.heads)
        return out


@NETWORKS.register("dynunet")
def dynunet(net: NetworkInput) -> nn.Module:
    """nnU-Net's plain U-Net as MONAI's DynUNet: instance norm (affine), leaky ReLU 0.01, two
    convolutions per stage, transposed-convolution upsampling."""
    return NativeHeadsDynUNet(
        spatial_dims=net.spatial_dims,
        in_channels=net.in_channels,
        out_channels=net.out_channels,
        kernel_size=net.kernel_sizes,
        strides=net.strides,
        upsample_kernel_size=net.strides[1:],
        filters=net.features,
        norm_name=NORM,
        act_name=ACT,
        deep_supervision=net.num_lower_heads > 0,
        deep_supr_num=max(1, net.num_lower_heads),
        res_block=False,
    )


class ResEncUNet(nn.Module):
    """Residual encoder (``blocks[i]`` MONAI ``UnetResBlock``s at stage ``i``, the first one strided),
    MONAI ``UnetUpBlock`` decoder, a 1x1 head per decoder level (``lower_heads`` of them below full
    resolution in training)."""

    def __init__(self, net: NetworkInput, blocks: Sequence[int]):
        super().__init__()
        d, f = net.spatial_dims, net.features
        self.encoder = nn.ModuleList()
        for i, (k, s) in enumerate(zip(net.kernel_sizes, net.strides)):
            first = UnetResBlock(d, net.in_channels if i == 0 else f[i - 1], f[i], k, s, NORM, ACT)
            rest = [UnetResBlock(d, f[i], f[i], k, 1, NORM, ACT) for _ in range(blocks[i] - 1)]
            self.encoder.append(nn.Sequential(first, *rest))
        self.decoder = nn.ModuleList(
            UnetUpBlock(d, f[i + 1], f[i], net.kernel_sizes[i], net.strides[i + 1], net.strides[i + 1], NORM, ACT)
            for i in reversed(range(net.num_stages - 1))
        )
        self.head = UnetOutBlock(d, f[0], net.out_channels)
        self.lower_heads = nn.ModuleList(
            UnetOutBlock(d, f[i], net.out_channels) for i in range(1, 1 + net.num_lower_heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        levels = []  # decoder outputs from the bottom up, i.e. stage num_stages - 2 down to 0
        for up, skip in zip(self.decoder, reversed(skips[:-1])):
            x = up(x, skip)
            levels.append(x)
        out = self.head(x)
        if not (self.training and len(self.lower_heads)):
            return out
        by_stage = levels[::-1]  # by_stage[i]: the decoder output at stage i's resolution
        return (out, *(head(by_stage[i + 1]) for i, head in enumerate(self.lower_heads)))


@NETWORKS.register("resenc")
def resenc(net: NetworkInput, blocks_per_stage: Sequence[int] = RESENC_M_BLOCKS) -> nn.Module:
    """nnU-Net's residual-encoder U-Net (ResEnc M blocks per stage by default)."""
    if len(blocks_per_stage) < net.num_stages:
        raise ValueError(f"resenc: blocks_per_stage {list(blocks_per_stage)} is shorter than {net.num_stages} stages")
    return ResEncUNet(net, blocks_per_stage)

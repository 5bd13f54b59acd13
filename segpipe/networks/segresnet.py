"""``segresnet``: MONAI's SegResNet (Myronenko 2018, Auto3DSeg's default network), deep supervision off.

It downsamples every axis by 2 per level, so each patch axis must be divisible by
``2 ** (len(blocks_down) - 1)``; the plans' kernels and strides are not used, only the first stage's
features (``init_filters``).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import SegResNet
from torch import nn

from segpipe.networks.registry import NETWORKS, NetworkInput


@NETWORKS.register("segresnet")
def segresnet(
    net: NetworkInput, blocks_down: Sequence[int] = (1, 2, 2, 4), blocks_up: Sequence[int] = (1, 1, 1)
) -> nn.Module:
    divisor = 2 ** (len(blocks_down) - 1)
    if any(p % divisor for p in net.patch):
        raise ValueError(f"segresnet needs every patch axis divisible by {divisor}; the plans' patch is {net.patch}")
    return SegResNet(
        spatial_dims=net.spatial_dims,
        init_filters=net.features[0],
        in_channels=net.in_channels,
        out_channels=net.out_channels,
        blocks_down=tuple(blocks_down),
        blocks_up=tuple(blocks_up),
        norm=("INSTANCE", {"affine": True}),
    )

"""The network registry: one builder function per architecture, chosen by name in the plans.

A builder takes a :class:`NetworkInput` (the plans' topology for the axes the network sees: 2 or 3)
and returns an ``nn.Module`` mapping ``(B, in_channels, *spatial)`` to ``(B, out_channels, *spatial)``
logits, or in training with deep supervision a tuple of logits, full resolution first, each head at
its own resolution. Adding a network is one function and ``@NETWORKS.register("name")``; outside
packages can add one through the ``segpipe.networks`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from segpipe.core.registry import Registry


@dataclass(frozen=True)
class NetworkInput:
    """What every builder gets: channels, the U-Net topology per stage (kernels, strides, features) for
    the network's own axes, and whether to return deep-supervision heads in training."""

    spatial_dims: int
    in_channels: int
    out_channels: int
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    features: list[int]
    deep_supervision: bool
    patch: list[int]  # the training patch on the network's axes

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def num_lower_heads(self) -> int:
        """Decoder levels below full resolution that get a head: all but the lowest, whose weight nnU-Net
        sets to 0 (``_build_loss``); none without deep supervision."""
        return max(self.num_stages - 3, 0) if self.deep_supervision else 0


NetworkBuilder = Callable[..., nn.Module]
NETWORKS: Registry[NetworkBuilder] = Registry("network", entry_point_group="segpipe.networks")

"""The bridge from plans to a model: the registered network a configuration names, for its topology.

``build_network`` is the one bridge between plans and the model; the models themselves know nothing
about plans (:mod:`segpipe.networks.registry` lists what is registered: ``dynunet``, the default,
``resenc``, ``segresnet``). Input channels are the image channels plus ``extra_in_channels`` (the cascade's one-hot
previous-stage segmentation), so the cascade needs no other network code. A 2d configuration gets a
2D network inside :class:`SliceNetwork`, which takes and returns 3D tensors like every other model, so
sampling, loss, sliding windows and mirroring need no 2d code path.
"""

from __future__ import annotations

import torch
from torch import nn

from segpipe.networks import dynunet, segresnet  # noqa: F401 - registers the built-in networks
from segpipe.networks.registry import NETWORKS, NetworkInput
from segpipe.planning.plans import Configuration


class SliceNetwork(nn.Module):
    """A 2D network applied to every slice of a 3D tensor along ``axis`` (0, 1 or 2 of X, Y, Z).

    ``(B, C, X, Y, Z)`` in; the slices along ``axis`` are folded into the batch, so a patch of one slice
    (nnU-Net's 2d patch) and a stack of slices both work. Output ``(B, C', X, Y, Z)``, or with deep
    supervision a tuple of such heads, as the 3D network returns.
    """

    def __init__(self, net: nn.Module, axis: int):
        super().__init__()
        self.net = net
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        b, c = x.shape[:2]
        moved = x.movedim(2 + self.axis, 1)  # (B, S, C, a, b)
        s = moved.shape[1]
        out = self.net(moved.reshape(b * s, c, *moved.shape[3:]))  # (B*S, C', a, b), or a tuple of heads

        def unfold(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, s, *t.shape[1:]).movedim(1, 2 + self.axis)

        return tuple(unfold(t) for t in out) if isinstance(out, tuple) else unfold(out)


def build_network(
    config: Configuration,
    in_channels: int,
    num_classes: int,
    deep_supervision: bool = True,
    extra_in_channels: int = 0,
) -> nn.Module:
    """The registered network ``config.network`` names, built for the configuration's topology.

    Input channels are the image channels plus ``extra_in_channels`` (the cascade's one-hot stage-1
    channels). In training with deep supervision the output is a tuple: the full-resolution logits
    ``(B, C, X, Y, Z)`` first, then every decoder level but the lowest at its own size (nnU-Net's
    ``_build_loss`` gives the lowest weight 0, so it is not built); in eval mode ``(B, C, X, Y, Z)``.
    A 2d configuration (``slice_axis`` set) gets the 2D network inside a :class:`SliceNetwork`.
    """
    topo = config.topology
    kernels, strides = topo.kernel_sizes, topo.strides
    if config.is_2d:  # drop the sliced axis: a 2D network on the other two
        kernels = [[k for a, k in enumerate(ks) if a != config.slice_axis] for ks in kernels]
        strides = [[k for a, k in enumerate(ks) if a != config.slice_axis] for ks in strides]
    spec = NetworkInput(
        spatial_dims=2 if config.is_2d else 3,
        in_channels=in_channels + extra_in_channels,
        out_channels=num_classes,
        kernel_sizes=kernels,
        strides=strides,
        features=topo.features,
        deep_supervision=deep_supervision,
        patch=[p for a, p in enumerate(config.patch_size) if a != config.slice_axis],
    )
    try:
        net = NETWORKS.get(config.network.name)(spec, **config.network.kwargs)
    except TypeError as exc:  # an argument the builder does not take
        raise ValueError(f"network {config.network.name!r}: {exc}") from exc
    return SliceNetwork(net, config.slice_axis) if config.is_2d else net


def deep_supervision_weights(num_heads: int) -> torch.Tensor:
    """Loss weights halving per decoder level, normalized to sum 1 (full resolution first)."""
    w = torch.tensor([0.5**i for i in range(num_heads)])
    return w / w.sum()

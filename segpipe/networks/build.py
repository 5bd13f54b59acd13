"""The network: MONAI's DynUNet built from a plan's topology.

``build_network`` is the one bridge between plans and the model; the model itself knows nothing
about plans. Input channels are the image channels plus ``extra_in_channels`` (the cascade's one-hot
previous-stage segmentation), so the cascade needs no other network code. A 2d configuration gets a
2D DynUNet inside :class:`SliceNetwork`, which takes and returns 3D tensors like every other model, so
sampling, loss, sliding windows and mirroring need no 2d code path.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet
from torch import nn

from segpipe.planning.plans import Configuration


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
    """A U-Net with per-stage kernels/strides/features from ``config.topology``.

    Instance norm (affine), leaky ReLU (0.01), two convolutions per stage as nnU-Net. In training
    mode with deep supervision the output is a tuple: the full-resolution logits ``(B, C, X, Y, Z)``
    first, then every decoder level but the lowest at its own size (nnU-Net's ``_build_loss`` gives
    that lowest level weight 0, so it is not built); in eval mode ``(B, C, X, Y, Z)``.
    A 2d configuration (``slice_axis`` set) gives a 2D DynUNet in a :class:`SliceNetwork`.
    """
    topo = config.topology
    # decoder levels below full resolution: num_stages - 2; the lowest of them has weight 0 in nnU-Net
    num_ds = topo.num_stages - 3 if deep_supervision else 0
    kernels, strides = topo.kernel_sizes, topo.strides
    if config.is_2d:  # drop the sliced axis: a 2D network on the other two
        kernels = [[k for a, k in enumerate(ks) if a != config.slice_axis] for ks in kernels]
        strides = [[k for a, k in enumerate(ks) if a != config.slice_axis] for ks in strides]
    net = NativeHeadsDynUNet(
        spatial_dims=2 if config.is_2d else 3,
        in_channels=in_channels + extra_in_channels,
        out_channels=num_classes,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=topo.features,
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=num_ds > 0,
        deep_supr_num=max(1, num_ds),
        res_block=False,
    )
    return SliceNetwork(net, config.slice_axis) if config.is_2d else net


def deep_supervision_weights(num_heads: int) -> torch.Tensor:
    """Loss weights halving per decoder level, normalized to sum 1 (full resolution first)."""
    w = torch.tensor([0.5**i for i in range(num_heads)])
    return w / w.sum()

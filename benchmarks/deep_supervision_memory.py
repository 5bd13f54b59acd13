"""Peak memory and time of one training step: deep-supervision heads upsampled to full size (MONAI's
DynUNet, segpipe before) vs heads at their own resolution with downsampled targets (nnU-Net, segpipe now).

    python benchmarks/deep_supervision_memory.py [--patch 40,56,40] [--batch 2] [--classes 3]
                                                 [--features 16,32,64,128] [--steps 5]

Each variant runs in its own fresh process (so peak RSS is its own): the same DynUNet, the same Dice +
CE per head with nnU-Net's weights; "upsampled" computes the loss of full-size heads against the
full-size target, "native" of each head at its size against the target downsampled (nearest-exact).
Prints one JSON line per variant: peak RSS (MB) of the process, seconds per step (after one warm-up).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(args: argparse.Namespace) -> dict:
    import torch
    from monai.networks.nets import DynUNet

    from segpipe.networks.build import deep_supervision_weights
    from segpipe.networks.dynunet import NativeHeadsDynUNet
    from segpipe.training.losses import DiceCE, downsample_target

    torch.manual_seed(0)
    features = [int(f) for f in args.features.split(",")]
    patch = [int(p) for p in args.patch.split(",")]
    stages = len(features)
    kwargs = dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=args.classes,
        kernel_size=[[3, 3, 3]] * stages,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (stages - 1),
        upsample_kernel_size=[[2, 2, 2]] * (stages - 1),
        filters=features,
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=True,
        deep_supr_num=stages - 3,  # the same heads in both variants
        res_block=False,
    )
    net = (NativeHeadsDynUNet if args.variant == "native" else DynUNet)(**kwargs).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    loss_fn = DiceCE(batch_dice=False)
    x = torch.randn(args.batch, 1, *patch)
    y = torch.randint(0, args.classes, (args.batch, 1, *patch))

    def step() -> None:
        out = net(x)
        heads = out if isinstance(out, tuple) else out.unbind(1)  # MONAI: (B, H, C, ...) at full size
        weights = deep_supervision_weights(len(heads))
        loss = sum(float(w) * loss_fn(h, downsample_target(y, h.shape[2:])) for w, h in zip(weights, heads))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": args.variant, "peak_rss_mb": round(peak_mb, 1), "s_per_step": round(seconds, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", default="40,56,40")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--features", default="16,32,64,128")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant", choices=["upsampled", "native"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)), flush=True)
        return
    common = {k: v for k, v in vars(args).items() if k != "variant"}
    for variant in ("upsampled", "native"):
        argv = [sys.executable, __file__, "--variant", variant, *[f"--{k}={v}" for k, v in common.items()]]
        record = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(json.dumps({"benchmark": "deep_supervision_memory", **common, **record}), flush=True)


if __name__ == "__main__":
    main()

"""One window batch through every segpipe backend and precision: seconds, FLOPs, share of the CPU's peak.

    python benchmarks/window_batch.py --plans WORK/plans.json [--config 3d_fullres] [--windows 1]
                                      [--repeats 7] [--peak-gflops-fp32 X --peak-gflops-bf16 Y]

The network of the plans (random weights: they do not change the time) on a batch of ``--windows``
windows in all 8 mirrorings, the batch ``segpipe predict`` sends. FLOPs are counted by
``torch.utils.flop_counter`` (convolutions and transposed convolutions, 2 per multiply-add; norms and
activations are not counted). The peak is cores x clock (``cpu MHz`` of /proc/cpuinfo) x FLOPs per
cycle and core: 64 in fp32 (two AVX-512 FMA units), 128 in bf16 with AVX512-BF16, 1024 with AMX; pass
the ``--peak-gflops-*`` options where those assumptions do not hold. A share above 1 means the backend
does fewer multiplications than a direct convolution (OpenVINO's CPU plugin has Winograd kernels) or
the clock runs above the listed MHz: the count is the direct convolution's. One JSON line per pair.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpipe.inference.backend_choice import time_runner  # noqa: E402
from segpipe.inference.backends import NetworkSource, Precision, build_runner, cpu_flags  # noqa: E402
from segpipe.networks.build import build_network  # noqa: E402
from segpipe.planning.plans import load_plans  # noqa: E402

PAIRS = [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"), ("onnxruntime", "fp32")]


def cpu_ghz() -> float:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1000
    return float("nan")


def peak_gflops(precision: str, flags: set[str]) -> float:
    """The assumed peak of this machine (all threads torch uses) in ``precision``."""
    per_cycle = 64 if precision == "fp32" else (1024 if "amx_bf16" in flags else 128 if "avx512_bf16" in flags else 64)
    return torch.get_num_threads() * cpu_ghz() * per_cycle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=Path, required=True)
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--windows", type=int, default=1, help="Windows per batch (x 8 mirrorings).")
    parser.add_argument("--repeats", type=int, default=7, help="Timed runs (best of), after one warm-up.")
    parser.add_argument("--peak-gflops-fp32", type=float, default=None)
    parser.add_argument("--peak-gflops-bf16", type=float, default=None)
    args = parser.parse_args()

    plans = load_plans(args.plans)
    config = plans.configuration(args.config)
    torch.manual_seed(0)
    net = build_network(config, len(plans.channel_names), plans.num_classes, deep_supervision=False).eval()
    window = (len(plans.channel_names), *config.patch_size)
    x = torch.randn(args.windows * 8, *window)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        reference = torch.softmax(net(x), 1)
    flops = counter.get_total_flops()
    flags = cpu_flags()
    peaks = {"fp32": args.peak_gflops_fp32, "bf16": args.peak_gflops_bf16}
    for backend, precision in PAIRS:
        runner = build_runner(backend, NetworkSource(window, module=net), Precision(precision, ""), torch.device("cpu"))
        seconds = time_runner(runner, x, args.repeats)
        probs = torch.softmax(runner(x), 1)
        gflops = flops / seconds / 1e9
        peak = peaks[precision] or peak_gflops(precision, flags)
        record = {
            "backend": backend,
            "precision": precision,
            "batch": tuple(x.shape),
            "features": config.topology.features,
            "seconds": round(seconds, 4),
            "gflop": round(flops / 1e9, 2),
            "gflops_per_s": round(gflops, 1),
            "peak_gflops_per_s": round(peak, 1),
            "share_of_peak": round(gflops / peak, 3),
            "argmax_agreement_with_torch_fp32": round(
                (probs.argmax(1) == reference.argmax(1)).float().mean().item(), 4
            ),
            "max_prob_diff_vs_torch_fp32": round((probs - reference).abs().max().item(), 5),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()

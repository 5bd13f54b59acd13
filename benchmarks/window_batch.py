"""One window batch through every segpipe backend and precision: seconds, FLOPs, share of the CPU's peak.

    python benchmarks/window_batch.py --plans WORK/plans.json [--config 3d_fullres] [--windows 1]
                                      [--repeats 7] [--peak-gflops-fp32 X --peak-gflops-bf16 Y]

The network of the plans (random weights: they do not change the time) on a batch of ``--windows``
windows in all 8 mirrorings, the batch ``segpipe predict`` sends. FLOPs are counted by
``torch.utils.flop_counter`` (convolutions and transposed convolutions, 2 per multiply-add; norms and
activations are not counted), and per core and cycle at the listed clock (``cpu MHz`` of /proc/cpuinfo,
which a boosting core exceeds). The assumed peak per core and cycle: Intel AVX-512 64 FLOP in fp32,
128 in bf16 with AVX512-BF16, 1024 with AMX; AMD (Zen 4 issues AVX-512 as two 256-bit halves) 32 and
64; pass ``--peak-gflops-*`` where those do not hold. A share above 1 means the core runs above the
listed clock, or the backend does fewer multiplications than a direct convolution (OpenVINO's CPU
plugin has Winograd kernels): the count is the direct convolution's. One JSON line per pair.
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

from segpipe.inference.backend_choice import cpu_model, time_runner  # noqa: E402
from segpipe.inference.backends import NetworkSource, Precision, build_runner, cpu_flags  # noqa: E402
from segpipe.networks.build import build_network  # noqa: E402
from segpipe.planning.plans import load_plans  # noqa: E402

PAIRS = [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"), ("onnxruntime", "fp32")]


def cpu_ghz() -> float:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1000
    return float("nan")


def peak_flop_per_cycle(precision: str, flags: set[str], amd: bool) -> int:
    """The assumed peak FLOP per core and cycle in ``precision`` (see the module docstring)."""
    fp32 = 32 if amd else 64
    if precision == "fp32":
        return fp32
    return 1024 if "amx_bf16" in flags else 2 * fp32 if "avx512_bf16" in flags else fp32


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
        core_ghz = torch.get_num_threads() * cpu_ghz()
        peak = peaks[precision] or core_ghz * peak_flop_per_cycle(precision, flags, "AMD" in cpu_model())
        record = {
            "backend": backend,
            "precision": precision,
            "batch": tuple(x.shape),
            "features": config.topology.features,
            "seconds": round(seconds, 4),
            "gflop": round(flops / 1e9, 2),
            "gflops_per_s": round(gflops, 1),
            "peak_gflops_per_s": round(peak, 1),
            "flop_per_core_cycle": round(gflops / core_ghz, 1),  # at the listed clock
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

"""A first check on a GPU machine: what segpipe chooses there, then the train and predict benchmarks
against nnU-Net v2 (when installed), as one table of ratios.

    python benchmarks/gpu_check.py [--data ../shared/data/Task04_Hippocampus] [--no-nnunet] [--quick]

Nothing here ran on a GPU yet (none was available to the project); see the README's section "On a
GPU: what is tested and what is not". Each step's JSON records go to stdout as they come, the table
at the end; a failing step is reported and the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def device_facts() -> dict[str, object]:
    """The GPU as segpipe sees it: name, memory, compute capability and the precision it picks."""
    from segpipe.inference.predict import amp_dtype_for

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to this torch build: install a CUDA build of torch first")
    device = torch.device("cuda", 0)
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu": props.name,
        "memory_gb": round(props.total_memory / 1e9, 1),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "amp_dtype": str(amp_dtype_for(device)),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
    }


def benchmark(which: str, data: Path, against: bool, quick: bool) -> list[dict]:
    """``benchmarks/run.py --which WHICH --device cuda``'s records (empty on failure, reported)."""
    cmd = [sys.executable, str(HERE / "run.py"), "--which", which, "--device", "cuda"]
    cmd += ["--quick"] if quick else ["--data", str(data)] + (["--against", "nnunet"] if against else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{which}: failed ({proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
        return []
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for record in records:
        print(json.dumps(record), flush=True)
    return records


def table(records: list[dict]) -> str:
    rows = ["| benchmark | stage | segpipe s | nnU-Net s | ratio (segpipe / nnU-Net) |", "|---|---|---:|---:|---:|"]
    for r in records:
        theirs = "n/a" if r.get("nnunet_s") is None else f"{r['nnunet_s']:.3f}"
        ratio = "n/a" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        rows.append(f"| {r['benchmark']} | {r['stage']} | {r['segpipe_s']:.3f} | {theirs} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "Task04_Hippocampus")
    parser.add_argument("--no-nnunet", action="store_true", help="segpipe only (nnU-Net not installed)")
    parser.add_argument("--quick", action="store_true", help="tiny synthetic data, segpipe only (a smoke test)")
    args = parser.parse_args()
    print(json.dumps(device_facts()), flush=True)
    records = []
    for which in ("train", "predict"):
        records += benchmark(which, args.data, not args.no_nnunet, args.quick)
    print(table(records))


if __name__ == "__main__":
    main()

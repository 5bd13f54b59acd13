"""Smoke tests for benchmarks/run.py: each quick benchmark prints well-formed JSON lines (no nnU-Net)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = {
    "benchmark",
    "stage",
    "segpipe_s",
    "nnunet_s",
    "ratio",
    "workers",
    "cases",
    "host",
    "segpipe_peak_rss_mb",
    "nnunet_peak_rss_mb",
}


def run_benchmark(*args: str) -> list[dict]:
    """The JSON records that ``benchmarks/run.py ARGS`` prints; fails the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


def assert_segpipe_only(record: dict) -> None:
    """Common keys present, segpipe's values positive, every nnU-Net value null."""
    assert KEYS <= record.keys()
    assert record["segpipe_s"] > 0
    assert record["segpipe_peak_rss_mb"] > 0
    assert record["workers"] == 1
    for key in [k for k in record if k.startswith("nnunet_")] + ["ratio"]:
        assert record[key] is None, key


def test_quick_preprocess_benchmark_prints_json_lines() -> None:
    records = run_benchmark("--which", "preprocess", "--quick", "--workers", "1")
    assert [r["stage"] for r in records] == ["preprocess", "plan", "total"]
    for record in records:
        assert_segpipe_only(record)
        assert record["benchmark"] == "preprocess"
        assert record["cases"] == 4
    total = records[2]["segpipe_s"]
    assert abs(total - records[0]["segpipe_s"] - records[1]["segpipe_s"]) < 0.01


def test_quick_train_benchmark_prints_iterations_per_second() -> None:
    (record,) = run_benchmark("--which", "train", "--quick", "--workers", "1", "--device", "cpu", "--iters", "2")
    assert_segpipe_only(record)
    assert (record["benchmark"], record["stage"]) == ("train", "iterations_per_second")
    assert {"segpipe_it_s", "nnunet_it_s", "warmup_iters", "iters", "device", "segpipe_setup"} <= record.keys()
    assert (record["iters"], record["device"]) == (2, "cpu")
    assert abs(record["segpipe_it_s"] * record["segpipe_s"] - 1) < 0.01  # it/s and s/it agree
    setup = record["segpipe_setup"]
    assert setup["batch"] >= 2 and len(setup["patch"]) == 3 and setup["workers"] == 1


def test_quick_predict_benchmark_prints_seconds_per_case() -> None:
    args = ["--backend", "torch,openvino,onnxruntime", "--precision", "fp32,bf16"]
    records = run_benchmark("--which", "predict", "--quick", "--workers", "1", "--device", "cpu", *args)
    # one record per backend and precision, but ONNX Runtime in bf16 (it has no bf16 kernels)
    pairs = [(r["backend"], r["precision"]) for r in records]
    assert pairs == [
        ("torch", "fp32"),
        ("torch", "bf16"),
        ("openvino", "fp32"),
        ("openvino", "bf16"),
        ("onnxruntime", "fp32"),
    ]
    for record in records:
        assert_segpipe_only(record)
        assert (record["benchmark"], record["stage"]) == ("predict", "predict")
        assert record["cases"] == 2 and record["tta"] is True
        assert abs(record["segpipe_s_per_case"] * 2 - record["segpipe_s"]) < 0.01
    assert [r["model"] for r in records[::2]] == ["WORK folder", "model folder (openvino)", "model folder (onnx)"]


def test_gpu_check_says_when_there_is_no_gpu() -> None:
    """The first-GPU-check script stops at once, saying why, on a machine without CUDA (as here)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no CUDA device visible" in result.stderr and result.stdout == ""

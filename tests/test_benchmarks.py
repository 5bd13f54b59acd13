"""Smoke test for benchmarks/run.py: the quick preprocess benchmark prints well-formed JSON lines."""

from __future__ import annotations

import json
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


def test_quick_preprocess_benchmark_prints_json_lines() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--which", "preprocess", "--quick", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["stage"] for r in records] == ["preprocess", "plan", "total"]
    for record in records:
        assert KEYS <= record.keys()
        assert record["benchmark"] == "preprocess"
        assert record["segpipe_s"] > 0
        assert record["segpipe_peak_rss_mb"] > 0
        assert record["nnunet_s"] is None
        assert record["ratio"] is None
        assert record["nnunet_peak_rss_mb"] is None
        assert record["cases"] == 4
        assert record["workers"] == 1
    total = records[2]["segpipe_s"]
    assert abs(total - records[0]["segpipe_s"] - records[1]["segpipe_s"]) < 0.01

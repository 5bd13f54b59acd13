"""The prediction manifest under torchrun: each rank writes its own shard, rank 0 folds them in."""

from __future__ import annotations

from pathlib import Path

from segpipe.core.atomic import read_json
from segpipe.inference.manifest import MANIFEST_NAME, PredictionManifest, input_identity, shard_path


def identity(folder: Path, name: str, text: str) -> list:
    path = folder / name
    path.write_text(text)
    return input_identity([str(path)])


def test_ranks_write_shards_and_rank_zero_merges_them(tmp_path: Path) -> None:
    out, src = tmp_path / "out", tmp_path / "in"
    out.mkdir()
    src.mkdir()
    earlier = PredictionManifest(out)  # a finished single-process run: cases a and b
    earlier.record("a", identity(src, "a.nii.gz", "a0"))
    earlier.record("b", identity(src, "b.nii.gz", "b0"))
    before = read_json(out / MANIFEST_NAME)

    ranks = [PredictionManifest(out, rank=r) for r in range(2)]
    ranks[0].owned, ranks[1].owned = {"a", "c"}, {"b", "d"}
    ranks[0].record("c", identity(src, "c.nii.gz", "c0"))
    ranks[1].forget("b")  # b failed this time: its old entry must go
    ranks[1].record("d", identity(src, "d.nii.gz", "d0"))
    # no rank touched the shared manifest; each shard holds only its rank's cases
    assert read_json(out / MANIFEST_NAME) == before
    assert set(read_json(shard_path(out, 0))["cases"]) == {"a", "c"}
    assert read_json(shard_path(out, 1))["cases"]["b"] is None

    ranks[0].merge_shards()
    merged = read_json(out / MANIFEST_NAME)["cases"]
    assert sorted(merged) == ["a", "c", "d"]
    assert merged["d"][0]["file"] == "d.nii.gz"
    assert not list(out.glob(".segpipe_manifest.rank*"))


def test_shards_of_a_killed_sharded_run_count_as_done(tmp_path: Path) -> None:
    out, src = tmp_path / "out", tmp_path / "in"
    out.mkdir()
    src.mkdir()
    killed = PredictionManifest(out, rank=1)
    killed.owned = {"x"}
    killed.record("x", identity(src, "x.nii.gz", "x0"))  # rank 1 finished x, then the run was killed
    again = PredictionManifest(out)  # a single-process rerun
    assert again.is_current("x", [str(src / "x.nii.gz")])
    again.record("y", identity(src, "y.nii.gz", "y0"))
    assert sorted(read_json(out / MANIFEST_NAME)["cases"]) == ["x", "y"]
    assert not shard_path(out, 1).exists()

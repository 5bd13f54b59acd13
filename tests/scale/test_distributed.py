"""Tests for several processes: DDP training and sharded prediction under torchrun (2 CPU ranks, gloo),
one fold per GPU (``--gpus``) without GPUs, and the pure helpers of ``segpipe.scale.distributed``.

The torchrun tests start real process groups on the CPU with tiny volumes and a few iterations; what
is checked is what DDP promises (different patches per rank, identical weights, the same update as
one process with the global batch) and the bookkeeping (rank 0 alone writes, every case once).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.distributed as dist
from click.testing import Result
from conftest import run_cli

from segpipe.core.atomic import read_json
from segpipe.core.errors import StageFailed
from segpipe.runs.checkpoint import FINAL, LATEST, load_checkpoint
from segpipe.scale.distributed import DistInfo, from_env, per_rank_batch, per_rank_oversample, shard
from segpipe.scale.fold_launcher import assign_folds, check_gpus, plan_jobs, run_jobs
from segpipe.training.loop import fit, setup, train_step
from segpipe.training.sampling import PatchBatches

REPO = Path(__file__).resolve().parents[2]
CONFIG = "3d_fullres"
OVERRIDES = {"epochs": 1, "iters_per_epoch": 2, "val_iters": 1, "num_workers": 0, "num_folds": 2}
STEPS = 3

requires_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def ok(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.output


def torchrun(*args: object, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` on the CPU, one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([*cmd, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def prepared_work(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared synthetic dataset planned (cpu preset: batch 2) and preprocessed. Read-only: copy it."""
    work = tmp_path_factory.mktemp("ddp_work") / "work"
    ok(run_cli("plan", synthetic_dataset, "-o", work, "--preset", "cpu", "--workers", 1))
    ok(run_cli("preprocess", synthetic_dataset, "-o", work, "--workers", 1))
    return work


def copy_work(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


# ------------------------------------------------------------------------------------------ pure helpers


def test_dist_info_from_torchrun_environment() -> None:
    assert from_env({}) == DistInfo(0, 1, 0)
    info = from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.enabled, info.is_main) == (5, 8, 1, True, False)
    with pytest.raises(ValueError, match="outside WORLD_SIZE"):
        from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_the_global_batch_splits_evenly_with_its_foreground_patches() -> None:
    assert per_rank_batch(4, DistInfo(1, 2)) == 2
    with pytest.raises(ValueError, match="batch size 2 does not split over 4 processes"):
        per_rank_batch(2, DistInfo(0, 4))
    # one process with batch B draws round(B * (1 - f)) patches anywhere, then the rest on foreground
    for batch, world in [(2, 2), (4, 2), (6, 3), (8, 4), (12, 2)]:
        local = batch // world
        fractions = [per_rank_oversample(batch, 0.33, DistInfo(r, world)) for r in range(world)]
        forced = [local - round(local * (1 - f)) for f in fractions]
        expected = [sum(1 for g in range(r * local, (r + 1) * local) if g >= round(batch * 0.67)) for r in range(world)]
        assert forced == expected, (batch, world)
    assert per_rank_oversample(2, 0.33, DistInfo()) == 0.33  # a single process keeps the planned fraction


def test_shards_cover_every_item_exactly_once() -> None:
    items = [f"case_{i}" for i in range(7)]
    shards = [shard(items, DistInfo(r, 3)) for r in range(3)]
    assert shards == [items[0::3], items[1::3], items[2::3]]
    assert Counter(sum(shards, [])) == Counter(items)
    assert shard(items, DistInfo()) == items


# ------------------------------------------------------------------------------------------ DDP training


@requires_gloo
def test_ddp_training_matches_one_process_with_the_global_batch(prepared_work: Path, tmp_path: Path) -> None:
    work = copy_work(prepared_work, tmp_path / "work")
    # single process, batch 2: the reference, and the known global batches the ranks will split
    reference = setup(work, CONFIG, 0, OVERRIDES, device="cpu")
    assert reference.train_spec.batch_size == 2  # without torchrun: the planned batch, no DDP wrapper
    assert reference.ddp is None and reference.forward_model is reference.model
    initial = {k: v.clone() for k, v in reference.model.state_dict().items()}
    batches = list(PatchBatches(reference.train_spec, STEPS, seed=7, epoch=0, augmenter=None))
    torch.save(batches, tmp_path / "batches.pt")
    single = {}
    for name, dice in [("weights_ce", False), ("weights_dice_ce", True)]:
        run = setup(work, CONFIG, 0, OVERRIDES, device="cpu")
        if not dice:
            run.loss.loss.weight_dice = 0.0
        run.model.train()
        for batch in batches:
            train_step(run, batch)
            run.state.iteration += 1
        single[name] = run.model.state_dict()

    out = tmp_path / "ranks"
    out.mkdir()
    proc = torchrun(REPO / "tests" / "ddp_train_worker.py", work, tmp_path / "batches.pt", out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["info"] == (0, 2, 0) and r1["info"] == (1, 2, 1)
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel"
    assert r0["agreed"] == r1["agreed"] == 10.0
    assert r0["summed"] == r1["summed"] == [2.0, 1.0]

    # each rank draws half of the global batch, its own patches; rank 1 the foreground third
    assert r0["batch_size"] == r1["batch_size"] == 1
    assert (r0["oversample"], r1["oversample"]) == (0.0, 1.0)
    assert r0["first_batch"].shape == r1["first_batch"].shape
    assert not torch.equal(r0["first_batch"], r1["first_batch"]), "both ranks drew the same patches"

    for name in ("weights_ce", "weights_dice_ce"):
        a, b = r0[name], r1[name]
        assert a.keys() == single[name].keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{name}: weights differ between ranks: {differ[:5]}"
        assert any(not torch.equal(a[k], initial[k]) for k in a), "the steps changed nothing"

    # cross-entropy is a mean over voxels: DDP's average of the ranks' gradients is the global gradient
    for k, w in single["weights_ce"].items():
        torch.testing.assert_close(r0["weights_ce"][k], w, rtol=1e-4, atol=1e-6, msg=k)
    # the Dice term is a batch Dice per rank: close to one process's, not equal (measured: 0.4% of the
    # update after 3 steps)
    deviation = _distance(r0["weights_dice_ce"], single["weights_dice_ce"])
    update = _distance(single["weights_dice_ce"], initial)
    assert deviation < 0.05 * update, (deviation, update)

    # segpipe train in the ranks: rank 0 alone writes, validation is shared and complete
    assert r0["cli_exit"] == r1["cli_exit"] == 0
    assert r0["writes"] == {"checkpoint": 3, "log_row": 1, "plot": 1}  # latest, best (first epoch) + final
    assert r1["writes"] == {}
    run_dir = work / CONFIG / "fold_0"
    assert (run_dir / LATEST).is_file() and (run_dir / "progress.png").is_file()
    assert load_checkpoint(run_dir / FINAL)["state"]["iteration"] == 2
    val_ids = sorted(read_json(work / "splits.json")[0]["val"])
    summary = read_json(run_dir / "validation" / "summary.json")
    assert sorted(c["case"] for c in summary["per_case"]) == val_ids
    reports = [read_json(run_dir / "validation" / f"predict.rank{r}.json") for r in range(2)]
    assert sorted(reports[0]["predicted"] + reports[1]["predicted"]) == val_ids

    # --resume under torchrun continues the run from rank 0's checkpoint
    resume = ["train", work, "--fold", 0, "--resume", "--epochs", 2, "--workers", 0, "--device", "cpu"]
    proc = torchrun(REPO / "cli.py", *resume, "--no-validation")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("fold 0: 4 iterations") == 1  # printed by rank 0 only
    final = load_checkpoint(run_dir / FINAL)
    assert final["state"]["epoch"] == 2 and final["state"]["iteration"] == 4
    assert [int(r["epoch"]) for r in _log_rows(run_dir)] == [0, 1]


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5)


def _log_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------ sharded prediction


@pytest.fixture(scope="module")
def trained_work(prepared_work: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fold 0 trained for one iteration: enough weights to predict with."""
    work = copy_work(prepared_work, tmp_path_factory.mktemp("ddp_trained") / "work")
    fit(setup(work, CONFIG, 0, {**OVERRIDES, "iters_per_epoch": 1}, device="cpu"), num_workers=0)
    return work


@requires_gloo
def test_sharded_prediction_predicts_every_case_once(
    trained_work: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    inputs, out, single = tmp_path / "in", tmp_path / "out", tmp_path / "single"
    inputs.mkdir()
    images = sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))[:5]
    for image in images:
        shutil.copy(image, inputs / image.name)
    good = sorted(p.name[: -len(".nii.gz")] for p in images)
    (inputs / "zz_broken.nii.gz").write_bytes(b"not a NIfTI file")  # sorts last: the 6th case, rank 1's
    args = ["-m", trained_work, "--folds", 0, "--device", "cpu", "--no-tta"]

    proc = torchrun(REPO / "cli.py", "predict", "-i", inputs, "-o", out, *args)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, "a failed case must fail the command\n" + output[-4000:]
    assert "zz_broken" in output

    # each rank took every second case, predicted its good ones and reported its failure
    reports = [read_json(out / f"predict.rank{r}.json") for r in range(2)]
    cases = sorted([*good, "zz_broken"])
    assert [r["cases"] for r in reports] == [cases[0::2], cases[1::2]]
    assert Counter(reports[0]["predicted"] + reports[1]["predicted"]) == Counter(good)
    assert reports[1]["failures"].keys() == {"zz_broken"}
    # rank 0 merged the failures of all ranks
    assert read_json(out / "failures.json")["failures"].keys() == {"zz_broken"}
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in good]

    # the outputs are those of one process
    shutil.copytree(inputs, tmp_path / "in_good", ignore=shutil.ignore_patterns("zz_*"))
    ok(run_cli("predict", "-i", tmp_path / "in_good", "-o", single, *args))
    for case in good:
        a = np.asarray(nib.load(str(out / f"{case}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(single / f"{case}.nii.gz")).dataobj)
        assert np.array_equal(a, b), case


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@requires_gloo
def test_two_nodes_on_one_shared_folder_predict_each_case_once_and_spare_each_others_files(
    trained_work: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    """Two torchrun groups, one per fake "node" (their own host names), one rank each, predicting into
    one shared output folder: every case once, the manifest merged from both ranks' shards, and a
    temporary file of another host left alone even though its process id is dead here."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    images = sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))[:5]
    for image in images:
        shutil.copy(image, inputs / image.name)
    dead = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    elsewhere = out / f".synth_000.nii.gz.@node-c.{dead}.abcdefgh.tmp.nii.gz"  # a third machine's writer
    ours = out / f".synth_001.nii.gz.@node-a.{dead}.abcdefgh.tmp.nii.gz"  # node-a's killed writer
    for path in (elsewhere, ours):
        path.write_bytes(b"partial")
    port = free_port()
    procs = []
    for node, host in enumerate(("node-a", "node-b")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(REPO / "cli.py"), "predict", "-i", str(inputs), "-o", str(out), "-m", str(trained_work),
               "--folds", "0", "--device", "cpu", "--no-tta"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "SEGPIPE_HOST": host}
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    cases = sorted(p.name[: -len(".nii.gz")] for p in images)
    reports = [read_json(out / f"predict.rank{r}.json") for r in range(2)]
    assert [r["cases"] for r in reports] == [cases[0::2], cases[1::2]]
    assert sorted(reports[0]["predicted"] + reports[1]["predicted"]) == cases  # each case once
    assert sorted(p.name for p in out.glob("[!.]*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
    manifest = read_json(out / ".segpipe_manifest.json")["cases"]
    assert sorted(manifest) == cases  # merged from both ranks' shards by rank 0
    assert not list(out.glob(".segpipe_manifest.rank*"))
    assert elsewhere.exists() and not ours.exists()


# ------------------------------------------------------------------------------------------ one fold per GPU


def test_folds_are_dealt_round_robin() -> None:
    assert assign_folds([0, 1, 2, 3, 4], [0, 1]) == {0: [0, 2, 4], 1: [1, 3]}
    assert assign_folds([0, 1, 2, 3, 4], [3, 1, 2, 0]) == {3: [0, 4], 1: [1], 2: [2], 0: [3]}
    assert assign_folds([2], [0, 1, 2]) == {0: [2]}  # GPUs without a fold start nothing
    with pytest.raises(ValueError, match="listed twice"):
        assign_folds([0, 1], [1, 1])


def test_gpus_are_refused_where_they_cannot_work() -> None:
    with pytest.raises(ValueError, match="needs CUDA GPUs, but torch sees none"):
        check_gpus([0, 1], 0, "auto", False)
    with pytest.raises(ValueError, match="no GPU 2"):
        check_gpus([0, 2], 2, "auto", False)
    with pytest.raises(ValueError, match="without torchrun"):
        check_gpus([0], 1, "auto", True)
    with pytest.raises(ValueError, match="--device cpu"):
        check_gpus([0], 1, "cpu", False)
    check_gpus([0, 1], 2, "cuda", False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_train_with_gpus_on_a_cpu_machine_says_why_not(prepared_work: Path) -> None:
    result = run_cli("train", prepared_work, "--fold", "all", "--gpus", "0,1", "--no-validation")
    assert result.exit_code == 1
    assert "--gpus needs CUDA GPUs, but torch sees none" in result.output


def test_train_with_gpus_starts_one_process_per_gpu(
    prepared_work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI wiring with two pretend GPUs: the children's commands, not their training."""
    import segpipe.scale.fold_launcher as launcher

    started: list = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(launcher, "run_jobs", lambda jobs, echo: started.extend(jobs))
    work = copy_work(prepared_work, tmp_path / "work")
    ok(run_cli("train", work, "--fold", "all", "--gpus", "0,1", "--epochs", 3, "--no-swa", "--resume"))
    assert [(j.gpu, j.folds) for j in started] == [(0, [0, 2, 4]), (1, [1, 3])]  # cpu preset: 5 folds
    for job in started:
        command = job.command
        assert command[:3] == [sys.executable, str(REPO / "cli.py"), "train"]
        assert command[3] == str(work)
        assert "--gpus" not in command
        assert command.count("--fold") == 1 and command[-2:] == ["--fold", ",".join(map(str, job.folds))]
        for option in ("--epochs 3", "--no-swa", "--resume"):
            assert option in " ".join(command), (option, command)
        assert "--config" not in command and "--device" not in command  # defaults are not repeated
        assert job.log == work / CONFIG / "logs" / f"train_gpu{job.gpu}.log"


def test_fold_processes_each_see_their_gpu_and_failures_are_reported(tmp_path: Path) -> None:
    script = (
        "import os, sys; gpu = os.environ['CUDA_VISIBLE_DEVICES']; print('gpu', gpu, sys.argv[1:]); sys.exit(int(gpu))"
    )
    jobs = plan_jobs([sys.executable, "-c", script], [0, 1, 2], [0, 1], tmp_path / "logs")
    lines: list[str] = []
    with pytest.raises(StageFailed) as failed:
        run_jobs(jobs, echo=lines.append)
    assert failed.value.problems.keys() == {"GPU 1 (folds 1)"}
    assert "exited with 1" in failed.value.problems["GPU 1 (folds 1)"]
    assert (tmp_path / "logs" / "train_gpu0.log").read_text().strip() == "gpu 0 ['--fold', '0,2']"
    assert (tmp_path / "logs" / "train_gpu1.log").read_text().strip() == "gpu 1 ['--fold', '1']"
    assert len(lines) == 2

"""Reliability: bad inputs, interruptions, resume, reproducibility and large volumes.

Every bad input is a real broken file on disk (truncated gzip, garbage bytes, 2D/5D arrays, NaN...).
``predict`` must write every good case, nothing for a bad one, list each bad file with its problem
in ``failures.json`` and exit 1; ``plan`` and ``preprocess`` must report every broken case at once.
Interrupted stages (SIGKILL of the whole process group at random moments, then a re-run) must end
with files bit-identical to an uninterrupted run's and no temporary files. Killing and resuming
training is tested in ``test_training.py`` (``test_resume_after_kill_continues_from_checkpoint``).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import Result
from conftest import run_cli, truncate, write_nnunet_dataset

import segpipe.core.atomic
import segpipe.data.nifti
from segpipe.core.atomic import read_json, remove_stale_temporaries, write_json
from segpipe.data.dataset import CaseFiles, read_case
from segpipe.data.nifti import load_nifti, save_nifti
from segpipe.inference.manifest import MANIFEST_NAME
from segpipe.inference.predict import restore_geometry, restore_label_map
from segpipe.inference.sliding_window import choose_accumulation_device
from segpipe.planning.plans import load_plans
from segpipe.preprocessing.preprocess import PreprocessedCase, preprocess_case
from segpipe.runs.checkpoint import FINAL, load_checkpoint
from segpipe.training.loop import setup

REPO = Path(__file__).resolve().parents[1]
CONFIG = "3d_fullres"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN_ARGS = "--fold 0 --epochs 1 --iters-per-epoch 1 --val-iters 1 --num-folds 2 --workers 0 --device cpu"


def ok(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.output


def failed(result: Result) -> str:
    """The output of a CLI call that must have failed cleanly: exit 1, no traceback."""
    assert result.exit_code == 1, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result.output


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp*"))


def train_tiny(dataset: Path, work: Path) -> Path:
    """Plan (cpu preset), preprocess and train one iteration: a real but useless model."""
    ok(run_cli("plan", dataset, "-o", work, "--preset", "cpu", "--workers", 1))
    ok(run_cli("preprocess", dataset, "-o", work, "--workers", 1))
    ok(run_cli("train", work, *TRAIN_ARGS.split(), "--no-validation"))
    return work


@pytest.fixture(scope="module")
def model_work(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder with a trained (one iteration) single-channel model. Read-only."""
    return train_tiny(synthetic_dataset, tmp_path_factory.mktemp("model") / "work")


def predict(inputs: Path, out: Path, work: Path, *extra: object) -> Result:
    return run_cli("predict", "-i", inputs, "-o", out, "-m", work, "--device", "cpu", "--no-tta", *extra)


def copy_images(dataset: Path, folder: Path, cases: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(dataset / f"imagesTr/synth_{k:03d}.nii.gz", folder)) for k in cases]


def failure_entries(out: Path) -> list[str]:
    """failures.json as ``"key: message"`` lines (listing problems are keyed by file, cases by name)."""
    return [f"{k}: {v}" for k, v in read_json(out / "failures.json")["failures"].items()]


def assert_reported(entries: list[str], output: str, path: Path, phrase: str) -> None:
    hits = [e for e in entries if str(path) in e and phrase in e]
    assert hits, f"{path.name}: no failure with {phrase!r} in\n" + "\n".join(entries)
    assert str(path) in output, f"{path} not named in the command output"


# ------------------------------------------------------------------------------ predict: bad inputs


def _write(folder: Path, name: str, data: np.ndarray, affine: np.ndarray) -> Path:
    save_nifti(folder / name, data, affine, dtype=np.float32)
    return folder / name


def _nan(data: np.ndarray) -> np.ndarray:
    out = data.copy()
    out[3, 4, 5] = np.nan
    return out


def _inf(data: np.ndarray) -> np.ndarray:
    out = data.copy()
    out[3, 4, 5], out[6, 7, 8] = np.inf, -np.inf
    return out


def _truncated(folder: Path, name: str, data: np.ndarray, affine: np.ndarray) -> Path:
    path = _write(folder, name, data, affine)
    truncate(path)
    return path


def _garbage(folder: Path, name: str, data: np.ndarray, affine: np.ndarray) -> Path:
    (folder / name).write_bytes(b"this is not a NIfTI file\n" * 40)
    return folder / name


# file name -> (writer, problem phrase); each writer gets the good image of synth_000
BAD_PREDICT_INPUTS: dict[str, tuple[Callable[[Path, str, np.ndarray, np.ndarray], Path], str]] = {
    "truncated.nii.gz": (_truncated, "unreadable or truncated NIfTI"),
    "truncated_raw.nii": (_truncated, "unreadable or truncated NIfTI"),
    "garbage.nii.gz": (_garbage, "unreadable or truncated NIfTI"),
    "report.pdf": (_garbage, "not a NIfTI file"),
    "flat.nii.gz": (lambda f, n, d, a: _write(f, n, d[:, :, 10], a), "(2D); expected 3D"),
    "five_d.nii.gz": (lambda f, n, d, a: _write(f, n, np.stack([d, d], -1)[:, :, :, None, :], a), "(5D); expected 3D"),
    "three_volumes.nii.gz": (lambda f, n, d, a: _write(f, n, np.stack([d, d, d], -1), a), "(4D); expected 3D"),
    "nan.nii.gz": (lambda f, n, d, a: _write(f, n, _nan(d), a), "contains 1 NaN/Inf voxels"),
    "inf.nii.gz": (lambda f, n, d, a: _write(f, n, _inf(d), a), "contains 2 NaN/Inf voxels"),
    "twice.nii": (_write, "case name 'twice' appears 2 times"),
    "twice.nii.gz": (_write, "case name 'twice' appears 2 times"),
}


def test_predict_bad_inputs_good_cases_written_bad_listed(
    model_work: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    good = copy_images(synthetic_dataset, inputs, [1, 2])
    src = load_nifti(synthetic_dataset / "imagesTr/synth_000.nii.gz")
    bad = {
        name: (write(inputs, name, src.data, src.affine), phrase)
        for name, (write, phrase) in BAD_PREDICT_INPUTS.items()
    }

    output = failed(predict(inputs, out, model_work))
    assert f"predict: {len(bad)} problem(s)" in output
    entries = failure_entries(out)
    assert len(entries) == len(bad), "\n".join(entries)
    for path, phrase in bad.values():
        assert_reported(entries, output, path, phrase)
    # every good case written in the input's geometry; nothing for the bad ones, no temporaries
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in good] + ["failures.json", MANIFEST_NAME])
    for path in good:
        pred, image = nib.load(str(out / path.name)), nib.load(str(path))
        assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
        assert pred.get_data_dtype() == np.uint8


def test_predict_missing_channel_of_two_channel_model(synthetic_dataset: Path, tmp_path: Path) -> None:
    work = train_tiny(write_nnunet_dataset(synthetic_dataset, tmp_path / "nn2", cases=3, channels=2), tmp_path / "w")
    assert load_plans(work / "plans.json").channel_names == ["MRI", "T2"]
    inputs, out = tmp_path / "in", tmp_path / "out"
    src = load_nifti(synthetic_dataset / "imagesTr/synth_003.nii.gz")
    d, a = src.data, src.affine
    for name, data in [("A_0000", d), ("A_0001", 2 * d), ("B_0000", d), ("C_0000", d), ("C_0001", d[:, :, :-1])]:
        _write(inputs, f"{name}.nii.gz", data, a)
    _write(inputs, "D.nii.gz", np.stack([d, 2 * d], -1), a)  # MSD style: channels along a 4th axis
    _write(inputs, "E.nii.gz", np.stack([d, d, d], -1), a)

    output = failed(predict(inputs, out, work))
    entries = failure_entries(out)
    assert len(entries) == 3, "\n".join(entries)
    assert_reported(entries, output, inputs / "B_0001.nii.gz", "file not found")
    assert_reported(entries, output, inputs / "C_0001.nii.gz", "geometry differs from the case's first channel")
    assert_reported(entries, output, inputs / "E.nii.gz", "4D with 2 channels")
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["A.nii.gz", "D.nii.gz"]


def test_predict_empty_folder_and_folder_without_nifti(model_work: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    output = failed(predict(empty, tmp_path / "out", model_work))
    assert f"{empty}: no NIfTI files to predict" in output
    assert not (tmp_path / "out").exists()

    (empty / "notes.txt").write_text("hello")
    output = failed(predict(empty, tmp_path / "out", model_work))
    assert_reported(failure_entries(tmp_path / "out"), output, empty / "notes.txt", "not a NIfTI file")


def test_predict_full_disk_fails_one_case_cleanly(
    model_work: Path, synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up while one case's NIfTI is being written: that case fails with the output file
    named, its half-written temporary file is removed, the other case is written; a re-run finishes."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    a, b = copy_images(synthetic_dataset, inputs, [1, 2])
    real_save = nib.save

    def save_until_full(img: nib.Nifti1Image, filename: str) -> None:
        if Path(filename).name.startswith(f".{b.name}."):
            Path(filename).write_bytes(b"\x1f\x8b partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(img, filename)

    monkeypatch.setattr(segpipe.data.nifti.nib, "save", save_until_full)
    output = failed(predict(inputs, out, model_work))
    assert_reported(failure_entries(out), output, out / b.name, "No space left on device")
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [a.name]
    assert temporaries(out) == []

    monkeypatch.setattr(segpipe.data.nifti.nib, "save", real_save)
    output = ok(predict(inputs, out, model_work))
    assert "'predicted': 1, 'skipped': 1, 'failed': 0" in output
    assert not (out / "failures.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (see the full-disk test)")
def test_predict_read_only_output_folder(model_work: Path, synthetic_dataset: Path, tmp_path: Path) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    copy_images(synthetic_dataset, inputs, [1])
    out.mkdir()
    out.chmod(0o555)
    try:
        output = failed(predict(inputs, out, model_work))
    finally:
        out.chmod(0o755)
    assert "Permission denied" in output
    assert f"{out / 'synth_001.nii.gz'}: " in output
    assert f"{out / 'failures.json'}: could not be written" in output
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------ plan and preprocess: all at once


def _break_cases(root: Path) -> list[tuple[Path, str]]:
    """Break four cases of an MSD copy for real, one of them twice; return (file, phrase) expected."""
    img = root.resolve() / "imagesTr"
    lab = root.resolve() / "labelsTr"
    truncate(img / "synth_001.nii.gz")
    src = load_nifti(img / "synth_002.nii.gz")
    save_nifti(img / "synth_002.nii.gz", _nan(src.data), src.affine, dtype=np.float32)
    label = load_nifti(lab / "synth_003.nii.gz", dtype=np.uint8)
    save_nifti(lab / "synth_003.nii.gz", label.data[:-1], label.affine, dtype=np.uint8)
    src = load_nifti(img / "synth_004.nii.gz")
    save_nifti(img / "synth_004.nii.gz", _inf(src.data), src.affine, dtype=np.float32)
    label = load_nifti(lab / "synth_004.nii.gz", dtype=np.uint8)
    data = label.data.copy()
    data[0, 0, 0] = 9
    save_nifti(lab / "synth_004.nii.gz", data, label.affine, dtype=np.uint8)
    return [
        (img / "synth_001.nii.gz", "unreadable or truncated NIfTI"),
        (img / "synth_002.nii.gz", "contains 1 NaN/Inf voxels"),
        (lab / "synth_003.nii.gz", "differs from image shape"),
        (img / "synth_004.nii.gz", "contains 2 NaN/Inf voxels"),
        (lab / "synth_004.nii.gz", "label values [9] are not declared"),
    ]


def _assert_lists(output: str, expected: list[tuple[Path, str]]) -> None:
    for path, phrase in expected:
        assert any(str(path) in line and phrase in line for line in output.splitlines()), (path, phrase, output)


def test_plan_reports_every_broken_case(msd_copy: Path, tmp_path: Path) -> None:
    expected = _break_cases(msd_copy)
    output = failed(run_cli("plan", msd_copy, "-o", tmp_path / "work", "--preset", "cpu", "--workers", 1))
    assert "plan: 4 problem(s)" in output  # four cases, five files
    _assert_lists(output, expected)
    assert not (tmp_path / "work" / "plans.json").exists()


def test_preprocess_reports_every_broken_case(msd_copy: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    ok(run_cli("plan", msd_copy, "-o", work, "--preset", "cpu", "--workers", 1))
    expected = _break_cases(msd_copy)
    output = failed(run_cli("preprocess", msd_copy, "-o", work, "--workers", 1))
    assert "preprocess: 4 problem(s)" in output
    _assert_lists(output, expected)
    folder = work / "preprocessed" / CONFIG
    assert sorted(p.stem for p in folder.glob("*.json")) == ["synth_000", "synth_005"]
    assert temporaries(folder) == []


def test_preprocess_full_disk_names_the_file(
    synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    ok(run_cli("plan", synthetic_dataset, "-o", work, "--preset", "cpu", "--workers", 1))
    real_save = np.save

    def save_until_full(fh: object, array: np.ndarray) -> None:
        if ".synth_003.npy." in str(getattr(fh, "name", "")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(fh, array)

    monkeypatch.setattr(segpipe.core.atomic.np, "save", save_until_full)
    output = failed(run_cli("preprocess", synthetic_dataset, "-o", work, "--workers", 1))
    folder = work / "preprocessed" / CONFIG
    assert f"synth_003: [Errno 28] No space left on device: '{folder / 'synth_003.npy'}'" in output
    assert len(list(folder.glob("*.json"))) == 5 and not (folder / "synth_003.npy").exists()
    assert temporaries(folder) == []


# ---------------------------------------------------------------------------------- predict: resume


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}


def test_predict_resume_redoes_only_missing_or_changed_cases(
    model_work: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    a, b, c = copy_images(synthetic_dataset, inputs, [1, 2, 3])
    assert "'predicted': 3, 'skipped': 0" in ok(predict(inputs, out, model_work))
    first = _mtimes(out)
    assert "'predicted': 0, 'skipped': 3" in ok(predict(inputs, out, model_work))

    # touched, same content: kept (the hash matches)
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))
    # rewritten with other content: redone
    other = load_nifti(synthetic_dataset / "imagesTr/synth_004.nii.gz")
    save_nifti(b, other.data, other.affine, dtype=np.float32)
    assert "'predicted': 1, 'skipped': 2" in ok(predict(inputs, out, model_work))
    now = _mtimes(out)
    assert now[a.name] == first[a.name] and now[c.name] == first[c.name]
    assert now[b.name] != first[b.name]
    assert nib.load(str(out / b.name)).shape == other.data.shape

    # an output without a manifest entry (a run killed between the two renames) is redone
    manifest = read_json(out / MANIFEST_NAME)
    del manifest["cases"]["synth_003"]
    write_json(out / MANIFEST_NAME, manifest)
    assert "'predicted': 1, 'skipped': 2" in ok(predict(inputs, out, model_work))
    assert _mtimes(out)[c.name] != first[c.name]


# ---------------------------------------------------------------------------- interruptions (SIGKILL)


def _cli(*args: object) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), *[str(a) for a in args]]


def _popen(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("a") as fh:  # its own process group: preprocessing workers die with it
        return subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _entries(folder: Path) -> int:
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def _written_since(folder: Path, start_ns: int) -> bool:
    """A file of ``folder`` changed since ``start_ns``; a temporary renamed away meanwhile is skipped
    (the listing and the stat race against the running stage)."""
    if not folder.is_dir():
        return False
    for path in folder.iterdir():
        try:
            if path.stat().st_mtime_ns >= start_ns:
                return True
        except FileNotFoundError:
            continue
    return False


def _run(cmd: list[str], folder: Path, log: Path) -> tuple[float, float]:
    """Run ``cmd`` to completion; return when it wrote the first and the last new entry of ``folder``
    (seconds from its start): the window in which it writes there."""
    start, start_ns = time.monotonic(), time.time_ns()
    proc = _popen(cmd, log)
    first = last = None
    seen = _entries(folder)
    while proc.poll() is None:
        if first is None and _written_since(folder, start_ns):
            first = time.monotonic() - start
        if _entries(folder) != seen:
            seen, last = _entries(folder), time.monotonic() - start
        time.sleep(0.005)
    assert proc.returncode == 0, log.read_text()[-3000:]
    end = time.monotonic() - start
    return (first if first is not None else end), (last if last is not None else end)


def _kill_repeatedly(
    cmd: list[str], folder: Path, window: tuple[float, float], count: Callable[[], int], seed: int, log: Path
) -> list[tuple[float, int, int]]:
    """Start ``cmd`` up to 3 times and SIGKILL its process group at a random moment: the first time
    anywhere before the clean run's last write (startup included), then while it writes into
    ``folder`` (from its first write on, as long as the clean run wrote). Return, per kill, (seconds,
    complete outputs, temporary files) left."""
    rng = random.Random(seed)
    first_write, last_write = window
    kills = []
    for attempt in range(3):
        start, start_ns = time.monotonic(), time.time_ns()
        proc = _popen(cmd, log)
        try:
            if attempt == 0:
                delay = rng.uniform(0, last_write)
            else:
                while proc.poll() is None and not _written_since(folder, start_ns):
                    time.sleep(0.005)
                delay = time.monotonic() - start + rng.uniform(0, last_write - first_write)
            try:
                proc.wait(timeout=max(delay - (time.monotonic() - start), 0.001))
                break  # finished before the kill
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills.append((round(delay, 2), count(), len(temporaries(folder))))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return kills


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_interrupted_mid_write(kills: list[tuple[float, int, int]], cases: int) -> None:
    print("kills (seconds, complete outputs, temporaries):", kills)
    assert kills, "no run was interrupted"
    assert any(0 < done < cases or tmp for _, done, tmp in kills), f"no kill landed while writing: {kills}"


def test_preprocess_killed_at_random_moments_ends_bit_identical(tmp_path: Path) -> None:
    data = tmp_path / "ds"
    ok(run_cli("synth", data, "--cases", 10, "--shape", "96,96,64", "--seed", 5))
    clean, killed, log = tmp_path / "clean", tmp_path / "killed", tmp_path / "log.txt"
    args = ("--preset", "cpu", "--workers", 2)
    folder = killed / "preprocessed" / CONFIG
    window = _run(_cli("preprocess", data, "-o", clean, *args), clean / "preprocessed" / CONFIG, log)
    cmd = _cli("preprocess", data, "-o", killed, *args)
    kills = _kill_repeatedly(cmd, folder, window, lambda: len(list(folder.glob("*.json"))), 11, log)
    _assert_interrupted_mid_write(kills, 10)
    _run(cmd, folder, log)

    expected, got = _files(clean), _files(killed)
    assert sorted(got) == sorted(expected)  # same files, no temporaries left
    assert [name for name in expected if got[name] != expected[name]] == []
    assert len([n for n in expected if n.endswith("_fg.npz")]) == 10


def test_predict_killed_at_random_moments_ends_bit_identical(
    model_work: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    copy_images(synthetic_dataset, inputs, list(range(6)))
    clean, killed, log = tmp_path / "clean", tmp_path / "killed", tmp_path / "log.txt"
    args = ("-m", model_work, "--device", "cpu", "--no-tta", "--save-probabilities")
    window = _run(_cli("predict", "-i", inputs, "-o", clean, *args), clean, log)
    cmd = _cli("predict", "-i", inputs, "-o", killed, *args)
    kills = _kill_repeatedly(cmd, killed, window, lambda: len(list(killed.glob("*.nii.gz"))), 3, log)
    _assert_interrupted_mid_write(kills, 6)
    _run(cmd, killed, log)

    expected, got = _files(clean), _files(killed)
    assert sorted(got) == sorted(expected)  # same files, no temporaries left
    assert len([n for n in expected if n.endswith(".nii.gz")]) == 6
    different = [n for n in expected if n != MANIFEST_NAME and got[n] != expected[n]]
    assert different == []
    assert read_json(killed / MANIFEST_NAME) == read_json(clean / MANIFEST_NAME)


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    stale = tmp_path / f".case.nii.gz.{dead}.abcd_123.tmp.nii.gz"
    mine = tmp_path / f".plans.json.{os.getpid()}.zzzzzzzz.tmp"
    keep = tmp_path / ".hidden.1.txt"
    for p in (stale, mine, keep):
        p.write_text("x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, keep.name])


def test_temporaries_of_other_hosts_are_never_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder shared by two machines: a process id means nothing on the other one, so only this host's
    dead writers' files go, whatever another host's file is called."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    monkeypatch.setenv(segpipe.core.atomic.HOST_ENV, "node-a.cluster")
    assert segpipe.core.atomic.host_name() == "node-a-cluster"
    ours_stale = tmp_path / f".case.nii.gz.@node-a-cluster.{dead}.abcd_123.tmp.nii.gz"
    ours_live = tmp_path / f".x.json.@node-a-cluster.{os.getpid()}.abcdefgh.tmp"
    theirs = tmp_path / f".case.nii.gz.@node-b.{dead}.abcd_123.tmp.nii.gz"  # dead here, maybe alive there
    for p in (ours_stale, ours_live, theirs):
        p.write_text("x")
    assert remove_stale_temporaries(tmp_path) == [ours_stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ours_live.name, theirs.name])
    # what atomic_path writes carries the host name, so the other host's sweep spares it
    with segpipe.core.atomic.atomic_path(tmp_path / "y.json") as tmp:
        assert tmp.name.startswith(".y.json.@node-a-cluster.")
        monkeypatch.setenv(segpipe.core.atomic.HOST_ENV, "node-b")
        assert remove_stale_temporaries(tmp_path) == [theirs]  # node-b's own dead writer's file
        assert tmp.exists()


def test_written_files_get_default_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    write_json(tmp_path / "x.json", {"a": 1})
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------- reproducibility


def test_cli_seed_gives_identical_weights(model_work: Path, tmp_path: Path) -> None:
    """Two ``segpipe train --seed 7`` runs of two iterations in separate work folders: equal weights."""

    def without_runs(folder: str, names: list[str]) -> list[str]:
        return [CONFIG, "splits.json"] if Path(folder) == model_work else []

    weights = []
    for name in ("a", "b"):
        work = tmp_path / name
        shutil.copytree(model_work, work, ignore=without_runs)
        ok(run_cli("train", work, *TRAIN_ARGS.split(), "--iters-per-epoch", 2, "--seed", 7, "--no-validation"))
        ckpt = load_checkpoint(work / CONFIG / "fold_0" / FINAL)
        assert ckpt["settings"]["seed"] == 7 and ckpt["state"]["iteration"] == 2
        weights.append(ckpt["model"])
    a, b = weights
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # and the seed matters: another seed initialises other weights
    seven = setup(tmp_path / "a", CONFIG, 1, {"seed": 7, "num_folds": 2}, device="cpu").model.state_dict()
    eight = setup(tmp_path / "a", CONFIG, 1, {"seed": 8, "num_folds": 2}, device="cpu").model.state_dict()
    assert any(not torch.equal(seven[k], eight[k]) for k in seven)


# ---------------------------------------------------------------------------------- large volumes


def test_choose_accumulation_device() -> None:
    cpu = torch.device("cpu")
    assert choose_accumulation_device(10**12, "cpu") == cpu  # no limit on the CPU: nothing to decide
    assert choose_accumulation_device(1000, "cpu", memory_limit_bytes=1000) == cpu
    if torch.cuda.is_available():
        assert choose_accumulation_device(1000, "cuda", memory_limit_bytes=1000).type == "cuda"
        assert choose_accumulation_device(1001, "cuda", memory_limit_bytes=1000) == cpu
        assert choose_accumulation_device(10**15, "cuda") == cpu  # more than any GPU has


def test_forced_device_limit_accumulates_on_the_cpu_with_the_same_result(
    model_work: Path, synthetic_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = tmp_path / "in"
    copy_images(synthetic_dataset, inputs, [1, 2])
    with caplog.at_level(logging.WARNING, logger="segpipe"):
        ok(predict(inputs, tmp_path / "normal", model_work))
    assert not [r for r in caplog.records if "accumulating on the CPU" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="segpipe"):
        ok(predict(inputs, tmp_path / "limited", model_work, "--device-memory-limit", 0.01))
    logged = [r.getMessage() for r in caplog.records if "accumulating on the CPU" in r.getMessage()]
    assert len(logged) == 2, logged  # once per case
    assert "need 0.0" in logged[0] and "has 0.00 GB" in logged[0]
    for name in ("synth_001.nii.gz", "synth_002.nii.gz"):
        assert (tmp_path / "limited" / name).read_bytes() == (tmp_path / "normal" / name).read_bytes()


def test_device_limit_from_environment(
    model_work: Path,
    synthetic_dataset: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = tmp_path / "in"
    copy_images(synthetic_dataset, inputs, [1])
    monkeypatch.setenv("SEGPIPE_DEVICE_MEMORY_LIMIT_MB", "0.01")
    with caplog.at_level(logging.WARNING, logger="segpipe"):
        ok(predict(inputs, tmp_path / "out", model_work))
    assert any("accumulating on the CPU" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("SEGPIPE_DEVICE_MEMORY_LIMIT_MB", "lots")
    output = failed(predict(inputs, tmp_path / "out2", model_work))
    assert "SEGPIPE_DEVICE_MEMORY_LIMIT_MB='lots' is not a number of MB" in output


def _case_with_crop_and_resampling(tmp_path: Path, model_work: Path) -> PreprocessedCase:
    rng = np.random.default_rng(0)
    image = np.zeros((30, 26, 22), np.float32)
    image[4:25, 3:20, 5:21] = rng.normal(100, 10, (21, 17, 16))  # non-zero box smaller than the image
    path = _write(tmp_path, "crop.nii.gz", image, np.diag([1.3, 0.8, 1.1, 1.0]))
    plans = load_plans(model_work / "plans.json")
    case = CaseFiles("crop", [str(path)])
    return preprocess_case(read_case(case, 1), plans, plans.configuration(CONFIG), case)


def test_restore_label_map_equals_argmax_of_restored_probabilities(model_work: Path, tmp_path: Path) -> None:
    pre = _case_with_crop_and_resampling(tmp_path, model_work)
    assert pre.properties.crop_box != [[0, s] for s in pre.properties.original_shape]
    assert pre.properties.shape != [hi - lo for lo, hi in pre.properties.crop_box]  # resampled
    probs = torch.softmax(torch.randn((3, *pre.image.shape[1:]), generator=torch.Generator().manual_seed(0)), 0)
    expected = np.array([0, 5, 7])[restore_geometry(probs, pre).argmax(axis=0)]
    seg = restore_label_map(probs, pre, [5, 7])
    assert seg.dtype == np.uint8 and seg.shape == tuple(pre.properties.original_shape)
    np.testing.assert_array_equal(seg, expected)
    assert set(np.unique(seg).tolist()) == {0, 5, 7}


# A CT-like volume, large against the interpreter's own memory, predicted with --no-tta --step 1 so it
# runs in about a minute on a CPU. Peak host memory must stay below BASELINE + 6.5 x the volume's
# float32 bytes: the preprocessed image, three class sums and the weights are 5 volumes, plus slack for
# temporaries (measured: 5.8). Keeping the raw image (+1), full-size float probabilities (+3) or an
# int64 argmax (+2) during inference, as segpipe once did, exceeds it.
BIG_SHAPE = (320, 320, 250)
BIG_VOLUMES_ALLOWED = 6.5


def _peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident memory (MB) of ``cmd`` and its children, measured in a wrapper process."""
    code = (
        "import resource, subprocess, sys\n"
        "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return float(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_large_volume_peak_host_memory(model_work: Path, tmp_path: Path) -> None:
    plans = load_plans(model_work / "plans.json")
    spacing = plans.configuration(CONFIG).spacing  # no resampling: the volume is at the planned spacing
    small, big = tmp_path / "small", tmp_path / "big"
    rng = np.random.default_rng(0)
    for folder, shape in ((small, (40, 40, 30)), (big, BIG_SHAPE)):
        x, y, z = np.ogrid[tuple(slice(0, s) for s in shape)]
        body = sum(((a - s / 2) / (0.45 * s)) ** 2 for a, s in zip((x, y, z), shape)) < 1
        image = np.where(body, np.float32(40), np.float32(-1000)) + rng.normal(0, 20, shape).astype(np.float32)
        _write(folder, "ct.nii", image.astype(np.float32), np.diag([*spacing, 1.0]))
        del image, body
    args = ("-m", model_work, "--device", "cpu", "--no-tta", "--step", 1, "--batch-windows", 8)
    baseline = _peak_rss_mb(_cli("predict", "-i", small, "-o", tmp_path / "out_small", *args))
    peak = _peak_rss_mb(_cli("predict", "-i", big, "-o", tmp_path / "out_big", *args))
    volume_mb = math.prod(BIG_SHAPE) * 4 / 2**20
    assert (tmp_path / "out_big" / "ct.nii.gz").is_file()
    print(f"peak {peak:.0f} MB, baseline {baseline:.0f} MB, volume {volume_mb:.0f} MB")
    assert peak <= baseline + BIG_VOLUMES_ALLOWED * volume_mb, (peak, baseline, volume_mb)


def test_amp_dtype_follows_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 only from compute capability 8.0 (fake device properties: no GPU here), fp16 below, none on CPU."""
    import segpipe.inference.predict as predict

    for capability, expected in [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]:
        monkeypatch.setattr(predict.torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert predict.amp_dtype_for(torch.device("cuda")) == expected
    monkeypatch.setattr(predict.torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation does not count
    monkeypatch.setattr(predict.torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert predict.amp_dtype_for(torch.device("cuda")) == torch.float16
    assert predict.amp_dtype_for(torch.device("cpu")) is None


def test_verbose_prints_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    quiet = run_cli("plan", missing, "-o", tmp_path / "w")
    loud = run_cli("--verbose", "plan", missing, "-o", tmp_path / "w")
    assert quiet.exit_code == loud.exit_code == 1
    assert "Traceback" not in quiet.output and "error:" in quiet.output
    assert "Traceback (most recent call last)" in loud.output and loud.output.rstrip().endswith(quiet.output.rstrip())


def test_training_out_of_memory_names_what_to_try(
    model_work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training step that runs out of device memory (injected): one line that says what to change,
    and with --verbose the traceback too."""
    import segpipe.training.loop

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(segpipe.training.loop, "train_step", out_of_memory)
    work = tmp_path / "w"
    shutil.copytree(model_work, work, ignore=lambda folder, names: [CONFIG] if Path(folder) == model_work else [])
    quiet = run_cli("train", work, *TRAIN_ARGS.split())
    output = failed(quiet)
    assert "error: CUDA out of memory. Tried to allocate 2.00 GiB (try a preset with a smaller patch or batch" in output
    assert "--device cpu" in output and "Traceback" not in output
    loud = run_cli("--verbose", "train", work, *TRAIN_ARGS.split(), "--resume")
    assert loud.exit_code == 1 and "Traceback (most recent call last)" in loud.output

"""The cascade end to end through the CLI: 3d_lowres (all folds, out-of-fold predictions) feeding
3d_cascade_fullres; refusal while stage 1 is missing; the one-hot stage-1 channels in training batches;
two-stage prediction with the input geometry; --prev-stage reuse; the report's cascade candidates."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segpipe.augmentation.batched import augment_batch, batch_extent
from segpipe.augmentation.draw import AugmentationConfig, Augmenter
from segpipe.core.paths import WorkDir
from segpipe.data.dataset import CaseData, Dataset
from segpipe.data.nifti import load_nifti
from segpipe.data.synth import make_synthetic_dataset
from segpipe.planning.plans import CASCADE, FULLRES, LOWRES, load_plans
from segpipe.preprocessing.cascade import one_hot
from segpipe.preprocessing.preprocess import preprocess_case
from segpipe.runs.checkpoint import FINAL, load_checkpoint
from segpipe.training.sampling import PatchBatches, SamplerSpec, stack_crops
from tests.conftest import run_cli

# A memory budget so small that a 64x64x40 volume needs the cascade: the full-res patch covers < 25%.
TINY_PRESET = {
    "name": "tiny-cascade",
    "description": "test preset: the cascade on small volumes",
    "gpu_memory_gb": 0.02,
    "base_features": 8,
    "max_features": 32,
    "max_stages": 4,
    "min_batch_size": 2,
    "max_batch_size": 2,
    "training": {"iters_per_epoch": 4, "val_iters": 1, "num_workers": 0, "epochs": 2, "num_folds": 2},
}
TRAIN = ["--device", "cpu", "--no-val-tta"]


@pytest.fixture(scope="module")
def cascade_work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Synthetic data planned with a cascade and preprocessed: (dataset, work folder)."""
    root = tmp_path_factory.mktemp("cascade")
    data = make_synthetic_dataset(
        root / "data", cases=6, shape=(64, 64, 40), spacing=(1.0, 1.0, 1.5), labels=2, test_cases=2, body_fill=0.93
    )
    preset = root / "tiny.json"
    preset.write_text(json.dumps(TINY_PRESET))
    work = root / "work"
    for args in (("plan", data, "-o", work, "--preset", preset), ("preprocess", data, "-o", work, "--workers", 1)):
        result = run_cli(*args, "--workers", 1) if args[0] == "plan" else run_cli(*args)
        assert result.exit_code == 0, result.output
    return data, work


@pytest.mark.slow
def test_cascade_chain_end_to_end(cascade_work: tuple[Path, Path], tmp_path: Path) -> None:
    data, work = cascade_work
    plans = load_plans(WorkDir(work).plans)
    assert plans.configuration(CASCADE).previous_stage == LOWRES

    # stage 2 refuses while stage 1's out-of-fold predictions are missing, and says what to run
    refused = run_cli("train", work, "--config", CASCADE, "--fold", 0, *TRAIN)
    assert refused.exit_code != 0
    assert f"segpipe train {work} --config {LOWRES} --fold all" in refused.output

    for config in (LOWRES, FULLRES, CASCADE):
        result = run_cli("train", work, "--config", config, "--fold", "all", *TRAIN)
        assert result.exit_code == 0, result.output

    # stage-2 inputs: each case's out-of-fold stage-1 map, cropped and resampled as the image was
    wd = WorkDir(work)
    dataset = Dataset.from_dict(json.loads(wd.dataset.read_text()))
    splits = json.loads(wd.splits.read_text())
    cascade = plans.configuration(CASCADE)
    for fold, split in enumerate(splits):
        case_id = split["val"][0]
        oof = load_nifti(wd.run(LOWRES, fold) / "validation" / f"{case_id}.nii.gz", dtype=np.uint8)
        files = next(c for c in dataset.training if c.case_id == case_id)
        image = load_nifti(files.images[0])
        as_label = CaseData(case_id, image.data[None], oof.data, image)
        expected = preprocess_case(as_label, plans, cascade).label
        stored = np.load(wd.previous_stage(CASCADE) / f"{case_id}.npy")
        assert stored.shape == expected.shape
        assert np.array_equal(stored, expected)

    # the stage-2 network reads the image plus one channel per foreground label
    first_conv = next(v for k, v in load_checkpoint(wd.run(CASCADE, 0) / FINAL)["model"].items() if v.dim() == 5)
    assert first_conv.shape[1] == len(plans.channel_names) + len(plans.foreground_labels)

    # two-stage prediction: stage 1 (lowres fold ensemble) then stage 2; outputs in the input geometry
    out = tmp_path / "pred"
    result = run_cli("predict", "-i", data / "imagesTs", "-o", out, "-m", work, "--config", CASCADE, "--folds", "0,1")
    assert result.exit_code == 0, result.output
    test_images = sorted((data / "imagesTs").glob("*.nii.gz"))
    assert len(test_images) == 2
    for image_path in test_images:
        image, pred = nib.load(image_path), nib.load(out / image_path.name)
        stage1 = nib.load(out / f"stage1_{LOWRES}" / image_path.name)
        assert pred.shape == image.shape == stage1.shape
        assert np.allclose(pred.affine, image.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}

    # --prev-stage reuses stage 1's segmentations: the same stage-2 result
    reused = tmp_path / "reused"
    result = run_cli(
        "predict", "-i", data / "imagesTs", "-o", reused, "-m", work, "--config", CASCADE, "--folds", "0,1",
        "--prev-stage", out / f"stage1_{LOWRES}",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (reused / f"stage1_{LOWRES}").exists()
    for image_path in test_images:
        a = np.asarray(nib.load(out / image_path.name).dataobj)
        b = np.asarray(nib.load(reused / image_path.name).dataobj)
        assert np.array_equal(a, b)

    # a case without a stage-1 segmentation fails alone, named, and leaves no output
    partial = tmp_path / "partial_stage1"
    partial.mkdir()
    kept = test_images[0].name
    (partial / kept).write_bytes((out / f"stage1_{LOWRES}" / kept).read_bytes())
    result = run_cli(
        "predict", "-i", data / "imagesTs", "-o", tmp_path / "partial", "-m", work, "--config", CASCADE,
        "--prev-stage", partial,
    )  # fmt: skip
    assert result.exit_code != 0
    assert test_images[1].name.replace(".nii.gz", "") in result.output
    assert "no 3d_lowres segmentation" in result.output
    assert (tmp_path / "partial" / kept).exists()
    assert not (tmp_path / "partial" / test_images[1].name).exists()

    # the report compares the cascade with 3d_fullres and their ensemble
    result = run_cli("report", work)
    assert result.exit_code == 0, result.output
    names = {row["name"] for row in json.loads((wd.report / "report.json").read_text())["candidates"]}
    assert {f"{FULLRES}:final", f"{CASCADE}:final", f"ensemble({FULLRES}+{CASCADE})"} <= names


def test_training_batches_carry_one_hot_stage1_channels(cascade_work: tuple[Path, Path], tmp_path: Path) -> None:
    """Batches of a cascade stage 2: image + one-hot stage-1 channels that stay one-hot through every
    augmentation (in the workers or in the training process, which give the same batch)."""
    _, work = cascade_work
    plans = load_plans(WorkDir(work).plans)
    config = plans.configuration(CASCADE)
    folder = WorkDir(work).preprocessed(config.data_identifier)
    cases = sorted(p.stem for p in folder.glob("*.json"))
    previous = tmp_path / "previous_stage"
    previous.mkdir()
    rng = np.random.default_rng(0)
    for case in cases:  # a stand-in stage-1 map: the case's label with random voxels changed
        label = np.load(folder / f"{case}_seg.npy")
        noisy = np.where(rng.random(label.shape) < 0.05, rng.integers(0, 3, label.shape), label)
        np.save(previous / f"{case}.npy", noisy.astype(np.int8))
    spec = SamplerSpec(folder, cases, config.patch_size, 4, 0.5, [1, 2], previous)
    augmenter = Augmenter(AugmentationConfig(p_noise=0.5, p_rotation=0.5, p_scale=0.5), 1, 2)

    plain = next(iter(PatchBatches(spec, 1, seed=3, epoch=0, augmenter=None)))
    assert plain["image"].shape == (4, 3, *config.patch_size)
    # without augmentation the extra channels are exactly the stage-1 map, one-hot
    for b in range(4):
        classes = plain["image"][b, 1:].argmax(0) + 1
        classes[plain["image"][b, 1:].sum(0) == 0] = 0
        assert torch.equal(one_hot_tensor(classes.numpy()), plain["image"][b, 1:])

    for epoch in range(6):
        in_workers = next(iter(PatchBatches(spec, 1, seed=3, epoch=epoch, augmenter=augmenter)))
        raw = next(iter(PatchBatches(spec, 1, seed=3, epoch=epoch, augmenter=augmenter, augment_in_workers=False)))
        assert "params" in raw and "params" not in in_workers
        extent, cpu = batch_extent(config.patch_size, raw["params"]), torch.device("cpu")  # each sample's own crop,
        crops = stack_crops(raw["image"], extent, cpu), stack_crops(raw["label"], extent, cpu)  # padded as on a GPU
        image, label = augment_batch(augmenter, *crops, raw["params"], config.patch_size)
        assert image.shape == in_workers["image"].shape
        assert torch.allclose(image, in_workers["image"], atol=1e-5)
        assert torch.equal(label, in_workers["label"])
        masks = image[:, 1:]
        assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}
        assert float(masks.sum(1).max()) <= 1.0


def one_hot_tensor(classes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(one_hot(classes, 3))

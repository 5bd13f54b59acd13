"""Planning the real MSD Task04_Hippocampus (200 small MRI cases): the plans nnU-Net would make."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import HIPPOCAMPUS, requires_hippocampus, run_cli

from segpipe.core.atomic import read_json
from segpipe.planning.fingerprint import Fingerprint
from segpipe.planning.plans import FULLRES, TWO_D, Normalization, load_plans

pytestmark = [pytest.mark.realdata, requires_hippocampus]


@pytest.fixture(scope="module")
def hippocampus_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("hippocampus") / "work"
    result = run_cli("plan", HIPPOCAMPUS, "-o", work, "--workers", 2)
    assert result.exit_code == 0, result.output
    assert "3d_fullres: spacing [1.0, 1.0, 1.0] mm" in result.output
    return work


def test_hippocampus_plans(hippocampus_work: Path) -> None:
    plans = load_plans(hippocampus_work / "plans.json")
    assert plans.dataset_name == "Hippocampus"
    assert plans.labels == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert plans.channel_names == ["MRI"]
    assert plans.normalization == [Normalization("zscore", use_nonzero_mask=False)]
    assert plans.original_median_spacing == [1.0, 1.0, 1.0]
    assert list(plans.configurations) == [TWO_D, FULLRES]  # small cases: no cascade
    config = plans.configurations[FULLRES]
    assert config.spacing == [1.0, 1.0, 1.0]
    assert config.median_shape == [35, 51, 36]
    assert config.patch_size == [40, 56, 40]  # array order (X, Y, Z) of the files
    assert config.batch_size == 7
    assert config.topology.features == [32, 64, 128, 256]
    assert config.topology.strides == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert config.topology.kernel_sizes == [[3, 3, 3]] * 4
    # nnU-Net's 2d plan for Task04 is patch 56 x 40 in its (Y, X) order, 4 stages: our X 40, Y 56,
    # sliced along Z (isotropic: the last axis); batch 287 = round(5% of 200 x 35 x 51 x 36 / (40 x 56))
    two_d = plans.configurations[TWO_D]
    assert two_d.slice_axis == 2 and two_d.patch_size == [40, 56, 1]
    assert two_d.topology.strides == [[1, 1, 1]] + [[2, 2, 1]] * 3
    assert two_d.topology.features == [32, 64, 128, 256]
    assert two_d.batch_size == 287


def test_hippocampus_fingerprint_and_dataset(hippocampus_work: Path) -> None:
    fp = Fingerprint.from_dict(read_json(hippocampus_work / "fingerprint.json"))
    assert len(fp.cases) == 200 and fp.failures == {}
    assert all(c.spacing == [1.0, 1.0, 1.0] for c in fp.cases)
    assert all(c.label_voxels["1"] > 0 and c.label_voxels["2"] > 0 for c in fp.cases)
    dataset = read_json(hippocampus_work / "dataset.json")
    assert dataset["layout"] == "msd" and len(dataset["training"]) == 200
    assert dataset["training"][0]["images"] == [str((HIPPOCAMPUS / "imagesTr/hippocampus_001.nii.gz").resolve())]

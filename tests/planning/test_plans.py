"""Tests for segpipe.planning.plans and segpipe.planning.planner: presets, plans files, and each planner rule."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from segpipe.core.atomic import read_json, write_json
from segpipe.planning.fingerprint import CaseFingerprint, ChannelStats, Fingerprint
from segpipe.planning.planner import (
    estimate_memory_bytes,
    plan_configuration,
    plan_dataset,
    plan_normalization,
    plan_topology,
    slice_axis,
    target_spacing,
)
from segpipe.planning.plans import (
    CASCADE,
    FULLRES,
    LOWRES,
    SCHEMA_VERSION,
    TWO_D,
    Normalization,
    PlannerPreset,
    Plans,
    list_presets,
    load_plans,
    load_preset,
    save_plans,
)

LABELS = {"background": 0, "a": 1, "b": 2}


def make_fingerprint(
    spacings: list[list[float]],
    cropped_shapes: list[list[int]] | None = None,
    shapes: list[list[int]] | None = None,
    channels: tuple[str, ...] = ("MRI",),
) -> Fingerprint:
    """A fingerprint built by hand: one case per spacing."""
    n = len(spacings)
    cropped_shapes = cropped_shapes or [[100, 100, 100]] * n
    shapes = shapes or cropped_shapes
    cases = [
        CaseFingerprint(
            case_id=f"case_{i}",
            spacing=[float(s) for s in spacings[i]],
            shape=list(shapes[i]),
            cropped_shape=list(cropped_shapes[i]),
            label_voxels={"1": 100, "2": 50},
            label_volume_mm3={"1": 100.0, "2": 50.0},
        )
        for i in range(n)
    ]
    stats = ChannelStats(mean=40.0, std=12.5, percentile_00_5=-100.0, percentile_99_5=250.0, min=-1000.0, max=3000.0)
    return Fingerprint("Hand", list(channels), cases, [stats] * len(channels))


@pytest.fixture(scope="module")
def preset() -> PlannerPreset:
    return load_preset("default")


# -------------------------------------------------------------------------------------- presets


def test_default_preset_is_listed() -> None:
    assert "default" in list_presets()


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads(name: str) -> None:
    preset = load_preset(name)
    assert isinstance(preset, PlannerPreset)
    assert preset.name == name
    assert preset.min_batch_size >= 1 and preset.max_batch_size >= preset.min_batch_size
    assert preset.base_features <= preset.max_features
    assert load_preset(str(Path(__file__).parents[2] / "plans" / f"{name}.json")) == preset  # by path too


def test_default_preset_values(preset: PlannerPreset) -> None:
    assert (preset.gpu_memory_gb, preset.base_features, preset.max_features) == (10.0, 32, 320)
    assert (preset.min_feature_map, preset.max_stages, preset.min_batch_size) == (4, 6, 2)
    assert preset.max_patch_voxels == 256**3


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ({"name": "typo", "gpu_memroy_gb": 8.0}, "gpu_memroy_gb"),
        ({"name": "typo", "training": {"epoch": 5}}, "epoch"),
        ({"name": "typo", "max_stages": "six"}, "max_stages"),
    ],
)
def test_bad_preset_key_is_named(content: dict, named: str, tmp_path: Path) -> None:
    path = tmp_path / "typo.json"
    write_json(path, content)
    with pytest.raises(ValueError, match=named) as info:
        load_preset(str(path))
    assert str(path) in str(info.value)


def test_unknown_preset_name_lists_presets() -> None:
    with pytest.raises(FileNotFoundError, match="default"):
        load_preset("no_such_preset")


def test_cli_plan_rejects_bad_preset(synthetic_dataset: Path, tmp_path: Path) -> None:
    path = tmp_path / "typo.json"
    write_json(path, {"name": "typo", "gpu_memroy_gb": 8.0})
    result = run_cli("plan", synthetic_dataset, "-o", tmp_path / "work", "--preset", path, "--workers", 1)
    assert result.exit_code == 1
    assert "gpu_memroy_gb" in result.output
    assert not (tmp_path / "work" / "plans.json").exists()


# ------------------------------------------------------------------------------- plans files


def _cascade_fingerprint() -> Fingerprint:
    return make_fingerprint(
        [[1.0, 1.0, 1.0], [0.9, 1.1, 1.0], [1.1, 0.9, 1.0]],
        cropped_shapes=[[400, 380, 300]] * 3,
        shapes=[[512, 512, 400]] * 3,
        channels=("CT", "MRI"),
    )


def test_plans_round_trip_losslessly(preset: PlannerPreset, tmp_path: Path) -> None:
    plans = plan_dataset(_cascade_fingerprint(), preset, LABELS)
    assert set(plans.configurations) == {TWO_D, FULLRES, LOWRES, CASCADE}  # optional fields both set and None
    path = tmp_path / "plans.json"
    save_plans(plans, path)
    loaded = load_plans(path)
    assert loaded == plans
    assert loaded.fingerprint_hash() == plans.fingerprint_hash()
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["plans.json"]  # no temp file left behind


def test_plans_file_errors_name_file_and_key(preset: PlannerPreset, tmp_path: Path) -> None:
    path = tmp_path / "plans.json"
    save_plans(plan_dataset(_cascade_fingerprint(), preset, LABELS), path)
    data = read_json(path)
    data["configurations"][FULLRES]["patchsize"] = [1, 2, 3]
    write_json(path, data)
    with pytest.raises(ValueError, match=r"configurations\.3d_fullres: unknown keys \['patchsize'\]") as info:
        load_plans(path)
    assert str(path) in str(info.value)
    data["schema_version"] = SCHEMA_VERSION + 1
    write_json(path, data)
    with pytest.raises(ValueError, match=f"schema version {SCHEMA_VERSION + 1}"):
        load_plans(path)


def test_training_overrides(preset: PlannerPreset) -> None:
    plans = plan_dataset(_cascade_fingerprint(), preset, LABELS)
    shorter = plans.with_training(epochs=5, initial_lr=0.001)
    assert (shorter.training.epochs, shorter.training.initial_lr) == (5, 0.001)
    assert plans.training.epochs == 1000  # the original is untouched
    assert shorter.fingerprint_hash() != plans.fingerprint_hash()
    with pytest.raises(ValueError, match="epoch"):
        plans.with_training(epoch=5)


def test_configuration_lookup_names_planned(preset: PlannerPreset) -> None:
    plans = plan_dataset(make_fingerprint([[1, 1, 1]] * 3, [[40, 40, 40]] * 3), preset, LABELS)
    with pytest.raises(KeyError, match="planned: 2d, 3d_fullres"):
        plans.configuration(LOWRES)


# ---------------------------------------------------------------------------- target spacing


def test_target_spacing_is_median() -> None:
    fp = make_fingerprint([[1.0, 1.0, 1.0], [1.2, 0.9, 1.1], [0.8, 1.1, 0.7], [1.1, 0.8, 1.3]])
    assert target_spacing(fp, 3.0) == pytest.approx([1.05, 0.95, 1.05])


THICK = [[200, 200, 30]]  # median voxels along z x 3 = 90 < 200: nnU-Net's "few voxels" condition holds


def test_target_spacing_anisotropic_uses_10th_percentile() -> None:
    z = [1.5, 2.0, 3.0, 3.0, 3.5, 4.0, 4.0, 5.0, 5.0, 5.0]  # median 3.75 > 3 x 0.5
    fp = make_fingerprint([[0.5, 0.5, s] for s in z], THICK * 10)
    assert target_spacing(fp, 3.0) == pytest.approx([0.5, 0.5, 1.95])  # np.percentile(z, 10)


def test_target_spacing_needs_few_voxels_along_the_coarse_axis_too() -> None:
    # spacing condition holds (3.75 > 1.5), but 100 voxels along z x 3 = 300 is not < 100: keep the median
    z = [1.5, 2.0, 3.0, 3.0, 3.5, 4.0, 4.0, 5.0, 5.0, 5.0]
    assert target_spacing(make_fingerprint([[0.5, 0.5, s] for s in z]), 3.0) == pytest.approx([0.5, 0.5, 3.75])
    # the voxel condition is strict: 60 x 3 = 180 is not < 180
    fp = make_fingerprint([[0.5, 0.5, s] for s in z], [[180, 190, 60]] * 10)
    assert target_spacing(fp, 3.0) == pytest.approx([0.5, 0.5, 3.75])
    fp = make_fingerprint([[0.5, 0.5, s] for s in z], [[181, 190, 60]] * 10)
    assert target_spacing(fp, 3.0) == pytest.approx([0.5, 0.5, 1.95])


def test_target_spacing_compares_with_the_largest_other_spacing() -> None:
    # 3.2 > 3 x 1.0 (the smallest other) but not > 3 x 1.1 (the largest other, nnU-Net's test)
    fp = make_fingerprint([[1.0, 1.1, 3.2], [1.0, 1.1, 2.0], [1.0, 1.1, 3.2]], THICK * 3)
    assert target_spacing(fp, 3.0) == pytest.approx([1.0, 1.1, 3.2])
    fp = make_fingerprint([[1.0, 1.0, 3.2], [1.0, 1.0, 2.0], [1.0, 1.0, 3.2]], THICK * 3)
    assert target_spacing(fp, 3.0) == pytest.approx([1.0, 1.0, np.percentile([3.2, 2.0, 3.2], 10)])


def test_target_spacing_anisotropic_on_first_axis() -> None:
    x = [5.0, 4.0, 4.0, 4.0, 6.0]
    fp = make_fingerprint([[s, 1.0, 1.2] for s in x], [[30, 200, 200]] * 5)
    assert target_spacing(fp, 3.0) == pytest.approx([4.0, 1.0, 1.2])


def test_target_spacing_anisotropic_not_finer_than_other_axes() -> None:
    z = [0.5, 0.5] + [4.0] * 8  # 10th percentile 0.5 would be finer than the in-plane 1.0
    fp = make_fingerprint([[1.0, 1.0, s] for s in z], THICK * 10)
    assert target_spacing(fp, 3.0) == pytest.approx([1.0, 1.0, 1.0 + 1e-5], abs=1e-9)


def test_target_spacing_below_threshold_keeps_median() -> None:
    fp = make_fingerprint([[1.0, 1.0, 2.9], [1.0, 1.0, 2.9], [1.0, 1.0, 1.0]])
    assert target_spacing(fp, 3.0) == pytest.approx([1.0, 1.0, 2.9])


# ---------------------------------------------------------------------------------- topology


def _bottleneck(patch: list[int], strides: list[list[int]]) -> list[float]:
    size = np.array(patch, dtype=float)
    for s in strides:
        size = size / np.array(s)
    return size.tolist()


def test_topology_isotropic_128(preset: PlannerPreset) -> None:
    topo = plan_topology([1.0, 1.0, 1.0], [128, 128, 128], preset)
    assert topo.strides == [[1, 1, 1]] + [[2, 2, 2]] * 5  # max_stages = 6
    assert topo.kernel_sizes == [[3, 3, 3]] * 6
    assert topo.features == [32, 64, 128, 256, 320, 320]
    assert topo.divisor() == [32, 32, 32]
    assert _bottleneck([128] * 3, topo.strides) == [4, 4, 4]


@pytest.mark.parametrize(
    ("patch", "stages"),
    [([40, 56, 40], 4), ([64, 64, 64], 5), ([20, 24, 28], 3), ([9, 9, 9], 2), ([7, 7, 7], 1)],
)
def test_topology_pools_until_feature_map_4_to_8(patch: list[int], stages: int, preset: PlannerPreset) -> None:
    topo = plan_topology([1.0, 1.0, 1.0], patch, preset)
    assert topo.num_stages == stages
    assert topo.features == [min(32 * 2**i, 320) for i in range(stages)]
    for size, before in zip(_bottleneck(patch, topo.strides), patch):
        assert (4 <= size < 8) or (size == before < 8), (patch, topo.strides)


def test_topology_small_axis_does_not_stop_the_others(preset: PlannerPreset) -> None:
    # y (7 voxels) can never pool; x and z must still pool down to 4..8 (regression: the finest
    # spacing was taken over all axes, so the never-pooled y blocked z at 25 voxels).
    topo = plan_topology([1.0, 1.0, 1.0], [20, 7, 100], preset)
    assert topo.divisor() == [4, 1, 16]
    assert _bottleneck([20, 7, 100], topo.strides) == [5, 7, 6.25]


def test_topology_anisotropic_kernels_and_strides(preset: PlannerPreset) -> None:
    topo = plan_topology([0.7, 0.7, 5.0], [256, 256, 20], preset)
    # z (5.0 mm) is more than twice the in-plane spacing: kernel 1 and no pooling until the
    # in-plane spacing has doubled twice (2.8 mm), then 3x3x3 kernels and pooling on z too.
    assert topo.kernel_sizes[:3] == [[3, 3, 1], [3, 3, 1], [3, 3, 3]]
    assert topo.strides[:4] == [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2]]
    assert topo.kernel_sizes[3:] == [[3, 3, 3]] * 3
    assert topo.divisor() == [32, 32, 4]
    # nnU-Net's ratios are strict (< 2): after one in-plane pooling z is exactly twice as coarse
    # (2.0 vs 1.0 mm), so it keeps kernel 1 and does not pool until the next stage
    topo = plan_topology([0.5, 0.5, 2.0], [160, 160, 40], preset)
    assert topo.kernel_sizes[:3] == [[3, 3, 1], [3, 3, 1], [3, 3, 3]]
    assert topo.strides[:4] == [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2]]


def test_topology_features_double_up_to_max(preset: PlannerPreset) -> None:
    narrow = replace(preset, base_features=16, max_features=64)
    assert plan_topology([1, 1, 1], [128, 128, 128], narrow).features == [16, 32, 64, 64, 64, 64]
    shallow = replace(preset, max_stages=3)
    topo = plan_topology([1, 1, 1], [128, 128, 128], shallow)
    assert topo.features == [32, 64, 128] and topo.divisor() == [4, 4, 4]


# ------------------------------------------------------------------------ configuration, memory


def test_estimate_memory_monotone_in_patch_and_linear_in_batch(preset: PlannerPreset) -> None:
    topo = plan_topology([1, 1, 1], [128, 128, 128], preset)
    patches = [[32, 32, 32], [64, 64, 64], [96, 96, 96], [128, 128, 96], [128, 128, 128], [128, 128, 160]]
    values = [estimate_memory_bytes(p, topo, 2) for p in patches]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert estimate_memory_bytes([64] * 3, topo, 4) == pytest.approx(2 * estimate_memory_bytes([64] * 3, topo, 2))


# 10,000 cases: the 5% cap (500) is above what memory allows: 10 GiB / (48 B x 32^3 x (32 + 64/8 + 128/64
# + 256/512)) = 160.6 -> 160 (the default preset, like nnU-Net, has no other batch cap)
@pytest.mark.parametrize(("cases", "batch"), [(100, 5), (1000, 50), (10_000, 160)])
def test_batch_capped_at_5_percent_of_dataset(cases: int, batch: int, preset: PlannerPreset) -> None:
    config = plan_configuration(FULLRES, [1, 1, 1], [32, 32, 32], cases * 32**3, preset)
    assert config.patch_size == [32, 32, 32]
    assert config.batch_size == batch  # min(round(0.05 x cases), memory-limited batch)


def test_batch_at_least_min_for_tiny_dataset(preset: PlannerPreset) -> None:
    config = plan_configuration(FULLRES, [1, 1, 1], [10, 10, 10], 2 * 10**3, preset)
    assert config.batch_size == 2


def test_large_cases_fit_the_memory_budget(preset: PlannerPreset) -> None:
    config = plan_configuration(FULLRES, [1, 1, 1], [500, 500, 500], 3 * 500**3, preset)
    assert config.batch_size == 2
    assert estimate_memory_bytes(config.patch_size, config.topology, 2) <= preset.gpu_memory_gb * 1024**3
    assert all(p % d == 0 for p, d in zip(config.patch_size, config.topology.divisor()))
    assert 100**3 < np.prod(config.patch_size) < 192**3
    assert config.name == FULLRES and config.data_identifier == FULLRES and config.previous_stage is None


# ------------------------------------------------------------------------------ normalization


def test_normalization_ct_and_zscore() -> None:
    fp = make_fingerprint([[1, 1, 1]] * 3, cropped_shapes=[[80, 80, 80]] * 3, shapes=[[100, 100, 100]] * 3)
    fp.channel_names = ["CT", "T2"]
    fp.intensity = fp.intensity * 2
    ct, t2 = plan_normalization(fp)
    assert ct == Normalization("ct", False, mean=40.0, std=12.5, lower=-100.0, upper=250.0)
    assert t2 == Normalization("zscore", use_nonzero_mask=True)  # cropping keeps 51% < 75%
    fp.cases = [replace(c, cropped_shape=[95, 95, 95]) for c in fp.cases]  # 86% kept
    assert plan_normalization(fp)[1] == Normalization("zscore", use_nonzero_mask=False)


# ---------------------------------------------------------------------------------- cascade


def _check_cascade(plans: Plans) -> None:
    assert list(plans.configurations) == [TWO_D, FULLRES, LOWRES, CASCADE]
    full, low, cascade = (plans.configurations[n] for n in (FULLRES, LOWRES, CASCADE))
    assert cascade.previous_stage == LOWRES and low.previous_stage is None and full.previous_stage is None
    assert replace(cascade, name=FULLRES, previous_stage=None) == full  # same network and data as full-res
    assert cascade.data_identifier == FULLRES and low.data_identifier == LOWRES
    assert np.prod(full.patch_size) / np.prod(full.median_shape) < 0.25
    assert np.prod(low.patch_size) / np.prod(low.median_shape) >= 0.25
    assert all(lo >= fu for lo, fu in zip(low.spacing, full.spacing)) and low.spacing != full.spacing
    assert all(lo <= fu for lo, fu in zip(low.median_shape, full.median_shape))


def test_plan_dataset_cascade_for_large_cases(preset: PlannerPreset) -> None:
    plans = plan_dataset(_cascade_fingerprint(), preset, LABELS)
    _check_cascade(plans)
    assert plans.channel_names == ["CT", "MRI"] and plans.labels == LABELS
    assert [n.scheme for n in plans.normalization] == ["ct", "zscore"]


def test_plan_dataset_no_cascade_for_small_cases(preset: PlannerPreset) -> None:
    plans = plan_dataset(make_fingerprint([[1, 1, 1]] * 3, [[60, 70, 50]] * 3), preset, LABELS)
    assert list(plans.configurations) == [TWO_D, FULLRES]
    assert plans.configurations[FULLRES].median_shape == [60, 70, 50]


def test_cli_plan_small_dataset(synthetic_dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = run_cli("plan", synthetic_dataset, "-o", work, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "3d_fullres" in result.output and "3d_lowres" not in result.output
    assert sorted(p.name for p in work.iterdir()) == ["dataset.json", "fingerprint.json", "plans.json"]
    plans = load_plans(work / "plans.json")
    assert list(plans.configurations) == [TWO_D, FULLRES]
    assert plans.labels == {"background": 0, "structure_1": 1, "structure_2": 2}
    assert plans.normalization == [Normalization("zscore", use_nonzero_mask=True)]
    config = plans.configurations[FULLRES]
    assert all(0.9 <= s <= 1.1 for s in config.spacing)  # median of spacings jittered around 1 mm
    assert config.batch_size == 2
    fp = Fingerprint.from_dict(read_json(work / "fingerprint.json"))
    assert [c.case_id for c in fp.cases] == [f"synth_{k:03d}" for k in range(6)] and fp.failures == {}
    assert all(c.cropped_shape[a] < c.shape[a] for c in fp.cases for a in range(3))
    assert read_json(work / "dataset.json")["layout"] == "msd"


def test_cli_plan_custom_preset_by_path(synthetic_dataset: Path, tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    write_json(path, {"name": "mine", "base_features": 8, "max_features": 16, "training": {"epochs": 3}})
    result = run_cli("plan", synthetic_dataset, "-o", tmp_path / "work", "--preset", path, "--workers", 1)
    assert result.exit_code == 0, result.output
    plans = load_plans(tmp_path / "work" / "plans.json")
    assert plans.preset == "mine" and plans.training.epochs == 3
    assert plans.configurations[FULLRES].topology.features == [8, 16, 16]


@pytest.mark.slow
def test_cli_plan_large_dataset_plans_cascade(tmp_path: Path) -> None:
    # The CT-sized set: 256x256x160 at 0.8x0.8x2.5 mm with a torso filling the field of view
    # (--body-fill 0.93). With the default head-sized body, cropping removes 40% of the volume and the
    # full-res patch then covers 32% of the median case: no cascade, as nnU-Net's rule says.
    data = tmp_path / "large"
    assert (
        run_cli(
            "synth", data, "--cases", 2, "--shape", "256,256,160", "--spacing", "0.8,0.8,2.5", "--body-fill", 0.93
        ).exit_code
        == 0
    )
    work = tmp_path / "work"
    result = run_cli("plan", data, "-o", work, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "previous stage 3d_lowres" in result.output
    plans = load_plans(work / "plans.json")
    _check_cascade(plans)
    full = plans.configurations[FULLRES]
    assert full.spacing[2] > 2 * full.spacing[0]  # anisotropic: z stays coarse
    assert full.topology.kernel_sizes[0] == [3, 3, 1]


# ------------------------------------------------------------------------------------- 2d


def test_slice_axis_is_the_coarsest_last_on_a_tie() -> None:
    assert slice_axis([0.8, 0.8, 4.0]) == 2
    assert slice_axis([3.0, 0.7, 0.7]) == 0
    assert slice_axis([1.0, 1.0, 1.0]) == 2  # nnU-Net's (Z, Y, X) arrays put Z first on a tie


def test_2d_plan_follows_nnunet_rule(preset: PlannerPreset) -> None:
    """Worked by hand from nnU-Net's ``get_plans_for_configuration`` / ``get_pool_and_conv_props``: the
    in-plane median (300, 260) at 0.8 mm is the initial patch (< 2048^2 px); both axes pool while >= 8
    px: 300/260 -> 150/130 -> 75/65 -> 38/33 -> 19/17 -> 10/9 -> 5/5, six pools, so the patch is padded
    to multiples of 64: (320, 320); features min(32 * 2^i, 512); kernels 3x3 on every stage."""
    fp = make_fingerprint([[0.8, 0.8, 4.0]] * 10, [[300, 260, 30]] * 10)
    plans = plan_dataset(fp, preset, LABELS)
    two_d = plans.configurations[TWO_D]
    assert two_d.slice_axis == 2 and two_d.spacing == pytest.approx([0.8, 0.8, 4.0])
    assert two_d.patch_size == [320, 320, 1]
    assert two_d.topology.strides == [[1, 1, 1]] + [[2, 2, 1]] * 6
    assert two_d.topology.kernel_sizes == [[3, 3, 1]] * 7
    assert two_d.topology.features == [32, 64, 128, 256, 512, 512, 512]
    assert two_d.data_identifier == FULLRES
    # batch: segpipe's memory model, 48 bytes per feature-pixel summed over the stages (pixels / 4 per
    # pool), within 10 GB; then nnU-Net's cap of 5% of the dataset's voxels and the preset's maximum 64
    per_sample = 48 * 320 * 320 * sum(f / 4**i for i, f in enumerate([32, 64, 128, 256, 512, 512, 512]))
    # + the loss's 24 B per class and voxel of the 5 heads built (7 stages: all levels but the two lowest)
    per_sample += 24 * len(LABELS) * 320 * 320 * sum(1 / 4**i for i in range(5))
    by_memory = int(10 * 1024**3 // per_sample)
    cap = int(0.05 * 10 * 300 * 260 * 30 // (320 * 320))
    assert two_d.batch_size == max(2, min(by_memory, 64, cap))


def test_cpu_preset_bounds_the_voxels_of_one_iteration() -> None:
    cpu = load_preset("cpu")
    fp = make_fingerprint([[0.98, 0.98, 3.27]] * 26, [[176, 175, 58]] * 26)
    plans = plan_dataset(fp, cpu, LABELS)
    for config in plans.configurations.values():
        assert np.prod(config.patch_size) * config.batch_size <= cpu.max_batch_voxels
    assert plans.configurations[TWO_D].batch_size == 262144 // (192 * 192)  # 7 slices of 192 x 192


def test_batch_dice_per_configuration_as_nnunet(preset: PlannerPreset) -> None:
    # nnU-Net's plan_experiment: 2d True, 3d_lowres False, 3d_fullres (and the cascade) True only with a cascade
    plans = plan_dataset(_cascade_fingerprint(), preset, LABELS)
    assert {n: c.batch_dice for n, c in plans.configurations.items()} == {
        TWO_D: True,
        FULLRES: True,
        LOWRES: False,
        CASCADE: True,
    }
    small = plan_dataset(make_fingerprint([[1, 1, 1]] * 3, [[40, 40, 40]] * 3), preset, LABELS)
    assert {n: c.batch_dice for n, c in small.configurations.items()} == {TWO_D: True, FULLRES: False}


@pytest.mark.parametrize("num_classes", [14, 100])
def test_memory_model_against_the_tensors_training_really_stores(num_classes: int, preset: PlannerPreset) -> None:
    """Plan a 14- and a 100-class CT-like fingerprint, then measure on the CPU what one training step
    keeps for backward (every tensor autograd saves, counted by a saved-tensor hook) in the network
    (bf16 autocast, as on a GPU) and in the loss over the deep-supervision heads, and compare with the
    planner's two terms. Measured at a small valid patch: both terms scale with the voxels."""
    from segpipe.networks.build import build_network
    from segpipe.planning.planner import BYTES_PER_HEAD_CLASS_VOXEL
    from segpipe.training.losses import build_loss

    labels = {"background": 0, **{f"organ_{k}": k for k in range(1, num_classes)}}
    plans = plan_dataset(make_fingerprint([[1.0, 1.0, 1.0]] * 10, [[256, 256, 256]] * 10), preset, labels)
    config = plans.configuration(FULLRES)
    budget = preset.gpu_memory_gb * 1024**3
    assert estimate_memory_bytes(config.patch_size, config.topology, config.batch_size, num_classes) <= budget

    patch = [2 * d for d in config.topology.divisor()]  # a bottleneck of 2 voxels a side (norms need > 1)
    torch.manual_seed(0)
    network = build_network(config, 1, num_classes, True, 0)
    loss = build_loss("dice_ce", config.batch_dice)
    saved = [0]

    def count(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    x = torch.randn(1, 1, *patch)
    y = torch.randint(0, num_classes, (1, 1, *patch))
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            heads = network(x)
        in_network, saved[0] = saved[0], 0
        loss(heads, y)
        in_loss = saved[0]
    class_voxels = sum(h.numel() for h in heads)  # every head, each at its own resolution
    assert len(heads) == max(config.topology.num_stages - 2, 1)  # the heads the model counts are those built
    activations = estimate_memory_bytes(patch, config.topology, 1, 0)
    head_estimate = estimate_memory_bytes(patch, config.topology, 1, num_classes) - activations
    assert head_estimate == pytest.approx(class_voxels * BYTES_PER_HEAD_CLASS_VOXEL)
    # the loss saves ~16 B per class and voxel; its float32 gradient of the logits adds 4 more at backward
    assert 0.7 < (in_loss + 4 * class_voxels) / head_estimate < 1.3
    assert 0.6 < in_network / activations < 1.5

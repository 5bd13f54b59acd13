"""segpipe's plans beside nnU-Net v2's for the same dataset: spacing, patch, batch, pooling, kernels.

    python benchmarks/plans_vs_nnunet.py --data ../shared/data/STS_CT [--preset default] [--nnunet-bin DIR] [--keep]

Runs ``segpipe plan`` and nnU-Net's ``nnUNetv2_extract_fingerprint`` + ``nnUNetv2_plan_experiment``
(default ExperimentPlanner, 8 GB target) on one MSD dataset, each in its own temporary folder, and
prints one JSON line per configuration with both tools' values in segpipe's axis order (the NIfTI
files' X, Y, Z; nnU-Net's arrays are Z, Y, X and then transposed by its ``transpose_forward``), and a
Markdown table on stderr. Installs nothing: nnU-Net must be importable or its commands in
``--nnunet-bin`` (see benchmarks/README.md). The README's "Plans beside nnU-Net's" section explains
every difference this prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from run import SEGPIPE, NnUNet, find_nnunet_bin, run_timed, scratch_folder

FIELDS = ("spacing", "patch", "batch", "strides", "kernels", "features", "slice_axis", "batch_dice")


def msd_copy_for_nnunet(data: Path, root: Path, dataset_id: int) -> Path:
    """nnU-Net's MSD converter wants a ``TaskNN_Name`` folder: link the dataset's parts under that name."""
    name = data.name.split("_", 1)[-1] if data.name.startswith("Task") else data.name
    task = root / f"Task{dataset_id:02d}_{name.replace('_', '')}"  # one underscore only
    task.mkdir(parents=True)
    for part in ("dataset.json", "imagesTr", "labelsTr", "imagesTs"):
        if (data / part).exists():
            (task / part).symlink_to((data / part).resolve())
    (task / "imagesTs").mkdir(exist_ok=True)  # the converter insists on one, even empty
    return task


def nnunet_axes(values: list[Any], transpose_forward: list[int], dims: int = 3) -> list[Any]:
    """nnU-Net values (transposed Z, Y, X order; a 2d plan lacks the first, out-of-plane axis) in X, Y, Z
    order, ``None`` where 2d has no value."""
    out: list[Any] = [None, None, None]
    for i, v in zip(range(3 - dims, 3), values):
        out[2 - transpose_forward[i]] = v
    return out


def segpipe_record(config: dict[str, Any]) -> dict[str, Any]:
    axis = config.get("slice_axis")

    def in_plane(values: list[Any]) -> list[Any]:
        return [None if a == axis else v for a, v in enumerate(values)] if axis is not None else values

    topo = config["topology"]
    return {
        "spacing": [round(s, 4) for s in config["spacing"]],
        "patch": in_plane(config["patch_size"]),
        "batch": config["batch_size"],
        "strides": [in_plane(s) for s in topo["strides"]],
        "kernels": [in_plane(k) for k in topo["kernel_sizes"]],
        "features": topo["features"],
        "slice_axis": axis,
        "batch_dice": config.get("batch_dice"),
    }


def nnunet_record(config: dict[str, Any], transpose_forward: list[int], spacing_3d: list[float]) -> dict[str, Any]:
    dims = len(config["patch_size"])
    arch = config.get("architecture", {}).get("arch_kwargs", config)  # v2.5+: architecture.arch_kwargs
    strides = arch.get("strides", config.get("pool_op_kernel_sizes"))
    kernels = arch.get("kernel_sizes", config.get("conv_kernel_sizes"))
    spacing = nnunet_axes(config["spacing"], transpose_forward, dims)
    if dims == 2:  # the 2d plan keeps each case's slice spacing; show the 3d value there
        spacing = [s if s is not None else spacing_3d[a] for a, s in enumerate(spacing)]
    return {
        "spacing": [round(s, 4) for s in spacing],
        "patch": nnunet_axes(config["patch_size"], transpose_forward, dims),
        "batch": config["batch_size"],
        "strides": [nnunet_axes(s, transpose_forward, dims) for s in strides],
        "kernels": [nnunet_axes(k, transpose_forward, dims) for k in kernels],
        "features": arch.get("features_per_stage"),
        "slice_axis": 2 - transpose_forward[0] if dims == 2 else None,
        "batch_dice": config.get("batch_dice"),
    }


def plan_segpipe(data: Path, work: Path, preset: str, log: Path) -> dict[str, Any]:
    run_timed([*SEGPIPE, "plan", str(data), "-o", str(work), "--preset", preset, "--workers", "2"], log)
    return json.loads((work / "plans.json").read_text())


def plan_nnunet(data: Path, nnunet: NnUNet, dataset_id: int, log: Path) -> dict[str, Any]:
    env = nnunet.env()
    task = msd_copy_for_nnunet(data, nnunet.root / "msd", dataset_id)
    run_timed(nnunet.command("nnUNetv2_convert_MSD_dataset", "-i", str(task), "-np", "2"), log, env)
    # read with nibabel, as segpipe does (and no SimpleITK needed at run time)
    for meta in (nnunet.root / "raw").glob("Dataset*/dataset.json"):
        content = json.loads(meta.read_text())
        content["overwrite_image_reader_writer"] = "NibabelIO"
        meta.write_text(json.dumps(content, indent=2))
    run_timed(nnunet.command("nnUNetv2_extract_fingerprint", "-d", str(dataset_id), "-np", "2"), log, env)
    run_timed(nnunet.command("nnUNetv2_plan_experiment", "-d", str(dataset_id)), log, env)
    (plans,) = (nnunet.root / "preprocessed").glob("Dataset*/nnUNetPlans.json")
    return json.loads(plans.read_text())


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per configuration planned by either tool."""
    tf = theirs["transpose_forward"]
    full = theirs["configurations"].get("3d_fullres", {})
    spacing_3d = nnunet_axes(full.get("spacing", [None] * 3), tf)
    names = list(dict.fromkeys([*ours["configurations"], *theirs["configurations"]]))
    records = []
    for name in names:
        seg = ours["configurations"].get(name)
        nnu = theirs["configurations"].get(name)
        seg_rec = segpipe_record(seg) if seg else None
        nnu_rec = nnunet_record(nnu, tf, spacing_3d) if nnu and "patch_size" in nnu else None
        if nnu and not nnu_rec:
            nnu_rec = {"inherits_from": nnu.get("inherits_from"), "previous_stage": nnu.get("previous_stage")}
        same = {f: seg_rec[f] == nnu_rec.get(f) for f in FIELDS} if seg_rec and nnu_rec and "patch" in nnu_rec else None
        records.append({"config": name, "segpipe": seg_rec, "nnunet": nnu_rec, "same": same})
    return records


def markdown(dataset: str, records: list[dict[str, Any]]) -> str:
    lines = [f"### {dataset}", "", "| configuration | field | segpipe | nnU-Net v2 |", "|---|---|---|---|"]
    for r in records:
        for field in FIELDS:
            a = (r["segpipe"] or {}).get(field, "—")
            b = (r["nnunet"] or {}).get(field, "—")
            mark = "" if a == b else " ≠"
            lines.append(f"| {r['config']} | {field}{mark} | {a} | {b} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="MSD dataset folder (single-channel or not).")
    parser.add_argument("--preset", default="default", help="segpipe planner preset (default: %(default)s).")
    parser.add_argument(
        "--dataset-id", type=int, default=None, help="nnU-Net dataset id (default: the MSD task number, else 99)."
    )
    parser.add_argument("--nnunet-bin", type=Path, default=None, help="Directory with the nnUNetv2_* commands.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder (path on stderr).")
    args = parser.parse_args(argv)
    data = args.data.resolve()
    dataset_id = args.dataset_id
    if dataset_id is None:
        dataset_id = int(data.name[4:6]) if data.name.startswith("Task") and data.name[4:6].isdigit() else 99
    nnunet_bin = find_nnunet_bin(args.nnunet_bin)  # exits with a message when there is none
    with scratch_folder("segpipe-plans-", args.keep) as tmp:
        log = tmp / "commands.log"
        ours = plan_segpipe(data, tmp / "segpipe", args.preset, log)
        theirs = plan_nnunet(data, NnUNet(nnunet_bin, tmp / "nnunet"), dataset_id, log)
        records = compare(ours, theirs)
    for record in records:
        print(json.dumps({"benchmark": "plans", "dataset": data.name, "preset": args.preset, **record}), flush=True)
    print(markdown(f"{data.name} (segpipe preset {args.preset})", records), file=sys.stderr)


if __name__ == "__main__":
    main()

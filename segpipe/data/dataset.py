"""Raw datasets: layout detection, case listing, reading and validation.

The first stage of the pipeline. A raw dataset comes in the Medical Segmentation Decathlon layout
(``dataset.json`` with ``modality`` and a ``training`` list; multi-modal images as 4D NIfTI) or the
nnU-Net v2 layout (``dataset.json`` with ``channel_names`` and ``file_ending``; one file per channel,
``CASE_0000.nii.gz``). Both are read into the same :class:`Dataset`, which ``plan`` saves as
``WORK/dataset.json`` so that later stages never read the raw ``dataset.json`` again.

Images are returned as ``(C, X, Y, Z)`` float32 arrays in the files' voxel order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.core.atomic import read_json
from segpipe.data.nifti import InputError, Volume, is_nifti, load_nifti, strip_nifti_ending

AFFINE_TOLERANCE = 1e-3
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class CaseFiles:
    """The files of one case: one image file per channel (nnU-Net) or one, maybe 4D, file (MSD)."""

    case_id: str
    images: list[str]
    label: str | None = None


@dataclass
class Dataset:
    """A raw dataset in either layout, with absolute file paths."""

    root: str
    name: str
    layout: str  # "msd" or "nnunetv2"
    channel_names: list[str]
    labels: dict[str, int]  # name -> value; includes the background (0), never "ignore"
    training: list[CaseFiles] = field(default_factory=list)
    test: list[CaseFiles] = field(default_factory=list)
    ignore_label: int | None = None  # nnU-Net v2's "ignore": voxels without annotation
    regions: dict[str, list[int]] | None = None  # region-based training: name -> the label values it unites
    regions_class_order: list[int] | None = None  # the value each region writes, in this order

    @property
    def allowed_label_values(self) -> set[int]:
        """What a label file may contain: the labels and the ignore value."""
        return set(self.labels.values()) | ({self.ignore_label} if self.ignore_label is not None else set())

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def foreground_labels(self) -> list[int]:
        return sorted(v for v in self.labels.values() if v != 0)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Dataset:
        d = dict(data)
        d["training"] = [CaseFiles(**c) for c in d.get("training", [])]
        d["test"] = [CaseFiles(**c) for c in d.get("test", [])]
        return cls(**d)


@dataclass
class CaseData:
    """One case in memory: image ``(C, X, Y, Z)`` float32, label ``(X, Y, Z)`` uint8 (int32 when a value
    exceeds 255) or None."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    reference: Volume  # the first image file: its affine and header define the output geometry

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.reference.spacing

    def geometry_only(self) -> CaseData:
        """This case without its voxel arrays: what writing an output in its geometry needs."""
        empty = np.empty((0, 0, 0), np.float32)
        reference = Volume(empty, self.reference.affine, self.reference.header, self.reference.path)
        return CaseData(self.case_id, empty[None], None, reference)


def load_dataset(root: str | Path) -> Dataset:
    """Read ``root/dataset.json`` and list the cases, detecting the layout.

    Raises :class:`InputError` naming ``dataset.json`` when it is missing, not JSON, or lacks keys.
    """
    root = Path(root).resolve()
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise InputError(meta_path, "missing: a dataset folder needs a dataset.json (MSD or nnU-Net v2 layout)")
    try:
        meta = read_json(meta_path)
    except ValueError as exc:
        raise InputError(meta_path, f"not valid JSON ({exc.__cause__})") from exc
    if not isinstance(meta, dict):
        raise InputError(meta_path, "must hold a JSON object")
    if "labels" not in meta:
        raise InputError(meta_path, "lacks the key 'labels'")
    if "channel_names" in meta:
        ds = _load_nnunetv2(root, meta, meta_path)
    elif "modality" in meta:
        ds = _load_msd(root, meta, meta_path)
    else:
        raise InputError(meta_path, "lacks 'modality' (MSD layout) or 'channel_names' (nnU-Net v2 layout)")
    _check_unique(ds.training, meta_path)
    return ds


# Label values a label map may hold: uint16 prediction files, int16 class maps (as nnU-Net's int16 storage).
MAX_LABEL_VALUE = 32767


def _labels_from_meta(meta: dict, meta_path: Path) -> dict[str, Any]:
    """``labels`` (name -> value of every value label files hold), ``ignore_label``, and for
    region-based datasets ``regions`` (name -> label values) and ``regions_class_order``, from either
    layout's ``labels``. ``"ignore"`` and regions (lists of values plus a top-level
    ``regions_class_order``) are nnU-Net v2's (nnunetv2/utilities/label_handling/label_handling.py
    ``LabelManager``)."""
    entries = meta["labels"]
    labels: dict[str, int] = {}
    regions: dict[str, list[int]] = {}
    ignore = None
    try:
        for k, v in entries.items():
            if isinstance(v, str) and k.lstrip("-").isdigit():  # MSD: {"0": "background"}
                labels[v] = int(k)
            elif isinstance(v, int) and k == "ignore":
                ignore = v
            elif isinstance(v, int):  # nnU-Net v2: {"background": 0}
                labels[k] = v
                regions[k] = [v]
            elif isinstance(v, list) and v and all(isinstance(x, int) for x in v):
                regions[k] = sorted(set(v))
            else:
                raise ValueError(f"label entry {k!r}: {v!r}")
    except (AttributeError, ValueError) as exc:
        raise InputError(meta_path, f"'labels' must map values to names (MSD) or names to values ({exc})") from exc
    has_regions = any(len(r) > 1 for r in regions.values())
    for name, values in regions.items():  # every value inside a region is a label value of the files
        for value in values:
            if value not in labels.values():
                labels[f"label_{value}" if len(values) > 1 else name] = value
    if 0 not in labels.values():
        labels["background"] = 0
    values = [*labels.values(), *([ignore] if ignore is not None else [])]
    bad = [v for v in values if not 0 <= v <= MAX_LABEL_VALUE]
    if bad:
        raise InputError(meta_path, f"label value {bad[0]} is outside 0..{MAX_LABEL_VALUE}")
    if ignore is not None and (ignore == 0 or ignore in labels.values()):
        raise InputError(meta_path, f"the 'ignore' label {ignore} must differ from the background and every label")
    out: dict[str, Any] = {"labels": labels, "ignore_label": ignore}
    if has_regions:
        regions = {k: r for k, r in regions.items() if r != [0]}
        order = meta.get("regions_class_order")
        if not isinstance(order, list) or len(order) != len(regions) or not all(isinstance(x, int) for x in order):
            raise InputError(
                meta_path,
                f"region-based labels need 'regions_class_order': one label value per region ({len(regions)})",
            )
        out.update(regions=regions, regions_class_order=order)
    return out


def _channels(mapping: object, meta_path: Path, key: str) -> list[str]:
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(meta_path, f"'{key}' must be a non-empty object {{'0': name, ...}}")
    try:
        return [str(mapping[k]) for k in sorted(mapping, key=int)]
    except ValueError as exc:
        raise InputError(meta_path, f"'{key}' keys must be channel numbers") from exc


def _load_msd(root: Path, meta: dict, meta_path: Path) -> Dataset:
    if "training" not in meta or not isinstance(meta["training"], list):
        raise InputError(meta_path, "lacks the list 'training' (MSD layout)")
    training = []
    for entry in meta["training"]:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InputError(meta_path, f"training entry {entry!r} needs 'image' and 'label'")
        image = (root / entry["image"]).resolve()
        training.append(CaseFiles(strip_nifti_ending(image.name), [str(image)], str((root / entry["label"]).resolve())))
    test = []
    for entry in meta.get("test", []):
        path = entry["image"] if isinstance(entry, dict) else entry
        image = (root / path).resolve()
        test.append(CaseFiles(strip_nifti_ending(image.name), [str(image)]))
    return Dataset(
        root=str(root),
        name=str(meta.get("name", root.name)),
        layout="msd",
        channel_names=_channels(meta["modality"], meta_path, "modality"),
        **_labels_from_meta(meta, meta_path),
        training=training,
        test=test,
    )


def _load_nnunetv2(root: Path, meta: dict, meta_path: Path) -> Dataset:
    ending = meta.get("file_ending")
    if not ending:
        raise InputError(meta_path, "lacks 'file_ending' (nnU-Net v2 layout)")
    channels = _channels(meta["channel_names"], meta_path, "channel_names")
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise InputError(images_dir, "missing folder (nnU-Net v2 layout needs imagesTr/)")
    training = [
        CaseFiles(case_id, images, str(root / "labelsTr" / f"{case_id}{ending}"))
        for case_id, images in group_channel_files(images_dir, len(channels), ending).items()
    ]
    test_dir = root / "imagesTs"
    test = []
    if test_dir.is_dir():
        test = [CaseFiles(c, imgs) for c, imgs in group_channel_files(test_dir, len(channels), ending).items()]
    return Dataset(
        root=str(root),
        name=str(meta.get("name", root.name)),
        layout="nnunetv2",
        channel_names=channels,
        **_labels_from_meta(meta, meta_path),
        training=training,
        test=test,
    )


def group_channel_files(folder: Path, num_channels: int, ending: str = ".nii.gz") -> dict[str, list[str]]:
    """Group ``CASE_XXXX<ending>`` files of a folder into cases, channel files in order.

    A missing channel file is listed as the path it should have (reading it then names it).
    """
    cases: dict[str, dict[int, str]] = {}
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(ending) or path.name.startswith("."):
            continue
        m = _CHANNEL_SUFFIX.match(path.name[: -len(ending)])
        if m:
            cases.setdefault(m["case"], {})[int(m["channel"])] = str(path)
    return {
        case: [files.get(c, str(folder / f"{case}_{c:04d}{ending}")) for c in range(num_channels)]
        for case, files in cases.items()
    }


def list_prediction_inputs(folder: str | Path, num_channels: int) -> tuple[list[CaseFiles], list[InputError]]:
    """List the cases of a prediction input folder, in either layout's naming.

    Files named ``CASE_0000.nii.gz`` (one per channel) are grouped into cases; other NIfTI files are
    one case each (channels, if several, along a 4th axis as in MSD). Non-NIfTI files are reported.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "input folder not found")
    problems: list[InputError] = []
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    nifti = [p for p in files if is_nifti(p)]
    for p in files:
        if not is_nifti(p) and p.suffix != ".json":
            problems.append(InputError(p, "not a NIfTI file (.nii/.nii.gz); skipped"))
    grouped_ids: set[str] = set()
    cases: list[CaseFiles] = []
    for ending in (".nii.gz", ".nii"):
        for case_id, images in group_channel_files(folder, num_channels, ending).items():
            # a group is a case only if its first channel exists; "scan_0001" alone is a plain name
            if not Path(images[0]).exists():
                continue
            cases.append(CaseFiles(case_id, images))
            grouped_ids.update(strip_nifti_ending(Path(i).name) for i in images)
        for path in folder.glob(f"*_[0-9][0-9][0-9][0-9]{ending}"):
            m = _CHANNEL_SUFFIX.match(path.name[: -len(ending)])
            if m and int(m["channel"]) >= num_channels and m["case"] in {c.case_id for c in cases}:
                problems.append(InputError(path, f"channel {int(m['channel'])} but the model takes {num_channels}"))
                grouped_ids.add(strip_nifti_ending(path.name))
    for p in nifti:
        name = strip_nifti_ending(p.name)
        if name not in grouped_ids:
            cases.append(CaseFiles(name, [str(p)]))
    # a name given twice (CASE.nii and CASE.nii.gz, ...) is ambiguous: every file of it is skipped
    by_name: dict[str, list[CaseFiles]] = {}
    for c in sorted(cases, key=lambda c: c.case_id):
        by_name.setdefault(c.case_id, []).append(c)
    unique = []
    for name, group in by_name.items():
        if len(group) == 1:
            unique.append(group[0])
            continue
        for c in group:
            problems.append(
                InputError(c.images[0], f"case name {name!r} appears {len(group)} times in the folder; skipped")
            )
    return unique, problems


def _check_unique(cases: list[CaseFiles], meta_path: Path) -> None:
    seen: set[str] = set()
    for c in cases:
        if c.case_id in seen:
            raise InputError(meta_path, f"case name {c.case_id!r} appears twice")
        seen.add(c.case_id)


def read_case(case: CaseFiles, num_channels: int, allowed_labels: set[int] | None = None) -> CaseData:
    """Read and validate one case; raise its problems as one :class:`InputError` naming the first
    problem's file (the others follow in the message with their own files)."""
    data, problems = inspect_case(case, num_channels, allowed_labels)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        others = "; ".join(str(p) for p in problems[1:])
        raise InputError(problems[0].path, f"{problems[0].problem}; also {others}")
    assert data is not None
    return data


def inspect_case(
    case: CaseFiles, num_channels: int, allowed_labels: set[int] | None = None
) -> tuple[CaseData | None, list[InputError]]:
    """Read one case and return it with every problem found (errors name the file).

    Checks: files readable, images 3D (or 4D with one volume per channel for MSD), no NaN/Inf,
    channel geometry consistent, label shape and affine equal to the image's (tolerance 1e-3),
    label values integral and declared.
    """
    problems: list[InputError] = []
    channels: list[np.ndarray] = []
    reference: Volume | None = None
    for path in case.images:
        try:
            vol = load_nifti(path)
        except InputError as exc:
            problems.append(exc)
            continue
        arrays = _split_channels(vol, num_channels if len(case.images) == 1 else 1, problems)
        if arrays is None:
            continue
        if reference is None:
            reference = vol
        elif arrays[0].shape != reference.data.shape[:3] or not _affine_close(vol.affine, reference.affine):
            problems.append(InputError(path, f"geometry differs from the case's first channel {reference.path.name}"))
            continue
        for a in arrays:
            if not np.isfinite(a).all():
                problems.append(InputError(path, f"contains {int((~np.isfinite(a)).sum())} NaN/Inf voxels"))
                break
        channels.extend(arrays)
    label = None
    if case.label is not None:
        try:
            lab = load_nifti(case.label, dtype=np.float32)
        except InputError as exc:
            problems.append(exc)
        else:
            label = _check_label(lab, reference, allowed_labels, problems)
    if problems or reference is None:
        return None, problems
    # one channel: a view of the file's array, not a copy (CT-sized volumes are large)
    image = channels[0][None] if len(channels) == 1 else np.stack(channels)
    image = image.astype(np.float32, copy=False)
    return CaseData(case.case_id, image, label, reference), problems


def _split_channels(vol: Volume, num_channels: int, problems: list[InputError]) -> list[np.ndarray] | None:
    data = vol.data
    if data.ndim == 4 and data.shape[3] == 1 and num_channels == 1:
        data = data[..., 0]
    if data.ndim == 3 and num_channels == 1:
        return [data]
    if data.ndim == 4 and data.shape[3] == num_channels:
        return [data[..., c] for c in range(num_channels)]
    want = "3D" if num_channels == 1 else f"3D per channel file, or 4D with {num_channels} channels"
    problems.append(InputError(vol.path, f"has shape {data.shape} ({data.ndim}D); expected {want}"))
    return None


def _check_label(
    lab: Volume, reference: Volume | None, allowed: set[int] | None, problems: list[InputError]
) -> np.ndarray | None:
    data = lab.data
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        problems.append(InputError(lab.path, f"label has shape {data.shape}; expected 3D"))
        return None
    n_before = len(problems)
    if reference is not None:
        if data.shape != reference.data.shape[:3]:
            problems.append(
                InputError(lab.path, f"label shape {data.shape} differs from image shape {reference.data.shape[:3]}")
            )
        elif not _affine_close(lab.affine, reference.affine):
            problems.append(InputError(lab.path, "label affine differs from the image affine (tolerance 1e-3)"))
    if not np.isfinite(data).all() or not np.all(data == np.round(data)):
        problems.append(InputError(lab.path, "label holds non-integer values"))
        return None
    values = set(np.unique(data).astype(int).tolist())
    out_of_range = sorted(v for v in values if not 0 <= v <= MAX_LABEL_VALUE)
    if out_of_range:
        problems.append(InputError(lab.path, f"label value {out_of_range[0]} is outside 0..{MAX_LABEL_VALUE}"))
        return None
    if allowed is not None and not values <= allowed:
        problems.append(
            InputError(lab.path, f"label values {sorted(values - allowed)} are not declared in dataset.json")
        )
    if len(problems) > n_before:
        return None
    # never a silent wrap-around: values above 255 (e.g. MM-WHS's 205..850) keep a wider type
    return data.astype(np.uint8 if max(values, default=0) <= 255 else np.int32)


def _affine_close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, atol=AFFINE_TOLERANCE, rtol=0))


def check_dataset(root: str | Path) -> list[InputError]:
    """Validate a whole dataset and return every problem (empty list: all good)."""
    try:
        ds = load_dataset(root)
    except InputError as exc:
        return [exc]
    allowed = ds.allowed_label_values
    problems: list[InputError] = []
    if not ds.training:
        problems.append(InputError(Path(ds.root) / "dataset.json", "lists no training cases"))
    for case in ds.training:
        problems.extend(inspect_case(case, ds.num_channels, allowed)[1])
    for case in ds.test:
        problems.extend(inspect_case(case, ds.num_channels, None)[1])
    return problems

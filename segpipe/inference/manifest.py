"""Which inputs each prediction was made from, so a repeated or interrupted ``predict`` redoes only
what is missing or changed.

``OUT/.segpipe_manifest.json`` maps each case written to the identity of its input files: name,
size, modification time (ns) and SHA-1 of the content. ``predict`` skips a case only when its output
exists and its entry still matches the inputs: same names, sizes and modification times (a ``stat``,
no read), or, where only the times differ, the same SHA-1 (a touched or copied file is not redone).
The identity is taken before the case is read, and the manifest is rewritten atomically after each
case's output, so an output without an entry (a run killed in between, an older segpipe) is redone.
"""

from __future__ import annotations

import os
from pathlib import Path

from segpipe.core.atomic import read_json, write_json
from segpipe.core.digest import file_digest
from segpipe.data.nifti import InputError

MANIFEST_NAME = ".segpipe_manifest.json"
MANIFEST_VERSION = 1
SHARD_NAME = ".segpipe_manifest.rank{rank}.json"  # one rank's entries under torchrun

FileIdentity = dict[str, object]  # {"file": name, "size": bytes, "mtime_ns": int, "sha1": hex}


def sha1_of(path: str | Path) -> str:
    return file_digest(path, "sha1")


def input_identity(images: list[str]) -> list[FileIdentity]:
    """The identity of a case's input files, in channel order; a missing file is an :class:`InputError`."""
    out = []
    for image in images:
        try:
            st = os.stat(image)
            digest = sha1_of(image)
        except FileNotFoundError:
            raise InputError(image, "file not found") from None
        out.append({"file": Path(image).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": digest})
    return out


def shard_path(folder: Path, rank: int) -> Path:
    return Path(folder) / SHARD_NAME.format(rank=rank)


class PredictionManifest:
    """The manifest of one output folder, kept in memory and saved after every change.

    Under torchrun each rank owns a share of the cases (``owned``) and saves only its shard,
    ``.segpipe_manifest.rank<k>.json``; rank 0 folds the shards into the manifest at the end
    (:meth:`merge_shards`), so no rank ever rewrites the shared file from its partial view. Shards
    left by a killed sharded run are read too, so its finished cases are not redone.
    """

    def __init__(self, folder: Path, rank: int | None = None):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        self.rank = rank
        self.owned: set[str] | None = None  # the cases this rank answers for (None: all)
        self.cases: dict[str, list[FileIdentity]] = {}
        data = _read(self.path)
        if data is not None:
            self.cases = dict(data["cases"])
        for shard in self._shards():
            self._apply(shard)

    def _shards(self) -> list[Path]:
        """Shard files in this folder, oldest first (a killed run's before this run's)."""
        found = [p for p in self.folder.glob(SHARD_NAME.format(rank="*")) if p.is_file()]
        return sorted(found, key=lambda p: p.stat().st_mtime_ns)

    def _apply(self, shard: Path) -> None:
        data = _read(shard)
        if data is None:
            return
        for case, entry in data["cases"].items():
            if entry is None:
                self.cases.pop(case, None)
            else:
                self.cases[case] = entry

    def is_current(self, case_id: str, images: list[str]) -> bool:
        """Whether the recorded inputs of ``case_id`` are the files ``images`` as they are now."""
        entry = self.cases.get(case_id)
        if entry is None or [e.get("file") for e in entry] != [Path(i).name for i in images]:
            return False
        for recorded, image in zip(entry, images):
            try:
                st = os.stat(image)
            except OSError:
                return False
            if st.st_size != recorded.get("size"):
                return False
            if st.st_mtime_ns != recorded.get("mtime_ns"):
                if sha1_of(image) != recorded.get("sha1"):
                    return False
                recorded["mtime_ns"] = st.st_mtime_ns  # same content: saved with the next change
        return True

    def record(self, case_id: str, identity: list[FileIdentity]) -> None:
        self.cases[case_id] = identity
        self.save()

    def forget(self, case_id: str) -> None:
        """Drop a case's entry in memory (saved with the next change)."""
        self.cases.pop(case_id, None)

    def save(self) -> None:
        """The whole manifest (single process; earlier shards are then folded in) or this rank's shard."""
        if self.rank is None:
            write_json(self.path, {"version": MANIFEST_VERSION, "cases": self.cases})
            for shard in self._shards():
                shard.unlink(missing_ok=True)
            return
        owned = self.cases.keys() if self.owned is None else self.owned
        entries = {case: self.cases.get(case) for case in sorted(owned)}  # None: no valid output
        shard = {"version": MANIFEST_VERSION, "rank": self.rank, "cases": entries}
        write_json(shard_path(self.folder, self.rank), shard)

    def merge_shards(self) -> None:
        """Rank 0, after every rank has finished: fold all shards into the manifest and remove them."""
        for shard in self._shards():
            self._apply(shard)
        write_json(self.path, {"version": MANIFEST_VERSION, "cases": self.cases})
        for shard in self._shards():
            shard.unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    """A manifest or shard file's content, None when absent or unreadable (its outputs are redone)."""
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (ValueError, OSError):
        return None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or not isinstance(data.get("cases"), dict):
        return None
    return data

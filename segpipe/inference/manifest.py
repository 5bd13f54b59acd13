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

import hashlib
import os
from pathlib import Path

from segpipe.core.atomic import read_json, write_json
from segpipe.data.nifti import InputError

MANIFEST_NAME = ".segpipe_manifest.json"
MANIFEST_VERSION = 1

FileIdentity = dict[str, object]  # {"file": name, "size": bytes, "mtime_ns": int, "sha1": hex}


def sha1_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


class PredictionManifest:
    """The manifest of one output folder, kept in memory and saved after every change."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / MANIFEST_NAME
        self.cases: dict[str, list[FileIdentity]] = {}
        if self.path.is_file():
            try:
                data = read_json(self.path)
                if isinstance(data, dict) and data.get("version") == MANIFEST_VERSION:
                    self.cases = dict(data["cases"])
            except (ValueError, KeyError, TypeError, OSError):
                self.cases = {}  # unreadable: every existing output is redone

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
        write_json(self.path, {"version": MANIFEST_VERSION, "cases": self.cases})

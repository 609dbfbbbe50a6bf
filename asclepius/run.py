"""The run directory: where each stage's artifacts live, and the manifest that says which stages are done.

A run is a local path or any pyarrow filesystem URI (s3://bucket/run, gs://...). `<run>/manifest.json` holds, for
each stage, the config hash and input fingerprints it ran with, row counts, timings and costs. A stage whose entry
is `complete` and whose hash and fingerprints match is skipped; anything else runs again.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RunDir:
    fs: pafs.FileSystem
    root: str  # path inside `fs`, no trailing slash
    uri: str  # what the user gave, for messages

    @classmethod
    def open(cls, uri: str) -> "RunDir":
        fs, root = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), _abspath(uri))
        root = root.rstrip("/") or "/"
        fs.create_dir(root, recursive=True)
        return cls(fs=fs, root=root, uri=uri)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def stage_dir(self, stage: str) -> str:
        return self.path(stage)

    # ------------------------------------------------------------------------------------------- manifest
    def read_manifest(self) -> dict[str, Any]:
        try:
            with self.fs.open_input_stream(self.path(MANIFEST)) as f:
                return json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return {"stages": {}}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        # Write to a temporary name, then move: a crash mid-write never leaves a truncated manifest behind.
        tmp = self.path(f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
        self.fs.move(tmp, self.path(MANIFEST))

    def stage_entry(self, stage: str) -> dict[str, Any] | None:
        return self.read_manifest()["stages"].get(stage)

    def is_complete(self, stage: str, config_hash: str, inputs: dict[str, Any]) -> bool:
        entry = self.stage_entry(stage)
        return bool(
            entry
            and entry.get("status") == "complete"
            and entry.get("config_hash") == config_hash
            and entry.get("inputs") == inputs
        )

    def skip_if_complete(self, stage: str, config_hash: str, inputs: dict[str, Any], force: bool = False) -> dict | None:
        """The stage's recorded entry marked `skipped` if it is complete for these inputs and config, else None."""
        if not force and self.is_complete(stage, config_hash, inputs):
            return {**self.stage_entry(stage), "skipped": True}
        return None

    def record_stage(self, stage: str, entry: dict[str, Any]) -> None:
        manifest = self.read_manifest()
        manifest.setdefault("stages", {})[stage] = {**entry, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.write_manifest(manifest)


def _abspath(path: str) -> str:
    import os

    return os.path.abspath(os.path.expanduser(path))


def file_fingerprint(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """Cheap identity of an input file: a changed file (size or mtime) makes the stage rerun."""
    info = fs.get_file_info(path)
    mtime = info.mtime_ns if info.mtime_ns is not None else None
    return {"path": path, "size": info.size, "mtime_ns": mtime}

"""Resumable stages: results written atomically in shards, a manifest when a stage is complete.

A long stage (sampling, judging, meta-judging, ...) runs over a list of items in shards of fixed
size. Each shard's records go to ``<stage dir>/shard_00000.jsonl`` through a temporary file and an
atomic rename, so a killed run loses at most the shard in flight. When all shards exist the stage
writes ``manifest.json``; a restarted run returns the stored records of a finished stage without
running anything, and runs only the missing shards of an unfinished one.

Every stage records a *fingerprint* of what determines its results (the items and the settings
that matter). A restart whose fingerprint differs stops with a message instead of mixing results
of two configurations.

Shards must be deterministic functions of their items and their shard index (the callers derive
their rng from the shard index), so a resumed run produces the same records as an uninterrupted
one.

Multi-process runs (``models.distributed``): every process runs every shard (the computations are
SPMD over one global mesh and their outputs are gathered to every process), and only process 0
writes. What is finished (the manifest, the missing shards) is read by process 0 and broadcast, so
every process skips the same stages and shards, however late the others' view of the directory
is. Stored shards are read by every process, so the run directory must be on a filesystem every
host sees (as orbax checkpoints require anyway). ``write_json_atomic`` / ``write_jsonl_atomic`` /
``write_text_atomic`` (the project's one atomic file writer: a per-process temporary name, fsync,
``os.replace``) write only on process 0; ``Stage.run`` and ``Stage.finish`` return on every process
only once process 0 has written, so files written before them can be read after them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import IO, Any, Callable, Iterable, Optional, Sequence, TypeVar

from tqdm.auto import tqdm

from models import distributed

T = TypeVar("T")
Record = dict[str, Any]


class StageMismatch(ValueError):
    """A stage directory holds results made with other inputs or settings."""


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _write_atomic(path: str, write: Callable[[IO[str]], Any], writer: Optional[bool]) -> None:
    """Every atomic write of the project: ``write(f)`` into ``<path>.tmp.<pid>`` (a name no other
    process uses), flushed and fsynced, then renamed over ``path`` with ``os.replace``, so a reader
    sees the old file or the new one, never a part. ``writer`` (default: process 0 of the run) says
    whether this process writes; the others return at once, so run outputs have a single writer on
    multi-process runs."""
    if not (distributed.is_primary() if writer is None else writer):
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str, *, writer: Optional[bool] = None) -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`_write_atomic`)."""
    _write_atomic(path, lambda f: f.write(text), writer)


def write_json_atomic(path: str, obj: Any, *, writer: Optional[bool] = None) -> None:
    """Writes ``obj`` as indented JSON to ``path`` atomically (see :func:`_write_atomic`)."""
    _write_atomic(path, lambda f: json.dump(obj, f, indent=1, default=str), writer)


def write_jsonl_atomic(path: str, records: Iterable[Record], *, writer: Optional[bool] = None) -> None:
    """Writes one JSON object per line to ``path`` atomically (see :func:`_write_atomic`)."""
    _write_atomic(path, lambda f: f.writelines(json.dumps(r, default=_jsonable) + "\n" for r in records), writer)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def read_jsonl(path: str) -> list[Record]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Stage:
    """One stage of one iteration, stored in ``directory``.

    ``writer`` (default: process 0 of the run) says whether this process writes the stage's files.
    """

    def __init__(self, directory: str, name: str, *, fingerprint_of: Any = None, writer: Optional[bool] = None):
        self.dir = directory
        self.name = name
        self.fingerprint = fingerprint(fingerprint_of)
        self.writer = distributed.is_primary() if writer is None else writer  # on multi-process runs only process 0 writes
        self.manifest_path = os.path.join(directory, "manifest.json")

    def _read_manifest(self) -> Optional[dict]:
        if not os.path.exists(self.manifest_path):
            return None
        with open(self.manifest_path) as f:
            return json.load(f)

    def _manifest(self) -> Optional[dict]:
        """The manifest as process 0 sees it, on every process."""
        return distributed.broadcast_json(self._read_manifest() if distributed.is_primary() else None)

    def _check(self, manifest_or_meta: dict) -> None:
        if manifest_or_meta.get("fingerprint") != self.fingerprint:
            raise StageMismatch(
                f"{self.dir}: stage '{self.name}' was produced with other inputs or settings "
                f"(fingerprint {manifest_or_meta.get('fingerprint')} != {self.fingerprint}); "
                "resume with the same config, or use a new --out directory"
            )

    @property
    def done(self) -> bool:
        m = self._manifest()
        if m is None:
            return False
        self._check(m)
        return True

    def _shard_path(self, i: int) -> str:
        return os.path.join(self.dir, f"shard_{i:05d}.jsonl")

    def _missing_shards(self, n_shards: int) -> tuple[Optional[dict], list[int]]:
        """``(stage.json, missing shard indices)`` as process 0 sees them, on every process."""

        def look() -> dict:
            meta_path = os.path.join(self.dir, "stage.json")
            meta = None
            if os.path.exists(meta_path):
                with open(meta_path) as f:
                    meta = json.load(f)
            return {"meta": meta, "todo": [i for i in range(n_shards) if not os.path.exists(self._shard_path(i))]}

        seen = distributed.broadcast_json(look() if distributed.is_primary() else None)
        return seen["meta"], seen["todo"]

    def run(
        self,
        items: Sequence[T],
        fn: Callable[[int, list[T]], list[Record]],
        *,
        shard_size: int,
        desc: Optional[str] = None,
        progress: bool = True,
    ) -> list[Record]:
        """Runs ``fn(shard_index, shard_items) -> records`` over missing shards; returns all records."""
        if self.done:
            return self.records()
        if self.writer:
            os.makedirs(self.dir, exist_ok=True)
        n_shards = max(1, math.ceil(len(items) / shard_size)) if items else 0
        meta, todo = self._missing_shards(n_shards)
        if meta is not None:
            self._check(meta)
        else:
            write_json_atomic(os.path.join(self.dir, "stage.json"), {"stage": self.name, "fingerprint": self.fingerprint},
                              writer=self.writer)
        t0 = time.time()
        progress = progress and distributed.is_primary()
        bar = tqdm(total=len(items), desc=desc or self.name, unit="item", disable=not progress, dynamic_ncols=True)
        bar.update(len(items) - sum(len(items[i * shard_size:(i + 1) * shard_size]) for i in todo))
        computed: dict[int, list[Record]] = {}
        for i in todo:
            chunk = list(items[i * shard_size:(i + 1) * shard_size])
            records = fn(i, chunk)
            write_jsonl_atomic(self._shard_path(i), records, writer=self.writer)
            # What a later run would read back from the shard file (lists, not tuples; plain floats).
            computed[i] = json.loads(json.dumps(records, default=_jsonable))
            bar.update(len(chunk))
        bar.close()
        write_json_atomic(self.manifest_path, {
            "stage": self.name, "fingerprint": self.fingerprint, "n_items": len(items),
            "n_shards": n_shards, "shard_size": shard_size, "seconds": round(time.time() - t0, 2),
        }, writer=self.writer)
        distributed.barrier(f"stage {self.dir} written")
        out: list[Record] = []
        for i in range(n_shards):
            out.extend(computed[i] if i in computed else read_jsonl(self._shard_path(i)))
        return out

    def records(self) -> list[Record]:
        """All records of the stage, in shard order."""
        m = self._manifest()
        n = m["n_shards"] if m else len([f for f in os.listdir(self.dir) if f.startswith("shard_")])
        out: list[Record] = []
        for i in range(n):
            out.extend(read_jsonl(self._shard_path(i)))
        return out

    def finish(self, summary: Optional[dict] = None) -> None:
        """Marks a stage without shards (e.g. training) as complete, with an optional summary.

        On a multi-process run it returns once process 0 has written the manifest (and so every
        file it wrote before)."""
        if self.writer:
            os.makedirs(self.dir, exist_ok=True)
        write_json_atomic(self.manifest_path, {
            "stage": self.name, "fingerprint": self.fingerprint, "n_shards": 0, **(summary or {}),
        }, writer=self.writer)
        distributed.barrier(f"stage {self.dir} finished")

    def summary(self) -> dict:
        return self._manifest() or {}

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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
Record = dict[str, Any]


class StageMismatch(ValueError):
    """A stage directory holds results made with other inputs or settings."""


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON to ``path`` via a temporary file and ``os.replace``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: str, records: Iterable[Record]) -> None:
    """Writes one JSON object per line via a temporary file and ``os.replace``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, default=_jsonable) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def read_jsonl(path: str) -> list[Record]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Stage:
    """One stage of one iteration, stored in ``directory``."""

    def __init__(self, directory: str, name: str, *, fingerprint_of: Any = None, writer: bool = True):
        self.dir = directory
        self.name = name
        self.fingerprint = fingerprint(fingerprint_of)
        self.writer = writer  # on multi-host runs only process 0 writes
        self.manifest_path = os.path.join(directory, "manifest.json")

    def _manifest(self) -> Optional[dict]:
        if not os.path.exists(self.manifest_path):
            return None
        with open(self.manifest_path) as f:
            return json.load(f)

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
        os.makedirs(self.dir, exist_ok=True)
        meta_path = os.path.join(self.dir, "stage.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                self._check(json.load(f))
        elif self.writer:
            write_json_atomic(meta_path, {"stage": self.name, "fingerprint": self.fingerprint})
        n_shards = max(1, math.ceil(len(items) / shard_size)) if items else 0
        todo = [i for i in range(n_shards) if not os.path.exists(self._shard_path(i))]
        t0 = time.time()
        bar = tqdm(total=len(items), desc=desc or self.name, unit="item", disable=not progress, dynamic_ncols=True)
        bar.update(len(items) - sum(len(items[i * shard_size:(i + 1) * shard_size]) for i in todo))
        for i in todo:
            chunk = list(items[i * shard_size:(i + 1) * shard_size])
            records = fn(i, chunk)
            if self.writer:
                write_jsonl_atomic(self._shard_path(i), records)
            bar.update(len(chunk))
        bar.close()
        if self.writer:
            write_json_atomic(self.manifest_path, {
                "stage": self.name, "fingerprint": self.fingerprint, "n_items": len(items),
                "n_shards": n_shards, "shard_size": shard_size, "seconds": round(time.time() - t0, 2),
            })
        return self.records()

    def records(self) -> list[Record]:
        """All records of the stage, in shard order."""
        m = self._manifest()
        n = m["n_shards"] if m else len([f for f in os.listdir(self.dir) if f.startswith("shard_")])
        out: list[Record] = []
        for i in range(n):
            out.extend(read_jsonl(self._shard_path(i)))
        return out

    def finish(self, summary: Optional[dict] = None) -> None:
        """Marks a stage without shards (e.g. training) as complete, with an optional summary."""
        if self.writer:
            os.makedirs(self.dir, exist_ok=True)
            write_json_atomic(self.manifest_path, {
                "stage": self.name, "fingerprint": self.fingerprint, "n_shards": 0, **(summary or {}),
            })

    def summary(self) -> dict:
        return self._manifest() or {}

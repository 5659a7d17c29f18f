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
import shutil
import sys
import time
from typing import IO, Any, Callable, Iterable, Optional, Sequence, TypeVar

from tqdm.auto import tqdm

from models import distributed
from models.files import write_atomic

T = TypeVar("T")
Record = dict[str, Any]


class StageMismatch(ValueError):
    """A stage directory holds results made with other inputs or settings."""


class Restart:
    """What a stage does when its stored settings differ from the current ones.

    ``changed=False`` (default): stop with :class:`StageMismatch`, naming the differing keys.
    ``changed=True`` (the loop's ``--restart-changed``): delete that stage's directory and run it
    from scratch; every stage checked after it in the same run is then restarted too (``cascade``),
    since later stages are built on its results. One object is shared by the stages of a run.
    """

    def __init__(self, changed: bool = False):
        self.changed = changed
        self.cascade = False
        self.restarted: list[str] = []  # names of the stages restarted, in order
        self.fresh: set[str] = set()  # directories restarted in this run (never wiped twice)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1] if prefix else "": obj}


def _short(v: Any, limit: int = 60) -> str:
    text = json.dumps(v, default=str) if not isinstance(v, str) else v
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_differences(stored: Any, now: Any) -> str:
    """``key: <stored> (stored) vs <now> (now)`` for each differing dotted key, ``; ``-separated."""
    a, b = flatten(json.loads(json.dumps(stored, default=str))), flatten(json.loads(json.dumps(now, default=str)))
    missing = object()
    parts = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, missing), b.get(k, missing)
        if x != y:
            fx = "(absent)" if x is missing else f"{_short(x)} (stored)"
            fy = "(absent)" if y is missing else f"{_short(y)} (now)"
            parts.append(f"{k or '<value>'}: {fx} vs {fy}")
    return "; ".join(parts)


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _write_atomic(path: str, write: Callable[[IO[str]], Any], writer: Optional[bool]) -> None:
    """Every atomic write of the project (``models.files.write_atomic``): ``write(f)`` into
    ``<path>.tmp.<pid>.<random>`` (a name no other process uses), flushed and fsynced, renamed over
    ``path`` with ``os.replace``, then the directory fsynced, so a reader sees the old file or the
    new one, never a part. ``writer`` (default: process 0 of the run) says whether this process
    writes; the others return at once, so run outputs have a single writer on multi-process runs."""
    if not (distributed.is_primary() if writer is None else writer):
        return
    write_atomic(path, write)


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

    def __init__(self, directory: str, name: str, *, fingerprint_of: Any = None, writer: Optional[bool] = None,
                 restart: Optional[Restart] = None):
        self.dir = directory
        self.name = name
        self.settings = json.loads(json.dumps(fingerprint_of, default=str))  # stored to name what changed
        self.fingerprint = fingerprint(fingerprint_of)
        self.restart = restart
        self._checked = False
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

    def _difference(self, manifest_or_meta: dict) -> Optional[str]:
        """None when the stored fingerprint is the current one, else what differs (by key)."""
        if manifest_or_meta.get("fingerprint") == self.fingerprint:
            return None
        stored = manifest_or_meta.get("settings")
        if stored is not None:
            return describe_differences(stored, self.settings) or "the stored settings differ"
        return f"fingerprint {manifest_or_meta.get('fingerprint')} != {self.fingerprint}"

    def _check(self, manifest_or_meta: dict) -> None:
        what = self._difference(manifest_or_meta)
        if what is not None:
            raise StageMismatch(
                f"{self.dir}: stage '{self.name}' was produced with other inputs or settings ({what}); resume "
                "with the same config, rerun with --restart-changed to redo this stage and the ones after it, "
                "or use a new --out directory"
            )

    def check(self) -> Optional[dict]:
        """Compares the stored settings (``manifest.json``, else ``stage.json``) with the current ones
        and returns the manifest (None while unfinished). A difference is a :class:`StageMismatch`
        naming the differing keys, or, under ``Restart(changed=True)``, the stage directory is
        deleted and the stage starts over. Once a stage has restarted, the stages checked after it
        in the same run restart too. Writes ``stage.json`` for a stage that has not started."""
        first, self._checked = not self._checked, True
        r = self.restart
        if first and r is not None and r.cascade and self.dir not in r.fresh and self._exists():
            self._wipe("a stage before it restarted")
        m = self._manifest()
        seen = m if m is not None else distributed.broadcast_json(self._read_meta() if distributed.is_primary() else None)
        if seen is not None:
            what = self._difference(seen)
            if what is not None and r is not None and r.changed:
                self._wipe(what)
                m = seen = None
            elif what is not None:
                self._check(seen)
        if seen is None:
            if r is not None:
                r.fresh.add(self.dir)
            if self.writer:
                os.makedirs(self.dir, exist_ok=True)
            write_json_atomic(os.path.join(self.dir, "stage.json"),
                              {"stage": self.name, "fingerprint": self.fingerprint, "settings": self.settings},
                              writer=self.writer)
            distributed.barrier(f"stage {self.dir} started")
        return m

    def _exists(self) -> bool:
        return bool(distributed.broadcast_json(os.path.isdir(self.dir) if distributed.is_primary() else None))

    def _read_meta(self) -> Optional[dict]:
        path = os.path.join(self.dir, "stage.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _wipe(self, why: str) -> None:
        print(f"{self.dir}: restarting stage '{self.name}' from scratch ({why})", file=sys.stderr)
        if self.writer:
            shutil.rmtree(self.dir, ignore_errors=True)
        distributed.barrier(f"stage {self.dir} wiped")
        assert self.restart is not None
        self.restart.cascade = True
        self.restart.fresh.add(self.dir)
        self.restart.restarted.append(self.name)

    @property
    def done(self) -> bool:
        if self.restart is not None and not self._checked:
            return self.check() is not None
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
        if self.check() is not None:
            return self.records()
        n_shards = max(1, math.ceil(len(items) / shard_size)) if items else 0
        _, todo = self._missing_shards(n_shards)
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
            "stage": self.name, "fingerprint": self.fingerprint, "settings": self.settings, "n_items": len(items),
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
            "stage": self.name, "fingerprint": self.fingerprint, "settings": self.settings, "n_shards": 0,
            **(summary or {}),
        }, writer=self.writer)
        distributed.barrier(f"stage {self.dir} finished")

    def summary(self) -> dict:
        """The manifest without the stored settings: the stage's summary numbers."""
        m = dict(self._manifest() or {})
        m.pop("settings", None)
        return m

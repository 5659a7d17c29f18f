"""Where the actor's instruction prompts come from, and which prompts each iteration uses.

Every loader returns a list of prompt records, plain dicts with at least::

    {"id": str, "prompt": str}          # plus "category" when known and "source" ("file:line")

Sources: :func:`load_seed_prompts` (the project's own ~700 prompts, shipped as package data),
:func:`load_prompt_file` (a user's JSONL file or JSON list, e.g. AlpacaEval's evaluation set; bad records
are reported as ``file:line`` and skipped)
and :func:`load_tfds_prompts` (TensorFlow Datasets, behind the optional ``tfds`` extra).

Two deterministic selections keep evaluation honest:

- :func:`split_prompts` puts each prompt in train or held-out by a hash of its normalised text,
  so a prompt's side never depends on the order of the file or on which other prompts exist;
  the same text under two ids cannot land on both sides.
- :func:`iteration_prompts` gives iteration t its own slice of a seeded permutation of the train
  prompts: disjoint across iterations until the pool runs out, then a fresh permutation (logged).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

logger = logging.getLogger(__name__)

Prompt = dict[str, Any]

SEED_PACKAGE = "metajudge.prompt_data"
SEED_FILE = "seed_prompts.jsonl"
TFDS_FIX = 'pip install -e ".[tfds]"'


class PromptFileError(ValueError):
    """A prompt file that is missing or holds no usable prompt (the message names the file)."""


# ----------------------------------------------------------------------------- helpers


def normalise_prompt(text: str) -> str:
    """Case-folded text with runs of whitespace collapsed: the identity used for hashing."""
    return " ".join(text.casefold().split())


def _unit_hash(*parts: object) -> float:
    """A number in [0, 1) from SHA-256 of the parts: stable across runs, machines and Pythons."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _content_id(text: str) -> str:
    return "sha-" + hashlib.sha256(normalise_prompt(text).encode("utf-8")).hexdigest()[:12]


def _prompt_from_record(rec: dict, field: str) -> tuple[Optional[str], Optional[str]]:
    """(prompt, None) or (None, problem) for one JSON object."""
    if field in rec:
        value = rec[field]
        if not isinstance(value, str) or not value.strip():
            return None, f"field {field!r} must be a non-empty string"
        return value, None
    if "messages" in rec:
        messages = rec["messages"]
        if not isinstance(messages, list):
            return None, "'messages' must be a list"
        for msg in reversed(messages):
            if isinstance(msg, dict) and msg.get("role") == "user":
                content = msg.get("content")
                if not isinstance(content, str) or not content.strip():
                    return None, "last user message must have non-empty string content"
                return content, None
        return None, "'messages' has no user turn"
    return None, f"no {field!r} string and no 'messages' list"


def _record_id(rec: dict, prompt: str) -> tuple[Optional[str], Optional[str]]:
    if "id" not in rec:
        return _content_id(prompt), None
    value = rec["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        return None, "'id' must be a non-empty string or an integer"
    return str(value), None


# ----------------------------------------------------------------------------- loaders


def load_seed_prompts() -> list[Prompt]:
    """The project's seed prompts (``metajudge/prompt_data/seed_prompts.jsonl``), in file order.

    Each record is ``{"id": "seed-0001", "prompt": ..., "category": ..., "source": ...}``.
    The file is package data, so this works from a checkout and from an installed wheel.
    """
    text = importlib.resources.files(SEED_PACKAGE).joinpath(SEED_FILE).read_text(encoding="utf-8")
    prompts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rec = json.loads(line)
            prompts.append({**rec, "source": f"{SEED_FILE}:{lineno}"})
    return prompts


def _jsonl_records(path: str) -> Iterator[tuple[str, Any, Optional[str]]]:
    """``(where, record, problem)`` per non-blank line of a JSONL file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, None, f"invalid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line), None
            except json.JSONDecodeError as e:
                yield where, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _records(path: str) -> Iterator[tuple[str, Any, Optional[str]]]:
    """``(where, record, problem)`` of a prompt file: the elements of one JSON list when the file
    is one (its first non-blank character is ``[`` and it parses whole), else its JSONL lines."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.lstrip().startswith(b"["):
        try:
            records = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            records = None  # JSONL whose first line is a list: read line by line below
        if isinstance(records, list):
            return ((f"{path}[{i}]", rec, None) for i, rec in enumerate(records))
    return _jsonl_records(path)


def load_prompt_file(path: str | os.PathLike, *, field: str = "prompt") -> list[Prompt]:
    """Read a user's prompt file: JSONL (one object per line), or one JSON list of objects such
    as AlpacaEval's evaluation set (its 805 records, each with ``instruction`` and ``dataset``).

    A record is an object with a non-empty string under ``field`` (or, when it has no ``field``,
    under ``instruction``, AlpacaEval's name), or a chat ``messages`` list whose last user turn is
    the prompt. ``id`` is kept when given (string or integer), otherwise derived from the prompt's
    normalised text; ``category`` and ``dataset`` are kept when they are strings. Invalid UTF-8 or
    JSON on a line, a missing or empty prompt, a bad or repeated id: the record is skipped and one
    warning line gives the count and the first few ``file:line: problem`` (``file[index]`` in a
    JSON list). Blank lines are ignored.

    Raises:
        PromptFileError: the file does not exist, or no valid prompt remains.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PromptFileError(f"prompt file not found: {path}")
    items = _records(path)
    prompts: list[Prompt] = []
    bad: list[str] = []
    first_of_id: dict[str, str] = {}
    for where, rec, problem in items:
        prompt = pid = None
        if problem is None and not isinstance(rec, dict):
            problem = "a record must be a JSON object"
        if problem is None:
            key = field if field in rec or "instruction" not in rec else "instruction"
            prompt, problem = _prompt_from_record(rec, key)
        if problem is None:
            pid, problem = _record_id(rec, prompt)
        if problem is None and pid in first_of_id:
            problem = f"duplicate id {pid!r} (first seen at {first_of_id[pid]})"
        if problem is not None:
            bad.append(f"{where}: {problem}")
            continue
        first_of_id[pid] = where
        record: Prompt = {"id": pid, "prompt": prompt, "source": where}
        for extra in ("category", "dataset"):
            if isinstance(rec.get(extra), str):
                record[extra] = rec[extra]
        prompts.append(record)
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        logger.warning(
            "%s: skipped %d invalid prompt record(s), kept %d: %s%s",
            path, len(bad), len(prompts), "; ".join(bad[:3]), more,
        )
    if not prompts:
        detail = f"; first problem: {bad[0]}" if bad else " (the file is empty)"
        raise PromptFileError(f"{path}: no valid prompts ({len(bad)} invalid record(s)){detail}")
    return prompts


def _feature(example: dict, field: str) -> Any:
    value: Any = example
    for part in field.split("/"):
        if not isinstance(value, dict) or part not in value:
            keys = sorted(value) if isinstance(value, dict) else []
            raise KeyError(f"feature {field!r} not found (available at this level: {keys})")
        value = value[part]
    return value


def load_tfds_prompts(
    name: str,
    split: str,
    *,
    field: str = "prompt",
    limit: Optional[int] = None,
    data_dir: Optional[str] = None,
) -> list[Prompt]:
    """Prompts from a TensorFlow Datasets dataset (needs the optional ``tfds`` extra).

    ``field`` names the text feature (``"a/b"`` for a nested one); bytes are decoded as UTF-8.
    Examples whose text is empty are skipped. At most ``limit`` examples are read. Ids are
    ``"{name}/{split}/{index}"``.

    Raises:
        ImportError: tensorflow_datasets is not installed (the message gives the pip command).
        KeyError: ``field`` is not a feature of the dataset.
        PromptFileError: no non-empty prompt was found.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"load_tfds_prompts needs TensorFlow Datasets, which is not installed; "
            f"install the optional extra with: {TFDS_FIX}"
        ) from e
    ds = tfds.load(name, split=split, data_dir=data_dir)
    if limit is not None:
        ds = ds.take(limit)
    prompts: list[Prompt] = []
    for index, example in enumerate(tfds.as_numpy(ds)):
        value = _feature(example, field)
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        if isinstance(text, str) and text.strip():
            pid = f"{name}/{split}/{index}"
            prompts.append({"id": pid, "prompt": text, "source": f"tfds:{pid}"})
    if not prompts:
        raise PromptFileError(f"tfds dataset {name!r} split {split!r}: no non-empty {field!r} found")
    return prompts


# ----------------------------------------------------------------------------- selection


def split_prompts(
    prompts: Sequence[Prompt], *, heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Prompt], list[Prompt]]:
    """(train, heldout): a prompt is held out iff ``u(seed, text) < heldout_fraction``.

    ``u`` is a SHA-256 hash of the seed and the prompt's normalised text mapped to [0, 1), so a
    prompt's side is the same whatever the order of ``prompts`` and whichever other prompts are
    present, and equal texts always share a side. The held-out share is ``heldout_fraction`` in
    expectation, not exactly. Both lists keep the input order.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    train: list[Prompt] = []
    heldout: list[Prompt] = []
    for p in prompts:
        u = _unit_hash("split", seed, normalise_prompt(p["prompt"]))
        (heldout if u < heldout_fraction else train).append(p)
    return train, heldout


def _unique_by_text(prompts: Iterable[Prompt]) -> list[Prompt]:
    """One record per normalised text (the smallest id), so the choice ignores input order."""
    best: dict[str, Prompt] = {}
    for p in prompts:
        key = normalise_prompt(p["prompt"])
        if key not in best or str(p["id"]) < str(best[key]["id"]):
            best[key] = p
    return list(best.values())


def iteration_prompts(
    train_prompts: Sequence[Prompt], iteration: int, n: int, seed: int = 0
) -> list[Prompt]:
    """The ``n`` prompts of iteration ``iteration`` (1-based, as in the papers: M_t -> M_{t+1}).

    The pool (train prompts, one per distinct text) is ordered by a seeded hash of each text,
    which fixes a permutation independent of input order; iteration t takes slice t of it. With
    ``k = len(pool) // n`` slices per pass, iterations 1..k are pairwise disjoint; iteration
    ``t > k`` starts pass ``(t - 1) // k`` over a fresh permutation (re-using prompts, with a
    logged warning). Deterministic in (pool, iteration, n, seed).
    """
    if iteration < 1:
        raise ValueError(f"iteration is 1-based, got {iteration}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    pool = _unique_by_text(train_prompts)
    if n > len(pool):
        raise ValueError(
            f"asked for {n} prompts per iteration but only {len(pool)} distinct train prompts exist"
        )
    per_pass = len(pool) // n
    pass_index, slot = divmod(iteration - 1, per_pass)
    if pass_index > 0:
        logger.warning(
            "iteration %d: %d distinct train prompts give only %d disjoint iterations of %d; "
            "re-using prompts (pass %d over a new permutation)",
            iteration, len(pool), per_pass, n, pass_index + 1,
        )

    def rank(p: Prompt) -> tuple[float, str]:
        return _unit_hash("iter", seed, pass_index, normalise_prompt(p["prompt"])), str(p["id"])

    order = sorted(pool, key=rank)
    return order[slot * n : (slot + 1) * n]

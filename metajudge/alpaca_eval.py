"""AlpacaEval 2 files: annotations in, instruction difficulty γ in and out, one results row per model.

The numbers themselves are :mod:`metajudge.evaluate`'s (:func:`~metajudge.evaluate.summarize`,
:func:`~metajudge.evaluate.instruction_difficulty`); this module only reads, checks and writes
AlpacaEval's files.

Annotations (``annotations.json``, or ``.json.gz``): AlpacaEval writes one per model, a JSON list
with one record per instruction in AlpacaEval's instruction order. The fields read are
``instruction``, ``output_1`` / ``generator_1`` (the baseline), ``output_2`` / ``generator_2``
(the model), ``preference`` and, when present, ``annotator``. ``preference`` is a number or a
numeric string in [1, 2]: 1 = the baseline wins, 2 = the model wins, so the model's win
probability is ``preference - 1``; 0 is AlpacaEval's old code for a tie and reads as 1.5. A record
with no preference (null, NaN, empty string) is a missing judgment: AlpacaEval leaves it out of
the win rate and the LC fit, and so does this module by default (counted in ``n_missing``;
``on_missing="error"`` refuses it instead). Anything else wrong raises ``ValueError`` naming the
file and the row (0-based, AlpacaEval's ``index``). Lengths are characters, ``len(output)``, as
AlpacaEval measures them.

Instruction difficulty CSV: AlpacaEval's layout, header ``index,instruction_difficulty``, one row
per instruction, ``index`` = the 0-based row of the annotation files.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike

from metajudge.evaluate import DIFFICULTY_L2, instruction_difficulty, summarize
from metajudge.stages import write_text_atomic

DIFFICULTY_HEADER = ("index", "instruction_difficulty")
_FIELDS = ("instruction", "output_1", "output_2", "generator_1", "generator_2", "preference")


@dataclass(frozen=True)
class ModelAnnotations:
    """One model's annotations against a baseline, rows in the file's (AlpacaEval's) order.

    ``preferences[i]`` = P(model wins on instruction i) = preference - 1, NaN where the judgment is
    missing; ``model_lengths`` / ``baseline_lengths`` = len(output_2) / len(output_1) in characters.
    """

    path: str
    model: str
    baseline: str
    annotator: Optional[str]
    instructions: tuple[str, ...]
    preferences: np.ndarray
    model_lengths: np.ndarray
    baseline_lengths: np.ndarray

    @property
    def judged(self) -> np.ndarray:
        """Boolean mask of the rows with a judgment."""
        return ~np.isnan(self.preferences)

    @property
    def n_missing(self) -> int:
        return int(np.isnan(self.preferences).sum())


def _load_json(path: str) -> Any:
    """The JSON in ``path``, gunzipped first when the file starts with gzip's magic bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON annotations file ({e})") from None


def _win_probability(value: Any, where: str) -> float:
    """preference -> P(model wins) = preference - 1 (0 -> tie 0.5); NaN for a missing judgment."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        raise ValueError(f"{where}: preference {value!r} is not a number in [1, 2]")
    if isinstance(value, str):
        if value.strip() == "":
            return math.nan
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where}: preference {value!r} is not a number in [1, 2]") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"{where}: preference {value!r} is not a number in [1, 2]")
    value = float(value)
    if math.isnan(value):
        return math.nan
    if value == 0.0:  # AlpacaEval's old code for a tie
        return 0.5
    if not 1.0 <= value <= 2.0:
        raise ValueError(f"{where}: preference {value!r} is outside [1, 2] (1 = baseline wins, 2 = model wins)")
    return value - 1.0


def read_annotations(path: str, *, on_missing: str = "skip") -> ModelAnnotations:
    """Read and check one model's ``annotations.json`` / ``.json.gz`` (module docstring).

    Errors (``ValueError``, naming the file and the row): not a JSON list of records; a record
    without one of instruction, output_1, output_2, generator_1, generator_2, preference; an output
    or name that is not a string; a preference that is not a number in [1, 2] (or 0); a second
    baseline (generator_1), model (generator_2) or annotator within the file; a missing preference
    when ``on_missing="error"``. With ``on_missing="skip"`` (default, as AlpacaEval) a missing
    preference is NaN in ``preferences`` and counted in ``n_missing``.
    """
    if on_missing not in ("skip", "error"):
        raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
    records = _load_json(path)
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of annotation records")
    names: dict[str, Optional[str]] = {"generator_1": None, "generator_2": None, "annotator": None}
    instructions, prefs, lm, lb = [], [], [], []
    for i, rec in enumerate(records):
        where = f"{path}, row {i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in _FIELDS if k not in rec]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        for key in ("instruction", "output_1", "output_2", "generator_1", "generator_2"):
            if not isinstance(rec[key], str):
                raise ValueError(f"{where}: {key} is {rec[key]!r}, expected a string")
        for key in ("generator_1", "generator_2", "annotator"):
            if key not in rec:
                continue
            if names[key] is None:
                names[key] = rec[key]
            elif rec[key] != names[key]:
                what = {"generator_1": "baseline", "generator_2": "model", "annotator": "annotator"}[key]
                raise ValueError(
                    f"{where}: {key} is {rec[key]!r} but earlier rows have {names[key]!r}: "
                    f"one file must hold one {what}"
                )
        p = _win_probability(rec["preference"], where)
        if math.isnan(p) and on_missing == "error":
            raise ValueError(f"{where}: no preference ({rec['preference']!r})")
        instructions.append(rec["instruction"])
        prefs.append(p)
        lm.append(len(rec["output_2"]))
        lb.append(len(rec["output_1"]))
    preferences = np.asarray(prefs, dtype=np.float64)
    if np.isnan(preferences).all():
        raise ValueError(f"{path}: no row has a preference")
    return ModelAnnotations(
        path=str(path),
        model=str(names["generator_2"]),
        baseline=str(names["generator_1"]),
        annotator=names["annotator"],
        instructions=tuple(instructions),
        preferences=preferences,
        model_lengths=np.asarray(lm, dtype=np.float64),
        baseline_lengths=np.asarray(lb, dtype=np.float64),
    )


def check_same_prompts(annotations: Sequence[ModelAnnotations]) -> None:
    """``ValueError`` unless every file has the first one's rows: same number, same instructions in
    the same order, the same baseline (name and output length per row) and annotator, and no model
    twice. A frozen γ only applies to models judged this way."""
    if not annotations:
        raise ValueError("no annotation files")
    ref = annotations[0]
    seen = {ref.model: ref.path}
    for a in annotations[1:]:
        if len(a.instructions) != len(ref.instructions):
            raise ValueError(f"{a.path}: {len(a.instructions)} rows, but {ref.path} has {len(ref.instructions)}")
        if a.baseline != ref.baseline:
            raise ValueError(f"{a.path}: baseline {a.baseline!r}, but {ref.path} has {ref.baseline!r}")
        if a.annotator != ref.annotator:
            raise ValueError(f"{a.path}: annotator {a.annotator!r}, but {ref.path} has {ref.annotator!r}")
        if a.instructions != ref.instructions:
            i = next(k for k, (x, y) in enumerate(zip(a.instructions, ref.instructions)) if x != y)
            raise ValueError(f"{a.path}, row {i}: instruction differs from {ref.path} (instructions in another order?)")
        if not np.array_equal(a.baseline_lengths, ref.baseline_lengths):
            i = int(np.flatnonzero(a.baseline_lengths != ref.baseline_lengths)[0])
            raise ValueError(f"{a.path}, row {i}: baseline output differs from {ref.path}'s")
        if a.model in seen:
            raise ValueError(f"{a.path}: model {a.model!r} also in {seen[a.model]}")
        seen[a.model] = a.path


def annotation_files(directory: str) -> list[str]:
    """The annotation files under ``directory``, sorted: every ``annotations.json[.gz]`` below it
    (AlpacaEval's ``results/<model>/<annotator>/`` layout) if there is one, else every
    ``*.json[.gz]`` directly in it (one file per model)."""
    nested = sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(directory)
        for f in files
        if f in ("annotations.json", "annotations.json.gz")
    )
    if nested:
        return nested
    flat = sorted(
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if f.endswith((".json", ".json.gz")) and os.path.isfile(os.path.join(directory, f))
    )
    if not flat:
        raise ValueError(f"{directory}: no annotations.json[.gz] below it and no *.json[.gz] in it")
    return flat


def read_annotation_set(paths: Sequence[str], *, on_missing: str = "skip") -> list[ModelAnnotations]:
    """:func:`read_annotations` for every path, then :func:`check_same_prompts`."""
    annotations = [read_annotations(p, on_missing=on_missing) for p in paths]
    check_same_prompts(annotations)
    return annotations


def fit_difficulty(annotations: Sequence[ModelAnnotations], *, l2: float = DIFFICULTY_L2) -> np.ndarray:
    """γ, one per row, fitted jointly over these models by
    :func:`metajudge.evaluate.instruction_difficulty` with their lengths (missing judgments left
    out). Use many models (AlpacaEval used its whole leaderboard; 16 suffice on the fixture)."""
    check_same_prompts(annotations)
    return instruction_difficulty(
        np.stack([a.preferences for a in annotations]),
        np.stack([a.model_lengths for a in annotations]),
        np.stack([a.baseline_lengths for a in annotations]),
        l2=l2,
    )


def summarize_annotations(
    annotations: ModelAnnotations,
    difficulty: Optional[ArrayLike] = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`metajudge.evaluate.summarize` of one model's judged rows, plus ``model``,
    ``baseline``, ``annotator`` and ``n_missing``.

    With ``difficulty`` (γ of these rows, e.g. :func:`read_difficulty_csv`) ``lc_win_rate`` is
    AlpacaEval's LC (``lc_kind`` "AlpacaEval LC"), else the length-only LC ("length-only LC").
    Rates are fractions (AlpacaEval's leaderboard shows percent). Missing judgments are dropped
    before the fit; AlpacaEval keeps their rows in the length scale and in the final average, a
    difference that vanishes when nothing is missing.
    """
    judged = annotations.judged
    gamma = None
    if difficulty is not None:
        gamma = np.asarray(difficulty, dtype=np.float64)
        if gamma.shape != annotations.preferences.shape:
            raise ValueError(
                f"{annotations.path}: {annotations.preferences.size} rows but {gamma.size} instruction "
                "difficulties: γ must come from annotations of the same instructions"
            )
        gamma = gamma[judged]
    row = summarize(
        annotations.preferences[judged],
        annotations.model_lengths[judged],
        annotations.baseline_lengths[judged],
        n_boot=n_boot,
        seed=seed,
        difficulty=gamma,
    )
    return {
        "model": annotations.model,
        "baseline": annotations.baseline,
        "annotator": annotations.annotator,
        **row,
        "n_missing": annotations.n_missing,
    }


def write_difficulty_csv(path: str, difficulty: ArrayLike) -> None:
    """Write γ as AlpacaEval's ``index,instruction_difficulty`` CSV, rows 0..N-1, each value as
    Python's shortest exact decimal (``repr``), so :func:`read_difficulty_csv` gives back the same
    floats bit for bit."""
    gamma = np.asarray(difficulty, dtype=np.float64)
    if gamma.ndim != 1 or gamma.size == 0 or not np.all(np.isfinite(gamma)):
        raise ValueError(f"difficulty must be a non-empty 1-D array of finite numbers, got shape {gamma.shape}")
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(DIFFICULTY_HEADER)
    w.writerows((i, repr(float(g))) for i, g in enumerate(gamma))
    write_text_atomic(path, text.getvalue())


def read_difficulty_csv(path: str, *, n: Optional[int] = None) -> np.ndarray:
    """γ from an ``index,instruction_difficulty`` CSV (ours or AlpacaEval's), ordered by index.

    ``ValueError`` naming the file and line for another header, a non-integer or repeated index, a
    value that is not a finite number, or indices that are not exactly 0..N-1; and when ``n`` is
    given and N differs.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(c.strip() for c in rows[0]) != DIFFICULTY_HEADER:
        raise ValueError(f"{path}: expected the header {','.join(DIFFICULTY_HEADER)}, got {rows[0] if rows else 'an empty file'}")
    values: dict[int, float] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"{path}, line {line}: expected 2 fields, got {len(row)}")
        try:
            index = int(row[0])
        except ValueError:
            raise ValueError(f"{path}, line {line}: index {row[0]!r} is not an integer") from None
        try:
            value = float(row[1])
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{path}, line {line}: instruction_difficulty {row[1]!r} is not a finite number")
        if index < 0 or index in values:
            raise ValueError(f"{path}, line {line}: index {index} is negative or appears twice")
        values[index] = value
    if not values:
        raise ValueError(f"{path}: no instruction difficulties")
    absent = sorted(set(range(max(values) + 1)) - set(values))
    if absent:
        raise ValueError(f"{path}: indices must be 0..N-1, but {absent[:5]}{' ...' if len(absent) > 5 else ''} are missing")
    if n is not None and len(values) != n:
        raise ValueError(f"{path}: {len(values)} instruction difficulties, expected {n} (one per annotation row)")
    return np.array([values[i] for i in range(len(values))], dtype=np.float64)


# ------------------------------------------------------------------------------- leaderboard

# AlpacaEval's leaderboard.csv names; the LC column keeps AlpacaEval's name only when it is
# AlpacaEval's LC (a frozen γ), and is renamed when it is our length-only LC, so no file mixes them.
LENGTH_ONLY_LC_COLUMN = "length_only_lc_winrate"


def leaderboard_row(summary: dict[str, Any], annotations: ModelAnnotations) -> dict[str, Any]:
    """One leaderboard row from :func:`summarize_annotations`: AlpacaEval's columns in percent
    (``win_rate``, ``standard_error`` = the standard error of the judged win probabilities with
    ddof 1, as AlpacaEval's, ``length_controlled_winrate`` or, for a length-only LC,
    ``length_only_lc_winrate``), ``avg_length`` (mean characters of the model's outputs over all
    rows, an integer as AlpacaEval writes it), then ``n_total`` and ``n_missing``."""
    p = annotations.preferences[annotations.judged]
    se = float(np.std(p, ddof=1) / np.sqrt(p.size)) if p.size > 1 else math.nan
    lc_column = ("length_controlled_winrate" if summary["lc_kind"] == "AlpacaEval LC" else LENGTH_ONLY_LC_COLUMN)
    return {
        "model": summary["model"],
        "win_rate": 100.0 * summary["win_rate"],
        "standard_error": 100.0 * se,
        lc_column: 100.0 * summary["lc_win_rate"],
        "avg_length": int(np.mean(annotations.model_lengths)),
        "n_total": int(p.size),
        "n_missing": annotations.n_missing,
    }


def leaderboard_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV text, columns in the first row's order (``model`` first), sorted by the LC
    column, highest first (AlpacaEval's order)."""
    if not rows:
        raise ValueError("no leaderboard rows")
    columns = list(rows[0])
    lc = "length_controlled_winrate" if "length_controlled_winrate" in columns else LENGTH_ONLY_LC_COLUMN
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: -r[lc]))
    return text.getvalue()


# ------------------------------------------------------------------------------------ export


def model_outputs_records(
    instructions: Sequence[str], outputs: Sequence[str], generator: str, datasets: Sequence[Optional[str]]
) -> list[dict[str, str]]:
    """AlpacaEval's ``model_outputs.json`` records: ``instruction``, ``output``, ``generator``,
    ``dataset`` (one per instruction, in the given order)."""
    if not (len(instructions) == len(outputs) == len(datasets)):
        raise ValueError(f"{len(instructions)} instructions, {len(outputs)} outputs and {len(datasets)} datasets")
    return [{"instruction": i, "output": o, "generator": generator, "dataset": d or "metajudge"}
            for i, o, d in zip(instructions, outputs, datasets)]


def annotation_records(
    instructions: Sequence[str],
    baseline_outputs: Sequence[str],
    model_outputs: Sequence[str],
    win_probabilities: ArrayLike,
    *,
    baseline: str,
    model: str,
    annotator: str,
    datasets: Sequence[Optional[str]],
) -> list[dict[str, Any]]:
    """AlpacaEval's ``annotations.json`` records for one model against the baseline:
    ``output_1`` / ``generator_1`` the baseline, ``output_2`` / ``generator_2`` the model,
    ``preference`` = 1 + P(model wins) in [1, 2] (module docstring), so :func:`read_annotations`
    gives the same win probabilities back."""
    p = np.asarray(win_probabilities, dtype=np.float64)
    n = len(instructions)
    if not (len(baseline_outputs) == len(model_outputs) == p.size == len(datasets) == n):
        raise ValueError("instructions, outputs, win probabilities and datasets must have one entry per instruction")
    if not np.all((p >= 0.0) & (p <= 1.0)):
        raise ValueError("win probabilities must lie in [0, 1]")
    return [
        {"instruction": instructions[i], "dataset": datasets[i] or "metajudge",
         "output_1": baseline_outputs[i], "generator_1": baseline,
         "output_2": model_outputs[i], "generator_2": model,
         "annotator": annotator, "preference": 1.0 + float(p[i])}
        for i in range(n)
    ]

"""AlpacaEval's files: a run's evaluations exported as them (``--export``), a leaderboard read from them (``--alpaca-eval``).

Export (``python -m experiments.evaluate --run DIR --export OUT``): each evaluated iteration as
AlpacaEval's ``OUT/<run>_iter<t>/model_outputs.json`` and our judge's order-averaged preferences as
``OUT/<run>_iter<t>/<judge>/annotations.json`` (``preference`` = 1 + P(model wins)), plus the
baseline's ``model_outputs.json``.

Leaderboard (``python -m experiments.evaluate --alpaca-eval DIR``): reads every model's ``annotations.json[.gz]`` under ``DIR`` (AlpacaEval's ``results/<model>/<annotator>/``
layout, or one file per model directly in ``DIR``; ``metajudge.alpaca_eval``), checks that they
share instructions, baseline and annotator, and gives one row per model: win rate, its standard
error, the LC win rate and the average output length, in percent as AlpacaEval shows them.

The LC column is AlpacaEval's (``length_controlled_winrate``) only with an instruction difficulty
γ: ``--difficulty FILE`` reads a frozen one (``index,instruction_difficulty``, AlpacaEval's CSV),
``--fit-difficulty OUT.csv`` fits one jointly over the models in ``DIR`` (use many models), writes
it and uses it. Without either the LC is our length-only LC, in a column named
``length_only_lc_winrate`` and labelled so in the table: it is not AlpacaEval's number.

Writes ``<out>/leaderboard.csv`` (``model`` first, then AlpacaEval's column names) and
``<out>/leaderboard.md``, and prints the table.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Optional, Sequence

from metajudge.alpaca_eval import (
    LENGTH_ONLY_LC_COLUMN,
    annotation_files,
    annotation_records,
    fit_difficulty,
    leaderboard_csv,
    leaderboard_row,
    model_outputs_records,
    read_annotation_set,
    read_difficulty_csv,
    summarize_annotations,
    write_difficulty_csv,
)
from metajudge.stages import write_json_atomic, write_text_atomic
from experiments.eval_inputs import heldout_candidates
from metajudge.trainer import UsageError


def leaderboard_table(rows: list[dict]) -> str:
    """Markdown table of leaderboard rows (percent, one decimal), in the given order; the LC
    column is headed by its kind."""
    lc_key = "length_controlled_winrate" if "length_controlled_winrate" in rows[0] else LENGTH_ONLY_LC_COLUMN
    lc_head = "AlpacaEval LC (%)" if lc_key == "length_controlled_winrate" else "length-only LC (%)"
    head = ["model", lc_head, "win rate (%)", "SE (%)", "avg length (chars)", "judged", "missing"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"], f"{r[lc_key]:.1f}", f"{r['win_rate']:.1f}", f"{r['standard_error']:.2f}",
            str(r["avg_length"]), str(r["n_total"]), str(r["n_missing"])]) + " |")
    return "\n".join(lines)


def alpaca_eval_leaderboard(
    directory: str,
    out: str,
    *,
    difficulty: Optional[str] = None,
    fit_to: Optional[str] = None,
    n_boot: int = 200,
) -> list[dict]:
    """Reads the annotations under ``directory``, writes ``out/leaderboard.{csv,md}`` (and the γ
    CSV at ``fit_to`` when given) and returns the rows, highest LC first (module doc). Bad files
    and options are ``UsageError`` naming the file."""
    if difficulty and fit_to:
        raise UsageError("give --difficulty FILE (a frozen γ) or --fit-difficulty OUT.csv (fit one here), not both")
    if not os.path.isdir(directory):
        raise UsageError(f"--alpaca-eval {directory}: no such directory")
    try:
        annotations = read_annotation_set(annotation_files(directory))
        gamma = None
        if difficulty:
            if not os.path.isfile(difficulty):
                raise UsageError(f"--difficulty {difficulty}: no such file")
            gamma = read_difficulty_csv(difficulty, n=len(annotations[0].instructions))
        elif fit_to:
            if len(annotations) < 2:
                raise UsageError(f"--fit-difficulty needs the annotations of several models (AlpacaEval used its whole "
                                 f"leaderboard), {directory} has {len(annotations)}")
            gamma = fit_difficulty(annotations)
            write_difficulty_csv(fit_to, gamma)
            print(f"instruction difficulty of {len(annotations)} models: {fit_to}", file=sys.stderr)
        rows = [leaderboard_row(summarize_annotations(a, gamma, n_boot=n_boot), a) for a in annotations]
    except ValueError as e:  # a bad annotation or difficulty file, named by path and row
        raise UsageError(str(e)) from None
    text = leaderboard_csv(rows)
    lc_key = "length_controlled_winrate" if gamma is not None else LENGTH_ONLY_LC_COLUMN
    rows = sorted(rows, key=lambda r: -r[lc_key])
    write_text_atomic(os.path.join(out, "leaderboard.csv"), text)
    a0 = annotations[0]
    note = (f"{len(rows)} models against `{a0.baseline}`, annotator `{a0.annotator}`, {len(a0.instructions)} "
            f"instructions; LC: " + ("AlpacaEval's, with the instruction difficulty "
                                     f"`{difficulty or fit_to}`" if gamma is not None else
                                     "length-only (no instruction difficulty given): not AlpacaEval's LC"))
    write_text_atomic(os.path.join(out, "leaderboard.md"), f"# Leaderboard\n\n{note}\n\n{leaderboard_table(rows)}\n")
    write_json_atomic(os.path.join(out, "config.json"), {
        "alpaca_eval": directory, "files": [a.path for a in annotations], "difficulty": difficulty,
        "fit_difficulty": fit_to, "n_boot": n_boot})
    return rows


def _file_name(name: str) -> str:
    """``name`` as one safe path component (AlpacaEval's results/<model>/<annotator>/ layout)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def export_alpaca_eval(ev: Any, iterations: Sequence[int], out: str, label: str) -> list[str]:
    """Writes each evaluated iteration in AlpacaEval's files under ``out``:
    ``<label>_iter<t>/model_outputs.json`` (the model's answers), ``<label>_iter<t>/<judge>/annotations.json``
    (our judge's order-averaged preferences against the baseline) and ``<baseline>/model_outputs.json``.
    ``python -m experiments.evaluate --alpaca-eval out`` reads them back. ``ev``: the
    ``experiments.evaluate.Evaluator`` that evaluated them. Returns the annotation paths."""
    datasets = {str(p["id"]): p.get("dataset") for p in heldout_candidates(ev.run_dir, ev.run, ev.cfg.prompts)}
    baseline_name = ev.baseline_source if ev.baseline_source != ev.run.model else f"{label}_seed"
    annotator = f"metajudge_pairwise_{_file_name(ev.judge_label)}"
    paths = []
    for t in iterations:
        pairs = ev.judged_pairs(t)
        instructions = [p["prompt"] for p in pairs]
        ds = [datasets.get(p["id"]) for p in pairs]
        model = f"{label}_iter{t}"
        write_json_atomic(os.path.join(out, _file_name(model), "model_outputs.json"),
                          model_outputs_records(instructions, [p["model"] for p in pairs], model, ds))
        path = os.path.join(out, _file_name(model), annotator, "annotations.json")
        write_json_atomic(path, annotation_records(
            instructions, [p["baseline"] for p in pairs], [p["model"] for p in pairs], [p["preference"] for p in pairs],
            baseline=baseline_name, model=model, annotator=annotator, datasets=ds))
        paths.append(path)
        if t == iterations[0]:
            write_json_atomic(os.path.join(out, _file_name(baseline_name), "model_outputs.json"),
                              model_outputs_records(instructions, [p["baseline"] for p in pairs], baseline_name, ds))
    return paths

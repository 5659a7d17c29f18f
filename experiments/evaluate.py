"""Held-out evaluation of a run's models against a baseline, judged pairwise in both orders.

    python -m experiments.evaluate --run DIR [--judge SOURCE] [--baseline SOURCE] [--prompts FILE]
                                   [--external-judge MODULE:FUNCTION] [--tag NAME] [--set key=value ...]
    python -m experiments.evaluate --compare DIR1 DIR2 ... [--out DIR] [same options]
    python -m experiments.evaluate --alpaca-eval DIR [--difficulty FILE | --fit-difficulty OUT.csv] [--out DIR]

For every finished iteration ``t`` of the run (``DIR/iter_<t>/dpo/model``), the model answers the
held-out prompts, the baseline (default: the run's seed model) answers them once per run, and a
pairwise judge (default: a frozen copy of the seed model; any ``models.load_model`` source, or an
external Python function) compares the two answers in both orders. The per-prompt preference is
the order-averaged P(model's answer is better): from the judge's next-token probabilities of
``A``/``B`` after a forced ``Winner:`` (readout ``logprob``), else from its verdicts (readout
``verdict``; a tie or an unreadable verdict counts 0.5). The table gives the win rate with a
bootstrap CI, the length-controlled win rate and the average answer length in characters
(``metajudge.evaluate``).

Held-out prompts: ``DIR/heldout_prompts.jsonl`` (the split the loop wrote once, never trained
on), or ``--prompts FILE``; any prompt whose text is also a training prompt of the run is dropped
with a warning. At most ``max_prompts`` are used, chosen by a seeded hash of their text; the
chosen ones are recorded in ``evaluate_baseline/prompts.jsonl``.

Outputs (all atomic and resumable through ``metajudge.stages``, each stage with a ``config.json``):
``DIR/evaluate_baseline/`` (the baseline's answers, generated once per run, and the chosen
``prompts.jsonl``), ``DIR/iter_<t>/evaluate/answers/`` (the model's answers),
``DIR/iter_<t>/evaluate/judge/`` (per-prompt P(A) in both orders, preference, lengths) and
``DIR/iter_<t>/evaluate/manifest.json`` (the results row); ``DIR/evaluation.{md,json,png}``. With
the run's own evaluation settings (``LoopConfig.evaluate``) the rows also go into
``DIR/metrics.json`` and ``DIR/report.md``. Other settings (another judge, baseline, prompt file,
``--set``) write under ``-<tag>`` names instead (``iter_<t>/evaluate-<tag>/``,
``evaluation-<tag>.md``; ``--tag``, or a hash of the settings), so they never mix with the run's
own; answers are shared by every judge with the same answer settings. Iterations already
evaluated are read back, not redone.

AlpacaEval's files: ``--export DIR`` (with ``--run`` / ``--compare``) also writes each evaluated
iteration as AlpacaEval's ``model_outputs.json`` and our judge's preferences as its
``annotations.json`` (``experiments.alpaca_files``); ``--alpaca-eval DIR`` reads such files (ours or
AlpacaEval's own) into a leaderboard (``experiments.alpaca_files``); ``--prompts`` also takes
AlpacaEval's evaluation set (a JSON list with ``instruction``; ``--set max_prompts=0`` for all).

External judge (``--external-judge pkg.mod:fn``): ``fn(batch: list[tuple[str, str, str]])``
receives ``(instruction, answer_a, answer_b)`` triples (each prompt in both orders) and returns
one output per triple: a probability in [0, 1] that answer A is better, or a verdict string
``"A"``, ``"B"`` or ``"tie"`` (None also counts as a tie). The module must be importable (on
``PYTHONPATH`` or in the current directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np

from experiments.cli import UsageError, apply_overrides, config_dict, run_main
from experiments.configs import EvalConfig, RunInfo
from experiments.eval_inputs import ModelPool, heldout_candidates, tokenizer_source, training_prompts
from experiments.external_judge import call_external_judge, load_external_judge
from experiments.alpaca_files import alpaca_eval_leaderboard, export_alpaca_eval, leaderboard_table
from metajudge.evaluate import both_orders, preferences_from_both_orders, select_eval_prompts, summarize, win_rate
from metajudge.prompts import DEFAULT_PAIRWISE_TEMPLATE
from metajudge.report import comparison_table, evaluation_table, write_evaluation_report, write_report
from metajudge.roles import act, pairwise_judge, shard_rng
from metajudge.stages import Stage, StageMismatch, fingerprint, write_json_atomic, write_jsonl_atomic
from metajudge.trainer import resolve_mesh
from models import distributed
from models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

EVAL_STREAM = 7001  # shard_rng stream of the evaluation (answers: (EVAL_STREAM, 1, shard); judge: 2)
BASELINE_DIR = "evaluate_baseline"
EVAL_DIR = "evaluate"


# ----------------------------------------------------------------------------------- evaluator


def _tag_suffix(tag: Optional[str]) -> str:
    return f"-{tag}" if tag else ""


def _answers_key(cfg: EvalConfig) -> dict:
    """The settings that determine the answers (model's and baseline's)."""
    return {"answer": config_dict(cfg.answer), "prompts": cfg.prompts, "max_prompts": cfg.max_prompts}


def _derived_tag(mine: dict, run_own: dict) -> Optional[str]:
    """None for the run's own settings, else a short hash of ``mine``."""
    return None if mine == run_own else fingerprint(mine)[:8]


class Evaluator:
    """Evaluates the iterations of one run with one ``EvalConfig`` (see the module doc)."""

    def __init__(
        self,
        run_dir: str,
        cfg: EvalConfig,
        run: RunInfo,
        *,
        pool: Optional[ModelPool] = None,
        tag: Optional[str] = None,
        progress: bool = True,
    ):
        self.run_dir, self.cfg, self.run, self.progress = run_dir, cfg, run, progress
        self.pool = pool or ModelPool()
        own = run.evaluate
        # Outputs of settings other than the run's own go under "-<tag>" names; answers are shared
        # by every judge, so their names depend only on what determines them.
        self.answers_suffix = _tag_suffix(_derived_tag(_answers_key(cfg), _answers_key(own)))
        self.baseline_suffix = _tag_suffix(_derived_tag({"baseline": cfg.baseline, **_answers_key(cfg)},
                                                        {"baseline": own.baseline, **_answers_key(own)}))
        self.tag = tag or _derived_tag(config_dict(dataclasses.replace(cfg, enabled=True)),
                                       config_dict(dataclasses.replace(own, enabled=True)))
        self.suffix = _tag_suffix(self.tag)
        self.baseline_source = cfg.baseline or run.model
        self.external = load_external_judge(cfg.external_judge) if cfg.external_judge else None
        self.judge_source = cfg.judge or run.model
        self.judge_label = f"external:{cfg.external_judge}" if self.external else self.judge_source
        self._prompts: Optional[list[dict]] = None
        self._baseline: Optional[list[dict]] = None
        self._settings = {k: v for k, v in config_dict(cfg).items() if k != "enabled"}

    # -------------------------------------------------------------------------- prompts
    def prompts(self) -> list[dict]:
        """The evaluation prompts: held out, never training prompts, at most ``max_prompts``."""
        if self._prompts is None:
            candidates = heldout_candidates(self.run_dir, self.run, self.cfg.prompts)
            selected, overlap = select_eval_prompts(candidates, training_prompts(self.run_dir, self.run),
                                                    max_prompts=self.cfg.max_prompts, seed=self.run.seed)
            if overlap:
                log.warning("dropped %d evaluation prompt(s) that are also training prompts of the run (first: %r)",
                            len(overlap), overlap[0]["prompt"][:80])
            if not selected:
                where = self.cfg.prompts or os.path.join(self.run_dir, "heldout_prompts.jsonl")
                raise UsageError(f"{where}: no held-out prompt left to evaluate on ({len(overlap)} overlap training "
                                 "prompts); give other prompts with --prompts FILE")
            self._prompts = [{"id": str(p["id"]), "prompt": p["prompt"]} for p in selected]
        return self._prompts

    # ------------------------------------------------------------------------- answers
    def _answer(self, stage_dir: str, name: str, fp: dict, load: Callable[[], tuple[Any, Any]], desc: str) -> list[dict]:
        stage = Stage(stage_dir, name, fingerprint_of=fp)
        loaded: list[tuple[Any, Any]] = []

        def shard(i: int, chunk: list[dict]) -> list[dict]:
            if not loaded:
                loaded.append(load())
            model, tok = loaded[0]
            outs = act(model, tok, [p["prompt"] for p in chunk], self.cfg.answer,  # answer.n is 1 (EvalConfig)
                       rng=shard_rng(self.run.seed, EVAL_STREAM, 1, i), batch_size=self.cfg.batch_size)
            return [{"id": p["id"], "prompt": p["prompt"], "answer": o[0]} for p, o in zip(chunk, outs)]

        if not stage.done:
            write_json_atomic(os.path.join(stage_dir, "config.json"), {**self._settings, **fp})
        return stage.run(self.prompts(), shard, shard_size=self.cfg.prompts_per_shard, desc=desc, progress=self.progress)

    def _answers_fp(self, source_label: str) -> dict:
        return {"source": source_label, "answer": config_dict(self.cfg.answer), "seed": self.run.seed,
                "prompts": [p["id"] for p in self.prompts()]}

    def baseline(self) -> list[dict]:
        """The baseline's answers to the evaluation prompts, generated once per run and cached."""
        if self._baseline is None:
            d = os.path.join(self.run_dir, BASELINE_DIR + self.baseline_suffix)
            fp = self._answers_fp(self.baseline_source)

            def load():
                _, model, tok = self.pool.get(self.run, self.baseline_source, policy=self.baseline_source == self.run.model)
                return model, tok

            self._baseline = self._answer(d, "evaluate_baseline", fp, load, "eval: baseline answers")
            if not os.path.exists(os.path.join(d, "prompts.jsonl")):
                write_jsonl_atomic(os.path.join(d, "prompts.jsonl"), self.prompts())
            if self.baseline_source != self.judge_source or self.external:
                self.pool.drop(self.baseline_source)
        return self._baseline

    # ---------------------------------------------------------------------------- judge
    def _judge_fp(self) -> dict:
        fp: dict[str, Any] = {"judge": self.judge_label}
        if not self.external:
            fp.update(readout=self.cfg.readout, template=fingerprint(DEFAULT_PAIRWISE_TEMPLATE))
            if self.cfg.readout == "verdict":
                fp["judge_sampling"] = config_dict(self.cfg.judge_sampling)
        return fp

    def _judge_triples(self, triples: list[tuple[str, str, str]], shard_index: int) -> tuple[np.ndarray, list[str], list[Optional[str]]]:
        if self.external:
            p_a, kinds = call_external_judge(self.external, triples, self.cfg.batch_size, f"external judge {self.cfg.external_judge}")
            return p_a, kinds, [None] * len(triples)
        _, model, tok = self.pool.get(self.run, self.judge_source, policy=self.judge_source == self.run.model)
        res = pairwise_judge(model, tok, triples, readout=self.cfg.readout, s=self.cfg.judge_sampling,
                             rng=shard_rng(self.run.seed, EVAL_STREAM, 2, shard_index), batch_size=self.cfg.batch_size)
        return np.array([r["p_a"] for r in res]), [r["kind"] for r in res], [r["text"] for r in res]

    # ------------------------------------------------------------------------ iteration
    def evaluated(self, t: int) -> Optional[dict]:
        """The stored results row of iteration ``t``, or None if it was not evaluated yet."""
        stage = self._top_stage(t)
        return stage.summary().get("result") if stage.done else None

    def _top_stage(self, t: int) -> Stage:
        fp = {"answers": self._answers_fp(f"iter_{t}/dpo/model"), "baseline": self._answers_fp(self.baseline_source),
              "judge": self._judge_fp(), "n_boot": self.cfg.n_boot, "confidence": self.cfg.confidence}
        return Stage(os.path.join(self.run_dir, f"iter_{t}", EVAL_DIR + self.suffix), "evaluate", fingerprint_of=fp)

    def _answers_dir(self, t: int) -> str:
        return os.path.join(self.run_dir, f"iter_{t}", EVAL_DIR, "answers" + self.answers_suffix)

    def _judge_stage(self, top: Stage) -> Stage:
        return Stage(os.path.join(top.dir, "judge"), "evaluate_judge", fingerprint_of={**self._judge_fp(), "answers": top.fingerprint})

    def judged_pairs(self, t: int) -> list[dict]:
        """Per evaluation prompt of the evaluated iteration ``t``, in the prompts' order: ``id``,
        ``prompt``, the ``model``'s and the ``baseline``'s answers and the judge's ``preference``
        (P(model's answer is better)), read back from the stored stages."""
        top = self._top_stage(t)
        if not top.done:
            raise UsageError(f"{self.run_dir}: iteration {t} is not evaluated with these settings")
        answers = Stage(self._answers_dir(t), "evaluate_answers", fingerprint_of=self._answers_fp(f"iter_{t}/dpo/model")).records()
        baseline = {b["id"]: b["answer"] for b in self.baseline()}
        pref = {j["id"]: j["preference"] for j in self._judge_stage(top).records()}
        return [{"id": a["id"], "prompt": a["prompt"], "model": a["answer"], "baseline": baseline[a["id"]],
                 "preference": pref[a["id"]]} for a in answers]

    def evaluate(self, t: int, model: Any = None, tokenizer: Any = None) -> dict:
        """Results row of the model after iteration ``t`` against the baseline (see the module doc).

        ``model`` / ``tokenizer``: that model if the caller holds it; else it is loaded from
        ``<run>/iter_<t>/dpo/model`` when (and only when) its answers are still missing.
        """
        top = self._top_stage(t)
        if top.done:
            return top.summary()["result"]
        d = top.dir
        baseline = self.baseline()
        source = os.path.join(self.run_dir, f"iter_{t}", "dpo", "model")

        def load():
            if model is not None:
                if tokenizer is not None:
                    return model, tokenizer
                return model, load_tokenizer(tokenizer_source(self.run, self.run.model, policy=True))
            if not os.path.isfile(os.path.join(source, "config.json")):
                raise UsageError(f"{source}: no model of iteration {t}; finish the iteration first")
            pool = ModelPool(self.pool.mesh)  # not kept: one model per iteration
            _, m, tok = pool.get(self.run, source, policy=True)
            return m, tok

        answers = self._answer(self._answers_dir(t), "evaluate_answers", self._answers_fp(f"iter_{t}/dpo/model"),
                               load, f"eval iter {t}: answers")
        by_id = {b["id"]: b for b in baseline}
        items = [{"id": a["id"], "prompt": a["prompt"], "model": a["answer"], "baseline": by_id[a["id"]]["answer"]}
                 for a in answers]
        jstage = self._judge_stage(top)

        def shard(i: int, chunk: list[dict]) -> list[dict]:
            triples = both_orders([x["prompt"] for x in chunk], [x["model"] for x in chunk], [x["baseline"] for x in chunk])
            p_a, kinds, texts = self._judge_triples(triples, i)
            pref = preferences_from_both_orders(p_a)
            out = []
            for k, x in enumerate(chunk):
                rec = {"id": x["id"], "preference": float(pref[k]), "p_a_model_first": float(p_a[2 * k]),
                       "p_a_baseline_first": float(p_a[2 * k + 1]), "kinds": [kinds[2 * k], kinds[2 * k + 1]],
                       "model_chars": len(x["model"]), "baseline_chars": len(x["baseline"])}
                if texts[2 * k] is not None:
                    rec["judgments"] = [texts[2 * k], texts[2 * k + 1]]
                out.append(rec)
            return out

        if not jstage.done:
            write_json_atomic(os.path.join(d, "config.json"), {**self._settings, "judge": self.judge_label,
                                                                "baseline": self.baseline_source, "iteration": t})
        judged = jstage.run(items, shard, shard_size=self.cfg.prompts_per_shard, desc=f"eval iter {t}: judge",
                            progress=self.progress)
        row = results_row(judged, self.cfg, iteration=t, judge=self.judge_label, baseline=self.baseline_source,
                          seed=self.run.seed)
        top.finish({"result": row})
        return row


def results_row(judged: Sequence[dict], cfg: EvalConfig, *, iteration: int, judge: str, baseline: str, seed: int = 0) -> dict:
    """The table row from per-prompt judge records: :func:`metajudge.evaluate.summarize` with the
    CI at ``cfg.confidence``, plus the judge's mean P(A) over both orders (0.5 = no position
    preference) and how the preferences were read (``prob``, ``verdict`` or ``mixed``)."""
    p = np.array([r["preference"] for r in judged])
    lm = [r["model_chars"] for r in judged]
    lb = [r["baseline_chars"] for r in judged]
    row: dict[str, Any] = {"iteration": iteration, **summarize(p, lm, lb, n_boot=cfg.n_boot, seed=seed)}
    _, lo, hi = win_rate(p, n_boot=cfg.n_boot, confidence=cfg.confidence, seed=seed)
    kinds = {k for r in judged for k in r["kinds"]}
    row.update(ci_low=lo, ci_high=hi, confidence=cfg.confidence, judge=judge, baseline=baseline,
               first_position_rate=float(np.mean([(r["p_a_model_first"] + r["p_a_baseline_first"]) / 2 for r in judged])),
               readout=kinds.pop() if len(kinds) == 1 else "mixed")
    return row


def evaluate_iteration(
    run_dir: str,
    t: int,
    cfg: EvalConfig,
    *,
    run: Any,
    model: Any = None,
    tokenizer: Any = None,
    mesh: Any = None,
    progress: bool = True,
) -> dict:
    """Evaluates the model after iteration ``t`` of the run in ``run_dir`` (the loop's evaluate stage).

    ``run``: the run's ``LoopConfig`` (or its config dict). ``model`` / ``tokenizer``: M_{t+1}
    if the caller holds it (else it is loaded from ``iter_<t>/dpo/model`` when needed). Returns
    the results row (win rate, CI, LC win rate, lengths); a finished evaluation is read back.
    """
    ev = Evaluator(run_dir, cfg, RunInfo.of(run), pool=ModelPool(mesh), progress=progress)
    return ev.evaluate(t, model=model, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------ CLI


def finished_iterations(run_dir: str) -> list[int]:
    """The iterations ``t`` whose model ``iter_<t>/dpo/model`` is complete, in order."""
    out = []
    for d in glob.glob(os.path.join(run_dir, "iter_*")):
        m = re.fullmatch(r"iter_(\d+)", os.path.basename(d))
        if m and os.path.exists(os.path.join(d, "dpo", "manifest.json")) and os.path.isfile(os.path.join(d, "dpo", "model", "config.json")):
            out.append(int(m.group(1)))
    return sorted(out)


def read_run(run_dir: str) -> RunInfo:
    """The run's settings from ``run_dir/config.json``."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir}: no such run directory")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir} is not a run directory (no config.json); give the --out of a loop run")
    with open(path) as f:
        return RunInfo.of(json.load(f))


def _cli_config(run: RunInfo, args: argparse.Namespace) -> tuple[EvalConfig, Optional[str]]:
    """The evaluation settings for a run (its own, changed by the options) and the --tag."""
    cfg = apply_overrides(run.evaluate, args.set)
    for name in ("judge", "baseline", "prompts", "external_judge"):
        value = getattr(args, name)
        if value is not None:
            cfg = dataclasses.replace(cfg, **{name: value})
    if args.prompts and not os.path.isfile(args.prompts):
        raise UsageError(f"--prompts {args.prompts}: no such file")
    if args.tag is not None:
        if not re.fullmatch(r"[A-Za-z0-9_.]+", args.tag):
            raise UsageError(f"--tag {args.tag!r}: use letters, digits, '_' and '.' only")
    return cfg, args.tag


def evaluate_run(run_dir: str, args: argparse.Namespace, pool: Optional[ModelPool] = None) -> tuple[list[dict], Optional[str]]:
    """Evaluates every finished iteration of a run (skipping those already done); writes the
    run's evaluation report. Returns the rows and the tag."""
    run = read_run(run_dir)
    cfg, tag = _cli_config(run, args)
    its = finished_iterations(run_dir)
    if not its:
        raise UsageError(f"{run_dir}: no finished iteration (no iter_<t>/dpo/model yet); run the loop first")
    if pool is None:
        pool = ModelPool(resolve_mesh(run.mesh))
    ev = Evaluator(run_dir, cfg, run, pool=pool, tag=tag, progress=not args.quiet)
    tag = ev.tag
    rows = []
    try:
        for t in its:
            done = ev.evaluated(t)
            if done is not None:
                print(f"{run_dir}: iteration {t} already evaluated", file=sys.stderr)
            rows.append(done if done is not None else ev.evaluate(t))
    except StageMismatch as e:
        raise UsageError(f"{e}; pass --tag NAME to keep these settings' results apart") from None
    if not distributed.is_primary():  # one writer of reports on multi-process runs
        return rows, tag
    name = "evaluation" + _tag_suffix(tag)
    label = os.path.basename(os.path.normpath(run_dir))
    if getattr(args, "export", None):
        paths = export_alpaca_eval(ev, its, args.export, label)
        print(f"AlpacaEval files of {len(paths)} iteration(s): {args.export}", file=sys.stderr)
    write_evaluation_report(run_dir, {label: rows}, name=name)
    metrics_path = os.path.join(run_dir, "metrics.json")
    if tag is None and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
        by_t = {r["iteration"]: r for r in rows}
        for m in metrics:
            if m.get("iteration") in by_t:
                m["evaluation"] = by_t[m["iteration"]]
                it_path = os.path.join(run_dir, f"iter_{m['iteration']}", "metrics.json")
                if os.path.isfile(it_path):
                    write_json_atomic(it_path, m)
        write_report(run_dir, metrics)
    return rows, tag


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line of ``python -m experiments.evaluate``."""
    ap = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", metavar="DIR", help="a loop run directory (its --out)")
    what.add_argument("--compare", nargs="+", metavar="DIR", help="several run directories side by side")
    what.add_argument("--alpaca-eval", dest="alpaca_eval", metavar="DIR",
                      help="a leaderboard from AlpacaEval annotations.json files under DIR (experiments.alpaca_files)")
    ap.add_argument("--out", default=None,
                    help="--compare: where the table and plot go (default runs/comparison); "
                         "--alpaca-eval: where leaderboard.csv/.md go (default runs/leaderboard)")
    ap.add_argument("--difficulty", default=None, metavar="FILE",
                    help="--alpaca-eval: a frozen instruction difficulty CSV (index,instruction_difficulty): AlpacaEval's LC")
    ap.add_argument("--fit-difficulty", dest="fit_difficulty", default=None, metavar="OUT.csv",
                    help="--alpaca-eval: fit the instruction difficulty over the models in DIR, write it here and use it")
    ap.add_argument("--export", default=None, metavar="DIR",
                    help="--run/--compare: also write each evaluated iteration as AlpacaEval's model_outputs.json "
                         "and annotations.json under DIR")
    ap.add_argument("--judge", default=None, metavar="SOURCE", help="judge model (default: the run's seed model)")
    ap.add_argument("--baseline", default=None, metavar="SOURCE", help="baseline model (default: the run's seed model)")
    ap.add_argument("--prompts", default=None, metavar="FILE", help="JSONL of evaluation prompts (default: the run's held-out split)")
    ap.add_argument("--external-judge", dest="external_judge", default=None, metavar="MODULE:FUNCTION",
                    help="a Python function judging a batch of (prompt, answer A, answer B); see the module doc")
    ap.add_argument("--tag", default=None, help="name for these settings' outputs (evaluate-TAG); default: derived")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an evaluation setting, e.g. max_prompts=32 or answer.max_new_tokens=512")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (see the module doc)."""
    args = parse_args(argv)
    if (args.difficulty or args.fit_difficulty) and not args.alpaca_eval:
        raise UsageError("--difficulty and --fit-difficulty go with --alpaca-eval DIR")
    if args.alpaca_eval:
        out = args.out or os.path.join("runs", "leaderboard")
        rows = alpaca_eval_leaderboard(args.alpaca_eval, out, difficulty=args.difficulty, fit_to=args.fit_difficulty)
        print(leaderboard_table(rows))
        print(f"leaderboard: {os.path.join(out, 'leaderboard.csv')}")
        return 0
    if args.run:
        rows, tag = evaluate_run(args.run, args)
        print(evaluation_table(rows))
        print(f"evaluation: {os.path.join(args.run, 'evaluation' + _tag_suffix(tag) + '.md')}")
        return 0
    runs: dict[str, list[dict]] = {}
    pool: Optional[ModelPool] = None
    for run_dir in args.compare:
        if pool is None:
            pool = ModelPool(resolve_mesh(read_run(run_dir).mesh))
        label = os.path.basename(os.path.normpath(run_dir))
        if label in runs:
            label = os.path.normpath(run_dir)
        runs[label], _ = evaluate_run(run_dir, args, pool)
    baselines = {r["baseline"] for rows in runs.values() for r in rows}
    if len(baselines) > 1:
        print(f"warning: the runs are measured against different baselines: {sorted(baselines)}", file=sys.stderr)
    if not distributed.is_primary():
        return 0
    out = args.out or os.path.join("runs", "comparison")
    write_json_atomic(os.path.join(out, "config.json"), {"runs": list(args.compare), **{
        k: getattr(args, k) for k in ("judge", "baseline", "prompts", "external_judge", "tag", "set")}})
    path = write_evaluation_report(out, runs, name="comparison")
    print(comparison_table(runs))
    print(f"comparison: {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    run_main(main)

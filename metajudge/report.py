"""Per-iteration metrics of the loop, the run's markdown table and its plots."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from metajudge.evaluate import LC_KIND_ALPACA_EVAL, LC_KIND_LENGTH_ONLY
from metajudge.stages import write_json_atomic, write_text_atomic
from models.files import write_atomic

COLUMNS = (
    ("iteration", "iter", "{:d}"),
    ("avg_response_chars", "avg len (chars)", "{:.0f}"),
    ("mean_score", "mean score", "{:.2f}"),
    ("judge_fallback_rate", "judge fallback", "{:.0%}"),
    ("actor_pairs", "actor pairs", "{:d}"),
    ("judge_pairs", "judge pairs", "{:d}"),
    ("score_gap", "chosen-rejected gap", "{:.2f}"),
    ("dpo_margin", "DPO margin", "{:.3f}"),
    ("dpo_accuracy", "DPO acc", "{:.2f}"),
    ("hidden_cosine", "chosen/rejected cos", "{:.3f}"),
    ("initial_grad_norm", "initial grad norm", "{:.3g}"),
    ("future_chosen", "future chosen", "{:d}"),
    ("initial_rejected", "initial rejected", "{:d}"),
    ("first_position_win_rate", "meta 1st-pos win", "{:.0%}"),
    ("first_position_prob", "meta p(1st)", "{:.2f}"),
    ("elo_spread", "Elo spread", "{:.2f}"),
)

PLOTS = (
    ("avg_response_chars", "average response length (chars)"),
    ("judge_fallback_rate", "judge parse-fallback rate"),
    ("pairs", "pairs kept"),
    ("score_gap", "mean chosen - rejected score"),
    ("dpo", "DPO margin and accuracy (last step)"),
    ("first_position_win_rate", "meta-judge first-position win rate"),
    ("elo_spread", "Elo spread (max - min, mean over prompts)"),
    ("score_hist", "score distribution"),
    ("hidden_cosine", "cosine of chosen vs rejected hidden states"),
    ("initial_grad_norm", "DPO gradient norm at the first step"),
)


def _nan_mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _dpo_metrics(dpo_dir: str) -> tuple[dict, dict]:
    """The first and the last step's training metrics (empty dicts when DPO did not run)."""
    path = os.path.join(dpo_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}, {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return (rows[0], rows[-1]) if rows else ({}, {})


def iteration_metrics(
    t: int, generated: list[dict], judged: list[dict], metajudged: Optional[list[dict]], pair_stats: dict, dpo_dir: str
) -> dict[str, Any]:
    """The numbers the report shows for iteration ``t``.

    Collapse diagnostics, comparable across methods (all on the actor pairs trained on): the
    mean judge-score gap chosen - rejected, the cosine similarity of their mean last-layer hidden
    states under M_t (``pair_stats["hidden_cosine"]``), the DPO implicit-reward margin at the last
    step and the DPO gradient norm at the first step (policy = reference there, so it measures how
    much signal the pairs carry before any update).
    """
    lengths = [len(r) for g in generated for r in g["responses"]]
    n_judgments = sum(len(j["scores"]) for j in judged)
    first, dpo = _dpo_metrics(dpo_dir)
    means = [j["mean"] for j in judged]
    hist = np.histogram([m for m in means if m is not None and math.isfinite(m)], bins=10, range=(0, 5))[0]
    out = {
        "iteration": t,
        "prompts": len(generated),
        "responses": len(lengths),
        "avg_response_chars": float(np.mean(lengths)) if lengths else float("nan"),
        "mean_score": _nan_mean(means),
        "score_histogram": hist.tolist(),
        "judge_fallback_rate": sum(j["n_fallback"] for j in judged) / n_judgments if n_judgments else float("nan"),
        "judge_too_long": sum(bool(j.get("too_long")) for j in judged),
        "actor_pairs": int(pair_stats.get("actor_pairs", 0)),
        "judge_pairs": int(pair_stats.get("judge_pairs", 0)),
        "score_gap": pair_stats.get("score_gap", float("nan")),
        "dpo_margin": dpo.get("rewards/margin", float("nan")),
        "dpo_accuracy": dpo.get("rewards/accuracy", float("nan")),
        "dpo_loss": dpo.get("loss", float("nan")),
        "hidden_cosine": pair_stats.get("hidden_cosine", float("nan")),
        "initial_grad_norm": first.get("grad_norm", float("nan")),
        "first_position_win_rate": pair_stats.get("first_position_win_rate", float("nan")),
        "first_position_prob": pair_stats.get("first_position_prob", float("nan")),
        "elo_spread": pair_stats.get("elo_spread", float("nan")),
    }
    for key in ("future_chosen", "initial_rejected"):  # temporal anchoring: where pairs came from
        if key in pair_stats:
            out[key] = int(pair_stats[key])
    if metajudged is not None:
        battles = [b for x in metajudged for b in x["battles"]]
        out["meta_fallback_rate"] = sum(b["fallback"] for b in battles) / len(battles) if battles else float("nan")
        out["meta_too_long"] = sum(bool(b.get("too_long")) for b in battles)
    return out


def markdown_table(metrics: Sequence[dict]) -> str:
    """One row per iteration; missing values are shown as ``-``."""
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = []
    for m in metrics:
        cells = []
        for key, _, fmt in COLUMNS:
            v = m.get(key)
            ok = v is not None and not (isinstance(v, float) and not math.isfinite(v))
            cells.append(fmt.format(v) if ok else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows])


def _plot(out_dir: str, metrics: Sequence[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [m["iteration"] for m in metrics]
    fig, axes = plt.subplots(2, 5, figsize=(22, 8))
    for ax, (key, title) in zip(axes.flat, PLOTS):
        if key == "pairs":
            ax.plot(its, [m["actor_pairs"] for m in metrics], "o-", label="actor")
            ax.plot(its, [m["judge_pairs"] for m in metrics], "s-", label="judge")
            ax.legend()
        elif key == "dpo":
            ax.plot(its, [m["dpo_margin"] for m in metrics], "o-", label="margin")
            ax.plot(its, [m["dpo_accuracy"] for m in metrics], "s-", label="accuracy")
            ax.legend()
        elif key == "score_hist":
            edges = np.linspace(0, 5, 11)
            for m in metrics:
                ax.stairs(m["score_histogram"], edges, label=f"iter {m['iteration']}")
            ax.legend()
            ax.set_xlabel("mean judge score")
        else:
            ax.plot(its, [m.get(key, float("nan")) for m in metrics], "o-")
        ax.set_title(title, fontsize=10)
        if key != "score_hist":
            ax.set_xlabel("iteration")
            ax.set_xticks(its)
    fig.tight_layout()
    path = os.path.join(out_dir, "metrics.png")
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=80), binary=True)
    plt.close(fig)
    return [path]


def write_report(out_dir: str, metrics: Sequence[dict]) -> str:
    """Writes ``metrics.json``, ``report.md`` and ``metrics.png``; returns the report's path."""
    write_json_atomic(os.path.join(out_dir, "metrics.json"), list(metrics))
    plots = _plot(out_dir, metrics)
    body = ["# Run report", "", markdown_table(metrics), ""]
    body += [f"![metrics]({os.path.basename(p)})" for p in plots]
    evaluated = [{**m["evaluation"], "iteration": m["iteration"]} for m in metrics if m.get("evaluation")]
    if evaluated:
        png = plot_evaluation(os.path.join(out_dir, "evaluation.png"), {"": evaluated})
        body += ["", "## Held-out evaluation", "", evaluation_note(evaluated), "", evaluation_table(evaluated), "",
                 f"![evaluation]({os.path.basename(png)})"]
    path = os.path.join(out_dir, "report.md")
    write_text_atomic(path, "\n".join(body) + "\n")
    return path


# ------------------------------------------------------------------ held-out evaluation


def _pct(v: Any) -> str:
    ok = isinstance(v, (int, float)) and math.isfinite(v)
    return f"{100 * v:.1f}" if ok else "-"


def _ci(row: dict) -> str:
    lo, hi = row.get("ci_low"), row.get("ci_high")
    return f"[{_pct(lo)}, {_pct(hi)}]" if lo is not None and hi is not None else "-"


def _chars(v: Any) -> str:
    return f"{v:.0f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _eval_cells(row: dict) -> list[str]:
    return [str(row.get("iteration", "-")), _pct(row.get("lc_win_rate")), _pct(row.get("win_rate")), _ci(row),
            _chars(row.get("avg_length")), _chars(row.get("baseline_avg_length")), str(row.get("n", "-"))]


def lc_label(rows: Sequence[dict]) -> str:
    """What the rows' LC is called wherever it is shown: ``"AlpacaEval LC"`` only when every row's
    ``lc_kind`` says so (a frozen γ was used), else ``"length-only LC"`` (``metajudge.evaluate``)."""
    kinds = {r.get("lc_kind", LC_KIND_LENGTH_ONLY) for r in rows}
    return LC_KIND_ALPACA_EVAL if kinds == {LC_KIND_ALPACA_EVAL} else LC_KIND_LENGTH_ONLY


def _eval_head(rows: Sequence[dict]) -> list[str]:
    return ["iter", f"{lc_label(rows)} win rate (%)", "win rate (%)", "CI (%)", "length (chars)", "baseline length", "prompts"]


def evaluation_note(rows: Sequence[dict]) -> str:
    """One line naming the judge, the baseline and the CI level of evaluation rows (first row's)."""
    r = rows[0] if rows else {}
    conf = r.get("confidence", 0.95)
    return (f"Model of each iteration against baseline `{r.get('baseline', '?')}`, judged by `{r.get('judge', '?')}` "
            f"in both orders; CI: {100 * conf:.0f} % bootstrap over prompts; length: mean characters per answer.")


def evaluation_table(rows: Sequence[dict]) -> str:
    """Markdown table of evaluation rows: iteration, LC win rate (headed by :func:`lc_label`), win
    rate, CI, lengths, prompts.

    Rates are shown in percent with one decimal, lengths in characters; missing values as ``-``.
    """
    head = _eval_head(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_eval_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def comparison_table(runs: Mapping[str, Sequence[dict]]) -> str:
    """One markdown table with the evaluation rows of several runs, a ``run`` column first."""
    head = ["run", *_eval_head([r for rows in runs.values() for r in rows])]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, rows in runs.items():
        lines += ["| " + " | ".join([name, *_eval_cells(r)]) + " |" for r in rows]
    return "\n".join(lines)


def plot_evaluation(path: str, runs: Mapping[str, Sequence[dict]]) -> str:
    """LC win rate (with the raw win rate dashed and its CI shaded) and average length across
    iterations, one line per run, saved atomically to ``path``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_wr, ax_len) = plt.subplots(1, 2, figsize=(11, 4))
    lc = lc_label([r for rows in runs.values() for r in rows])
    ticks: set[int] = set()
    for k, (name, rows) in enumerate(runs.items()):
        rows = sorted(rows, key=lambda r: r["iteration"])
        its = [r["iteration"] for r in rows]
        ticks.update(its)
        color = f"C{k % 10}"
        get = lambda key: [100 * r.get(key, float("nan")) for r in rows]
        label = name or None
        ax_wr.plot(its, get("lc_win_rate"), "o-", color=color, label=f"{name} {lc}" if name else f"{lc} win rate")
        ax_wr.plot(its, get("win_rate"), "s--", color=color, alpha=0.6, label=f"{name} raw" if name else "win rate")
        ax_wr.fill_between(its, get("ci_low"), get("ci_high"), color=color, alpha=0.12)
        ax_len.plot(its, [r.get("avg_length", float("nan")) for r in rows], "o-", color=color, label=label or "model")
    baseline = [r.get("baseline_avg_length") for rows in runs.values() for r in rows if r.get("baseline_avg_length") is not None]
    if baseline:
        ax_len.axhline(float(np.mean(baseline)), color="gray", ls=":", label="baseline")
    ax_wr.axhline(50.0, color="gray", ls=":", lw=0.8)
    ax_wr.set_title("win rate against the baseline (%)", fontsize=10)
    ax_len.set_title("average answer length (chars)", fontsize=10)
    for ax in (ax_wr, ax_len):
        ax.set_xlabel("iteration")
        ax.set_xticks(sorted(ticks))
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=80), binary=True)
    plt.close(fig)
    return path


def write_evaluation_report(out_dir: str, runs: Mapping[str, Sequence[dict]], *, name: str = "evaluation") -> str:
    """Writes ``<name>.json``, ``<name>.md`` (table) and ``<name>.png`` (plot) for one run (one
    key) or several side by side; returns the markdown file's path."""
    write_json_atomic(os.path.join(out_dir, f"{name}.json"), {k: list(v) for k, v in runs.items()})
    png = plot_evaluation(os.path.join(out_dir, f"{name}.png"), runs)
    rows = [r for v in runs.values() for r in v]
    table = evaluation_table(rows) if len(runs) == 1 else comparison_table(runs)
    title = "Held-out evaluation" if len(runs) == 1 else "Held-out evaluation: " + ", ".join(runs)
    body = [f"# {title}", "", evaluation_note(rows), "", table, "", f"![{name}]({os.path.basename(png)})"]
    path = os.path.join(out_dir, f"{name}.md")
    write_text_atomic(path, "\n".join(body) + "\n")
    return path

"""Per-iteration metrics of the loop, the run's markdown table and its plots."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from metajudge.stages import write_json_atomic

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
    ("first_position_win_rate", "meta 1st-pos win", "{:.0%}"),
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
)


def _nan_mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _last_dpo_metrics(dpo_dir: str) -> dict:
    path = os.path.join(dpo_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return rows[-1] if rows else {}


def iteration_metrics(
    t: int, generated: list[dict], judged: list[dict], metajudged: Optional[list[dict]], pair_stats: dict, dpo_dir: str
) -> dict[str, Any]:
    """The numbers the report shows for iteration ``t``."""
    lengths = [len(r) for g in generated for r in g["responses"]]
    n_judgments = sum(len(j["scores"]) for j in judged)
    dpo = _last_dpo_metrics(dpo_dir)
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
        "actor_pairs": int(pair_stats.get("actor_pairs", 0)),
        "judge_pairs": int(pair_stats.get("judge_pairs", 0)),
        "score_gap": pair_stats.get("score_gap", float("nan")),
        "dpo_margin": dpo.get("rewards/margin", float("nan")),
        "dpo_accuracy": dpo.get("rewards/accuracy", float("nan")),
        "dpo_loss": dpo.get("loss", float("nan")),
        "first_position_win_rate": pair_stats.get("first_position_win_rate", float("nan")),
        "elo_spread": pair_stats.get("elo_spread", float("nan")),
    }
    if metajudged is not None:
        battles = [b for x in metajudged for b in x["battles"]]
        out["meta_fallback_rate"] = sum(b["fallback"] for b in battles) / len(battles) if battles else float("nan")
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
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
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
    fig.savefig(path + ".tmp.png", dpi=80)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return [path]


def write_report(out_dir: str, metrics: Sequence[dict]) -> str:
    """Writes ``metrics.json``, ``report.md`` and ``metrics.png``; returns the report's path."""
    write_json_atomic(os.path.join(out_dir, "metrics.json"), list(metrics))
    plots = _plot(out_dir, metrics)
    body = ["# Run report", "", markdown_table(metrics), ""]
    body += [f"![metrics]({os.path.basename(p)})" for p in plots]
    path = os.path.join(out_dir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(body) + "\n")
    os.replace(path + ".tmp", path)
    return path

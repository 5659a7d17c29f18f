"""The testbed's report: per-iteration aggregates over seeds, the claims' verdicts from paired
intervals (:mod:`metajudge.intervals`), the markdown table and the plot."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

from metajudge.intervals import combine, flat_verdict, paired_interval, verdict
from models.files import write_atomic

#: name -> (label, loop method, length control, temporal anchoring)
METHODS: dict[str, tuple[str, str, bool, bool]] = {
    "self_reward": ("Self-Rewarding", "self_reward", False, False),
    "self_reward_lc": ("Self-Rewarding + LC", "self_reward", True, False),
    "meta_reward": ("Meta-Rewarding (LC)", "meta_reward", True, False),
    "temporal_self_reward": ("Temporal Self-Rewarding", "self_reward", False, True),
    "meta_reward_temporal": ("Meta-Rewarding + temporal", "meta_reward", True, True),
}

TABLE_COLUMNS = (
    ("actor_quality", "actor quality", "{:.3f}"),
    ("actor_exact", "exact", "{:.2f}"),
    ("judge_acc", "judge acc", "{:.3f}"),
    ("judge_length_bonus", "judge len bonus", "{:+.2f}"),
    ("meta_acc", "meta acc", "{:.3f}"),
    ("actor_chars", "length (chars)", "{:.1f}"),
    ("gold_gap", "gold gap c-r", "{:.2f}"),
    ("pair_precision", "pair precision", "{:.2f}"),
    ("score_gap", "judge gap c-r", "{:.2f}"),
    ("judge_pair_precision", "judge-pair precision", "{:.2f}"),
    ("hidden_cosine", "hidden cos c-r", "{:.3f}"),
    ("dpo_margin", "DPO margin", "{:.2f}"),
)

PLOT_KEYS = ("actor_quality", "judge_acc", "meta_acc", "actor_chars", "gold_gap", "score_gap")


def _finite(xs: Sequence[Any]) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]


def aggregate(rows: dict[str, dict[int, list[dict]]], iterations: int) -> dict[str, list[dict]]:
    """``{method: [{"iteration": t, key: (mean, sd, n)}, ...]}`` over seeds."""
    keys = sorted({k for per_seed in rows.values() for seed_rows in per_seed.values() for r in seed_rows for k in r} - {"iteration"})
    out: dict[str, list[dict]] = {}
    for name, per_seed in rows.items():
        agg = []
        for t in range(iterations + 1):
            at = [r for seed_rows in per_seed.values() for r in seed_rows if r["iteration"] == t]
            cell: dict[str, Any] = {"iteration": t}
            for k in keys:
                xs = _finite([r.get(k) for r in at])
                if xs:
                    cell[k] = (float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, len(xs))
            agg.append(cell)
        out[name] = agg
    return out


def _cell(v: Optional[tuple], fmt: str) -> str:
    if v is None:
        return "-"
    mean, sd, n = v
    return fmt.format(mean) + (f" ± {sd:.2f}".replace("± 0.00", "± 0") if n > 1 else "")


def markdown_table(agg: dict[str, list[dict]]) -> str:
    """One row per method and iteration: mean ± sd over seeds."""
    head = "| method | iter | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |"
    sep = "|---|---|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    lines = [head, sep]
    for name, cells in agg.items():
        for c in cells:
            lines.append(f"| {METHODS[name][0]} | {c['iteration']} | "
                         + " | ".join(_cell(c.get(k), fmt) for k, _, fmt in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def _at(rows: list[dict], t: int, key: str) -> float:
    v = rows[t].get(key) if t < len(rows) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def _paired(rows: dict[str, dict[int, list[dict]]], names: Sequence[str], diff: Callable[..., float]) -> list[float]:
    """``diff(rows of names[0], rows of names[1], ...)`` for every seed all ``names`` ran on."""
    if not all(n in rows for n in names):
        return []
    seeds = sorted(set.intersection(*(set(rows[n]) for n in names)))
    return [diff(*(rows[n][s] for n in names)) for s in seeds]


def claims(rows: dict[str, dict[int, list[dict]]], iterations: int, *, level: float = 0.95,
           flat_margin: float = 0.03) -> list[dict]:
    """The claims the testbed checks, each from per-seed paired differences (:mod:`metajudge.intervals`).

    With T the last iteration and, per seed, q_t actor quality, j_t judge accuracy, L_t length and
    g_t the gold gap of iteration t's pairs:

    1. Self-Rewarding improves the actor, then stalls, while the judge stays flat: the mean gain per
       iteration after the first minus the first gain, (q_T - q_1) / (T - 1) - (q_1 - q_0), is
       below 0, and j_T - j_0 lies within ±``flat_margin``.
    2. Meta-Rewarding raises judge accuracy: j_T(Meta-Rewarding) - j_T(Self-Rewarding) > 0.
    3. Meta-Rewarding ends with a better actor: q_T(Meta-Rewarding) - q_T(Self-Rewarding) > 0.
    4. Without length control, length inflates: L_T - L_0 of Self-Rewarding > 0.
    5. Temporal anchoring keeps the gap wider: mean over t = 2..T of g_t(Temporal Self-Rewarding) -
       g_t(Self-Rewarding) > 0.

    Each item: ``claim``, ``verdict``, ``parts`` (name -> interval as a dict and its verdict),
    ``diffs`` (the per-seed differences), ``numbers`` (a sentence).
    """
    T = iterations
    out: list[dict] = []
    sr, mr, ts = "self_reward", "meta_reward", "temporal_self_reward"

    def add(text: str, parts: list[tuple[str, list[float], Any]], numbers: str) -> None:
        done, verdicts = {}, []
        for name, diffs, judge_of in parts:
            iv = paired_interval(diffs, level)
            v = judge_of(iv)
            verdicts.append(v)
            done[name] = {"interval": dataclasses.asdict(iv), "verdict": v, "diffs": diffs, "text": iv.text()}
        out.append({"claim": text, "verdict": combine(*verdicts), "parts": done, "numbers": numbers.format(
            **{name: p["text"] for name, p in done.items()})})

    up = lambda iv: verdict(iv, 1)
    if T >= 2:
        stall = _paired(rows, [sr], lambda r: (_at(r, T, "actor_quality") - _at(r, 1, "actor_quality")) / (T - 1)
                        - (_at(r, 1, "actor_quality") - _at(r, 0, "actor_quality")))
        judge = _paired(rows, [sr], lambda r: _at(r, T, "judge_acc") - _at(r, 0, "judge_acc"))
        if stall:
            add("Self-Rewarding improves the actor, then stalls, while the judge stays flat",
                [("stall", stall, lambda iv: verdict(iv, -1)), ("judge", judge, lambda iv: flat_verdict(iv, flat_margin))],
                "later gain per iteration minus the first gain {stall}; judge acc change " + f"iter 0 -> {T} "
                + "{judge} (flat: within ±" + f"{flat_margin})")
    d = _paired(rows, [mr, sr], lambda m, s: _at(m, T, "judge_acc") - _at(s, T, "judge_acc"))
    if d:
        add("Meta-Rewarding raises judge accuracy", [("judge", d, up)],
            f"judge acc at iter {T}, Meta-Rewarding minus Self-Rewarding: " + "{judge}")
    d = _paired(rows, [mr, sr], lambda m, s: _at(m, T, "actor_quality") - _at(s, T, "actor_quality"))
    if d:
        add("Meta-Rewarding ends with a better actor than Self-Rewarding", [("actor", d, up)],
            f"actor quality at iter {T}, Meta-Rewarding minus Self-Rewarding: " + "{actor}")
    d = _paired(rows, [sr], lambda r: _at(r, T, "actor_chars") - _at(r, 0, "actor_chars"))
    if d:
        add("Without length control, length inflates", [("length", d, up)],
            f"Self-Rewarding length (chars) iter {T} minus iter 0: " + "{length}")
    if T >= 2:
        d = _paired(rows, [ts, sr], lambda a, b: float(np.mean([_at(a, t, "gold_gap") - _at(b, t, "gold_gap")
                                                               for t in range(2, T + 1)])))
        if d:
            add("Temporal anchoring keeps the chosen-rejected gap wider than Self-Rewarding", [("gap", d, up)],
                f"gold gap of the pairs, iterations 2..{T}, temporal minus Self-Rewarding: " + "{gap}")
    return out


def regressions(agg: dict[str, list[dict]], iterations: int) -> list[str]:
    """Methods whose mean actor quality at the last iteration is below iteration 1's by more than
    the seeds' spread (the larger sd of the two)."""
    out = []
    for name, cells in agg.items():
        if iterations < 2 or "actor_quality" not in cells[1] or "actor_quality" not in cells[iterations]:
            continue
        (m1, s1, _), (mT, sT, _) = cells[1]["actor_quality"], cells[iterations]["actor_quality"]
        if m1 - mT > max(s1, sT):
            out.append(f"{METHODS[name][0]}: actor quality {m1:.3f} at iteration 1, {mT:.3f} at iteration {iterations} "
                       f"(sd {max(s1, sT):.3f})")
    return out


def claims_markdown(items: list[dict]) -> str:
    """One line per claim: its verdict in bold, then the intervals it rests on."""
    n = max((p["interval"]["n"] for c in items for p in c["parts"].values()), default=0)
    head = f"Mean paired difference over {n} seeds [95% confidence interval]:" if items else ""
    return "\n".join([head, ""] + [f"- {c['claim']}: **{c['verdict']}** ({c['numbers']})" for c in items])


def plot(agg: dict[str, list[dict]], path: str) -> None:
    """Mean ± sd over seeds of the main metrics per iteration, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {k: label for k, label, _ in TABLE_COLUMNS}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, key in zip(axes.flat, PLOT_KEYS):
        for name, cells in agg.items():
            pts = [(c["iteration"], *c[key][:2]) for c in cells if key in c]
            if pts:
                ts, ms, sds = (list(v) for v in zip(*pts))
                ax.errorbar(ts, ms, yerr=sds, fmt="o-", capsize=3, label=METHODS[name][0])
        ax.set_title(titles[key])
        ax.set_xlabel("iteration")
        ax.set_xticks(sorted({c["iteration"] for cells in agg.values() for c in cells}))
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=80), binary=True)
    plt.close(fig)



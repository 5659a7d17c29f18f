"""The self-improvement loop shared by Self-Rewarding and Meta-Rewarding (METHODS.md).

Per iteration t: prompts -> generate (actor, K samples) -> judge (N judgments per response) ->
meta_judge (Meta-Rewarding, iterations listed in ``judge_pair_iterations``) -> pairs -> dpo
(reference log-probs, then training; M_{t+1} saved in HF format) -> report. Every stage writes
under ``<out>/iter_<t>/<stage>/`` atomically with a manifest (``metajudge.stages``), so a killed
run restarts where it stopped and ends with the same pairs as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Literal, Optional

import numpy as np

from experiments.cli import UsageError, config_dict
from experiments.dpo import DPORunConfig, run_dpo
from experiments.sft import tiny_config
from metajudge import meta_judge as mj
from metajudge.judge import highest_variance_index
from metajudge.pairs import select_actor_pair
from metajudge.prompt_sources import iteration_prompts, load_prompts_jsonl, load_seed_prompts, split_prompts
from metajudge.report import iteration_metrics, write_report
from metajudge.roles import Sampling, act, judge, meta_judge, shard_rng
from metajudge.stages import Stage, write_json_atomic, write_jsonl_atomic
from metajudge.train import TrainConfig

log = logging.getLogger(__name__)

TINY_MODEL = "tiny"  # a random tiny Llama with the embedded SmolLM2 tokenizer (tests, smoke runs)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Everything one run of the loop depends on; saved as ``<out>/config.json``."""

    method: Literal["meta_reward", "self_reward"] = "meta_reward"
    model: str = "smollm2-135m-instruct"  # any models.load_model source, or "tiny"
    tokenizer: Optional[str] = None  # default: the model's own (the embedded one for "tiny")
    dtype: str = "float32"
    mesh: Optional[str] = None  # e.g. "data=2,fsdp=-1,tensor=4"; default: every device on fsdp
    seed: int = 0
    iterations: int = 1
    prompts: Optional[str] = None  # JSONL of prompts; default: the built-in seed set
    prompts_per_iteration: int = 16
    heldout_fraction: float = 0.1
    actor: Sampling = Sampling(n=4, temperature=0.8, top_p=0.95, max_new_tokens=128)
    judge: Sampling = Sampling(n=3, temperature=0.8, top_p=0.95, max_new_tokens=96)
    meta_judge: Sampling = Sampling(n=1, temperature=0.8, top_p=0.95, max_new_tokens=96)
    readout: Literal["parse", "expected"] = "parse"
    rho: tuple[float, ...] = (0.0,)  # length-control ρ per iteration (the last value repeats)
    judge_pair_iterations: tuple[int, ...] = (1, 2)
    judgment_max_chars: int = 1500  # chosen judgments longer than this are dropped
    gen_batch_size: int = 64
    prompts_per_shard: int = 8
    dpo: DPORunConfig = DPORunConfig(max_len=768, batch_size=8, num_epochs=1, save_every=50,
                                     train=TrainConfig(learning_rate=1e-6, beta=0.1, warmup_steps=2))

    def rho_at(self, t: int) -> float:
        return self.rho[min(t, len(self.rho)) - 1]


# ------------------------------------------------------------------------------------- models


def _load(cfg: LoopConfig, source: str, mesh: Any):
    import models

    tok = models.load_tokenizer(cfg.tokenizer or (models.EMBEDDED_NAME if source == TINY_MODEL else source))
    if source == TINY_MODEL:
        config = tiny_config(tok, cfg.dtype)
        return config, models.create_model(config, seed=cfg.seed, mesh=mesh), tok
    config, model = models.load_model(source, dtype=cfg.dtype, mesh=mesh)
    return config, model, tok


def _model_source(cfg: LoopConfig, out: str, t: int) -> str:
    """M_t: the run's starting model for t = 1, else the previous iteration's DPO output."""
    return cfg.model if t == 1 else os.path.join(out, f"iter_{t - 1}", "dpo", "model")


# ------------------------------------------------------------------------------------- stages


def _prompts(cfg: LoopConfig, out: str) -> tuple[list[dict], list[dict]]:
    pool = load_prompts_jsonl(cfg.prompts) if cfg.prompts else load_seed_prompts()
    train, heldout = split_prompts(pool, heldout_fraction=cfg.heldout_fraction, seed=cfg.seed)
    path = os.path.join(out, "heldout_prompts.jsonl")
    if not os.path.exists(path):
        write_jsonl_atomic(path, heldout)
    return train, heldout


def _generate_stage(cfg, it_dir, t, prompts, model, tok, base_fp):
    stage = Stage(os.path.join(it_dir, "generate"), "generate",
                  fingerprint_of={**base_fp, "actor": dataclasses.asdict(cfg.actor), "ids": [p["id"] for p in prompts]})

    def shard(i, chunk):
        outs = act(model, tok, [p["prompt"] for p in chunk], cfg.actor, rng=shard_rng(cfg.seed, t, 1, i),
                   batch_size=cfg.gen_batch_size)
        return [{"id": p["id"], "prompt": p["prompt"], "responses": r} for p, r in zip(chunk, outs)]

    return stage.run(prompts, shard, shard_size=cfg.prompts_per_shard, desc=f"iter {t}: generate")


def _judge_stage(cfg, it_dir, t, generated, model, tok, base_fp):
    items = [(g["id"], g["prompt"], k, r) for g in generated for k, r in enumerate(g["responses"])]
    stage = Stage(os.path.join(it_dir, "judge"), "judge",
                  fingerprint_of={**base_fp, "judge": dataclasses.asdict(cfg.judge), "readout": cfg.readout,
                                  "n": len(items)})

    def shard(i, chunk):
        res = judge(model, tok, [(p, r) for _, p, _, r in chunk], cfg.judge, rng=shard_rng(cfg.seed, t, 2, i),
                    readout=cfg.readout, batch_size=cfg.gen_batch_size)
        return [{"id": pid, "response_index": k, **r} for (pid, _, k, _), r in zip(chunk, res)]

    shard_size = cfg.prompts_per_shard * max(1, cfg.actor.n)
    return stage.run(items, shard, shard_size=shard_size, desc=f"iter {t}: judge")


def _by_prompt(judged: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in judged:
        out.setdefault(r["id"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r["response_index"])
    return out


def _meta_judge_stage(cfg, it_dir, t, generated, judged, model, tok, base_fp):
    by_prompt = _by_prompt(judged)
    targets = []
    for g in generated:
        rows = by_prompt[g["id"]]
        k = highest_variance_index([r["scores"] for r in rows])
        if k is not None:
            targets.append({"id": g["id"], "prompt": g["prompt"], "response_index": k,
                            "response": g["responses"][k], "judgments": rows[k]["judgments"]})
    stage = Stage(os.path.join(it_dir, "meta_judge"), "meta_judge",
                  fingerprint_of={**base_fp, "meta_judge": dataclasses.asdict(cfg.meta_judge),
                                  "readout": cfg.readout, "targets": [x["id"] for x in targets]})

    def shard(i, chunk):
        battles, owners = [], []
        for j, x in enumerate(chunk):
            for m, n in mj.battle_pairs(len(x["judgments"])):
                battles.append((x["prompt"], x["response"], x["judgments"][m], x["judgments"][n]))
                owners.append((j, m, n))
        res = meta_judge(model, tok, battles, cfg.meta_judge, rng=shard_rng(cfg.seed, t, 3, i),
                         readout=cfg.readout, batch_size=cfg.gen_batch_size)
        out = [dict(x, battles=[]) for x in chunk]
        for (j, m, n), r in zip(owners, res):
            out[j]["battles"].append({"first": m, "second": n, "verdict": r["verdict"], "fallback": r["fallback"]})
        return out

    return stage.run(targets, shard, shard_size=cfg.prompts_per_shard, desc=f"iter {t}: meta-judge")


def build_pairs(cfg: LoopConfig, t: int, generated: list[dict], judged: list[dict], metajudged: Optional[list[dict]]) -> tuple[list[dict], dict]:
    """Actor pairs (length-controlled) and judge pairs (Elo over meta-judge battles) as DPO records."""
    from metajudge.prompts import judge_prompt

    by_prompt = _by_prompt(judged)
    pairs, gaps = [], []
    for g in generated:
        rows = by_prompt[g["id"]]
        scores = [r["mean"] for r in rows]
        lengths = [len(x) for x in g["responses"]]
        sel = select_actor_pair(scores, lengths, cfg.rho_at(t))
        if sel is not None:
            c, r = sel
            pairs.append({"kind": "actor", "id": g["id"], "prompt": g["prompt"], "chosen": g["responses"][c],
                          "rejected": g["responses"][r], "chosen_score": scores[c], "rejected_score": scores[r]})
            gaps.append(scores[c] - scores[r])
    stats: dict[str, Any] = {"actor_pairs": len(pairs), "score_gap": float(np.mean(gaps)) if gaps else float("nan")}
    if metajudged:
        verdicts = [b["verdict"] for x in metajudged for b in x["battles"]]
        w1, w2 = mj.positional_weights(verdicts)
        n_judge, spreads = 0, []
        for x in metajudged:
            n = len(x["judgments"])
            r = mj.results_matrix(n, {(b["first"], b["second"]): b["verdict"] for b in x["battles"]})
            elo = mj.elo_scores(mj.battle_matrix(r, w1, w2))
            spreads.append(float(elo.max() - elo.min()))
            sel = mj.judge_pair(elo, [len(j) for j in x["judgments"]], cfg.judgment_max_chars)
            if sel is not None:
                c, rj = sel
                pairs.append({"kind": "judge", "id": x["id"], "prompt": judge_prompt(x["prompt"], x["response"]),
                              "chosen": x["judgments"][c], "rejected": x["judgments"][rj]})
                n_judge += 1
        decisive = sum(v != 0 for v in verdicts)
        stats.update(judge_pairs=n_judge, position_weights=[w1, w2], elo_spread=float(np.mean(spreads)) if spreads else float("nan"),
                     first_position_win_rate=(sum(v == 1 for v in verdicts) / decisive) if decisive else float("nan"))
    return pairs, stats


# --------------------------------------------------------------------------------------- loop


def run_loop(cfg: LoopConfig, out: str) -> dict:
    """Runs (or resumes) every iteration; returns the metrics of all iterations."""
    from experiments.sft import resolve_mesh

    if cfg.method not in ("meta_reward", "self_reward"):
        raise UsageError(f"method={cfg.method!r}: expected meta_reward or self_reward")
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "config.json"), config_dict(cfg))
    mesh = resolve_mesh(cfg.mesh)
    train_prompts, _ = _prompts(cfg, out)
    all_metrics = []
    for t in range(1, cfg.iterations + 1):
        it_dir = os.path.join(out, f"iter_{t}")
        source = _model_source(cfg, out, t)
        t0 = time.time()
        config, model, tok = _load(cfg, source, mesh)
        base_fp = {"model": source, "seed": cfg.seed, "iteration": t}
        prompts = iteration_prompts(train_prompts, t, cfg.prompts_per_iteration, seed=cfg.seed)
        generated = _generate_stage(cfg, it_dir, t, prompts, model, tok, base_fp)
        judged = _judge_stage(cfg, it_dir, t, generated, model, tok, base_fp)
        metajudged = None
        if cfg.method == "meta_reward" and t in cfg.judge_pair_iterations:
            metajudged = _meta_judge_stage(cfg, it_dir, t, generated, judged, model, tok, base_fp)
        pairs_stage = Stage(os.path.join(it_dir, "pairs"), "pairs", fingerprint_of=base_fp)
        pairs_path = os.path.join(pairs_stage.dir, "pairs.jsonl")
        if not pairs_stage.done:
            pairs, pair_stats = build_pairs(cfg, t, generated, judged, metajudged)
            write_jsonl_atomic(pairs_path, pairs)
            pairs_stage.finish(pair_stats)
        pair_stats = pairs_stage.summary()
        dpo_dir = os.path.join(it_dir, "dpo")
        dpo_stage = Stage(dpo_dir, "dpo", fingerprint_of={**base_fp, "dpo": config_dict(cfg.dpo)})
        if not dpo_stage.done:
            if pair_stats.get("actor_pairs", 0) + pair_stats.get("judge_pairs", 0) == 0:
                import models

                print(f"iter {t}: no preference pairs; the model is carried over unchanged", file=sys.stderr)
                models.save_hf(config, model, os.path.join(dpo_dir, "model"))
            else:
                run_dpo(model, config, tok, pairs_path, dpo_dir, cfg.dpo, resume=True, mesh=mesh)
            dpo_stage.finish({"seconds": round(time.time() - t0, 1)})
        metrics = iteration_metrics(t, generated, judged, metajudged, pair_stats, dpo_dir)
        write_json_atomic(os.path.join(it_dir, "metrics.json"), metrics)
        all_metrics.append(metrics)
        write_report(out, all_metrics)
        del model
    return {"iterations": all_metrics}

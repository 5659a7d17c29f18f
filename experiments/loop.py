"""The self-improvement loop shared by Self-Rewarding and Meta-Rewarding (METHODS.md).

Per iteration t: prompts -> generate (actor, K samples) -> judge (N judgments per response) ->
meta_judge (Meta-Rewarding, iterations listed in ``judge_pair_iterations``) -> pairs (the rules of
``metajudge.pair_assembly``) -> dpo (reference log-probs, then training; M_{t+1} saved in HF
format) -> report. Every stage writes under ``<out>/iter_<t>/<stage>/`` atomically with a manifest
(``metajudge.stages``), so a killed run restarts where it stopped and ends with the same pairs as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Optional

import numpy as np

from experiments.cli import config_dict
from experiments.configs import LoopConfig, resolve, resolved_dict, validate
from experiments.evaluate import evaluate_iteration
from metajudge import meta_judge as mj
from metajudge.metric_log import WANDB_INSTALL, MetricLog, start_wandb, wandb_available
from metajudge.pair_assembly import anchored_pairs, build_pairs, future_guided_pairs, meta_judge_targets
from metajudge.prompt_sources import iteration_prompts, load_prompt_file, load_seed_prompts, split_prompts
from metajudge.report import iteration_metrics, write_report
from metajudge.prompts import judge_prompt, meta_judge_prompt
from metajudge.roles import act, judge, meta_judge, shard_rng
from metajudge.stages import Restart, Stage, describe_differences, read_jsonl, write_json_atomic, write_jsonl_atomic
from metajudge.trainer import DPORunConfig, UsageError, resolve_mesh, run_dpo
from models import distributed
from models.files import DirLock
from models.loading import save_hf
from models.scoring import score
from models.sharding import data_parallel_size
from models.sources import default_tokenizer, load_model_and_tokenizer

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- models


def _load(cfg: LoopConfig, source: str, mesh: Any):
    # Every iteration uses the starting model's tokenizer: saved iterations hold weights only.
    return load_model_and_tokenizer(source, default_tokenizer(cfg.model, cfg.tokenizer), mesh=mesh, seed=cfg.seed,
                                    **cfg.model_options())


def _model_source(cfg: LoopConfig, out: str, t: int) -> str:
    """M_t: the run's starting model for t = 1, else the previous iteration's DPO output."""
    return cfg.model if t == 1 else os.path.join(out, f"iter_{t - 1}", "dpo", "model")


# ------------------------------------------------------------------------------------- stages


def _prompts(cfg: LoopConfig, out: str, pool: list[dict]) -> tuple[list[dict], list[dict]]:
    train, heldout = split_prompts(pool, heldout_fraction=cfg.heldout_fraction, seed=cfg.seed)
    path = os.path.join(out, "heldout_prompts.jsonl")
    if not os.path.exists(path):
        write_jsonl_atomic(path, heldout)
    return train, heldout


_RESTART = Restart()  # the running loop's restart policy (run_loop sets it)


def _stage(directory: str, name: str, *, fingerprint_of: Any) -> Stage:
    """A stage of the running loop, under its restart policy (``--restart-changed``)."""
    return Stage(directory, name, fingerprint_of=fingerprint_of, restart=_RESTART)


def context_budget(cfg: LoopConfig, tok: Any, prompt: str) -> int:
    """Tokens the longest model input built on ``prompt`` needs: the meta-judge's (prompt, response,
    two judgments, its answer) for meta_reward, else the judge's; generated parts are counted at
    their ``max_new_tokens``, plus a margin of 16 for the forced ``Score:``/``Winner:`` readouts."""
    if cfg.method == "meta_reward":
        text = meta_judge_prompt(prompt, "", "", "")
        extra = cfg.actor.max_new_tokens + 2 * cfg.judge.max_new_tokens + cfg.meta_judge.max_new_tokens
    else:
        text = judge_prompt(prompt, "")
        extra = cfg.actor.max_new_tokens + cfg.judge.max_new_tokens
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return len(ids["input_ids"] if isinstance(ids, dict) else ids) + extra + 16


def fit_context(cfg: LoopConfig, prompts: list[dict], tok: Any, config: Any, t: int) -> list[dict]:
    """``prompts`` without those whose longest model input would not fit the model's context
    (:func:`context_budget`); the skipped ones are counted and named by id on stderr."""
    limit = config.max_position_embeddings
    keep, skipped = [], []
    for p in prompts:
        (keep if context_budget(cfg, tok, p["prompt"]) <= limit else skipped).append(p)
    if skipped:
        ids = ", ".join(str(p["id"]) for p in skipped[:20]) + (" ..." if len(skipped) > 20 else "")
        print(f"iter {t}: skipped {len(skipped)} of {len(prompts)} prompt(s) too long for the model's context of "
              f"{limit} tokens with the generation lengths set (ids: {ids})", file=sys.stderr)
    if not keep:
        raise UsageError(f"iter {t}: every prompt is too long for the model's context of {limit} tokens "
                         "(lower actor/judge/meta_judge.max_new_tokens or use shorter prompts)")
    return keep


class _Lazy:
    """A model made on first use (M_0 or the future model), so finished stages never build it."""

    def __init__(self, make: Any):
        self._make, self._model = make, None

    def get(self) -> Any:
        if self._model is None:
            self._model = self._make()
        return self._model


def _model_of(model: Any) -> Any:
    return model.get() if isinstance(model, _Lazy) else model


# Stream ids of the rng: one per sampling stage, so no two stages share random numbers.
_STREAMS = {"generate": 1, "judge": 2, "meta_judge": 3, "initial/generate": 4, "initial/judge": 5,
            "future/generate": 6, "future/judge": 7}


def _generate_stage(cfg, it_dir, t, prompts, model, tok, base_fp, name="generate"):
    """``cfg.actor.n`` responses per prompt from ``model``, in ``<it_dir>/<name>/``."""
    stage = _stage(os.path.join(it_dir, name), name,
                  fingerprint_of={**base_fp, "actor": dataclasses.asdict(cfg.actor), "ids": [p["id"] for p in prompts]})

    def shard(i, chunk):
        outs = act(_model_of(model), tok, [p["prompt"] for p in chunk], cfg.actor, rng=shard_rng(cfg.seed, t, _STREAMS[name], i),
                   batch_size=cfg.gen_batch_size)
        return [{"id": p["id"], "prompt": p["prompt"], "responses": r} for p, r in zip(chunk, outs)]

    return stage.run(prompts, shard, shard_size=cfg.prompts_per_shard, desc=f"iter {t}: {name}")


def _judge_stage(cfg, it_dir, t, generated, model, tok, base_fp, name="judge"):
    """``cfg.judge.n`` judgments of every generated response by ``model`` (the current M_t)."""
    items = [(g["id"], g["prompt"], k, r) for g in generated for k, r in enumerate(g["responses"])]
    stage = _stage(os.path.join(it_dir, name), name,
                  fingerprint_of={**base_fp, "judge": dataclasses.asdict(cfg.judge), "readout": cfg.readout,
                                  "n": len(items)})

    def shard(i, chunk):
        res = judge(model, tok, [(p, r) for _, p, _, r in chunk], cfg.judge, rng=shard_rng(cfg.seed, t, _STREAMS[name], i),
                    readout=cfg.readout, batch_size=cfg.gen_batch_size)
        return [{"id": pid, "response_index": k, **r} for (pid, _, k, _), r in zip(chunk, res)]

    shard_size = cfg.prompts_per_shard * max(1, cfg.actor.n)
    return stage.run(items, shard, shard_size=shard_size, desc=f"iter {t}: {name}")


def _meta_judge_stage(cfg, it_dir, t, generated, judged, model, tok, base_fp):
    targets = meta_judge_targets(generated, judged)
    stage = _stage(os.path.join(it_dir, "meta_judge"), "meta_judge",
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
            out[j]["battles"].append({"first": m, "second": n, "verdict": r["verdict"], "fallback": r["fallback"],
                                       "p_first": r["p_first"], "too_long": r["too_long"]})
        return out

    return stage.run(targets, shard, shard_size=cfg.prompts_per_shard, desc=f"iter {t}: meta-judge")


# --------------------------------------------------------------------------------------- loop


def fit_batch(run: DPORunConfig, n_pairs: int, mesh: Any, what: str) -> Optional[DPORunConfig]:
    """``run`` for ``n_pairs`` pairs: when they do not fill one batch, the batch shrinks to the
    largest multiple of data*fsdp*grad_accum they fill; None when they fill not even that."""
    if n_pairs >= run.batch_size:
        return run
    unit = data_parallel_size(mesh) * run.train.grad_accum_steps
    batch = n_pairs // unit * unit
    if batch:
        print(f"{what}: {n_pairs} pairs are fewer than batch_size={run.batch_size}; training with batches of {batch}",
              file=sys.stderr)
    return dataclasses.replace(run, batch_size=batch) if batch else None


def hidden_cosine(model: Any, tok: Any, pairs: list[dict], batch_size: int = 16) -> float:
    """Mean cosine similarity of chosen vs rejected responses' mean last-layer hidden states under
    ``model`` (actor pairs only): the representation-collapse diagnostic of METHODS.md."""
    actor = [p for p in pairs if p["kind"] == "actor"]
    if not actor:
        return float("nan")
    prompts = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}]) for p in actor]
    hid = {}
    for side in ("chosen", "rejected"):
        responses = [tok.encode(p[side]) or [tok.eos_token_ids[0]] for p in actor]
        hid[side] = score(model, prompts, responses, return_hidden=True, batch_size=batch_size).hidden.astype(np.float64)
    c, r = hid["chosen"], hid["rejected"]
    cos = (c * r).sum(1) / np.maximum(np.linalg.norm(c, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    return float(cos.mean())


def _temporal_actor_pairs(cfg, out, it_dir, t, prompts, generated, judged, model, config, tok, base_fp, mesh,
                          wandb_run=None) -> list[dict]:
    """Stages ``initial/*`` (M_0 samples, M_t judges), ``future/*`` (M_f = DPO(M_t, D1) samples,
    M_t judges; M_f's weights are deleted afterwards) and returns D2, the future-guided pairs."""
    initial_gen = initial_judged = None
    if t > 1:  # at t = 1, M_0 is the current model: its responses are `generated`
        m0 = _Lazy(lambda: _load(cfg, cfg.model, mesh)[1])  # M_0 is loaded only if it has to sample
        initial_gen = _generate_stage(cfg, it_dir, t, prompts, m0, tok, {**base_fp, "initial_model": cfg.model},
                                      name="initial/generate")
        del m0
        initial_judged = _judge_stage(cfg, it_dir, t, initial_gen, model, tok, base_fp, name="initial/judge")
    fut_dir = os.path.join(it_dir, "future")
    d1_stage = _stage(os.path.join(fut_dir, "anchored"), "future/anchored", fingerprint_of=base_fp)
    d1_path = os.path.join(d1_stage.dir, "pairs.jsonl")
    if not d1_stage.done:
        d1 = anchored_pairs(generated, judged, initial_gen, initial_judged)
        write_jsonl_atomic(d1_path, d1)
        d1_stage.finish({"pairs": len(d1), "initial_rejected": sum(p["rejected_source"] == "initial" for p in d1)})
    d1 = read_jsonl(d1_path)
    if not d1:
        print(f"iter {t}: no anchored pairs; no future model is trained", file=sys.stderr)
        return []
    future_prompts = [p for p in prompts if p["id"] in {x["id"] for x in d1}]
    fut_cfg = fit_batch(cfg.future_dpo or cfg.dpo, len(d1), mesh, f"iter {t}: future model")
    if fut_cfg is None:
        print(f"iter {t}: too few anchored pairs to train a future model; the chosen stay M_t's", file=sys.stderr)
        return future_guided_pairs(d1, [], [])
    fut_fp = {**base_fp, "future_dpo": config_dict(fut_cfg)}
    # Checkpoints of M_f made with other settings stop the run (or are deleted, --restart-changed).
    _stage(os.path.join(fut_dir, "dpo"), "future/dpo", fingerprint_of=fut_fp).check()
    # M_f is trained (or restored from its checkpoint after a kill) only if it still has to sample.
    future = _Lazy(lambda: run_dpo(model, config, tok, d1_path, os.path.join(fut_dir, "dpo"),
                                   dataclasses.replace(fut_cfg, export=False), resume=True, mesh=mesh,
                                   wandb_run=wandb_run, log_prefix=f"iter_{t}/future_dpo", key_prefix="future_dpo."))
    future_gen = _generate_stage(cfg, it_dir, t, future_prompts, future, tok, fut_fp, name="future/generate")
    del future
    if distributed.is_primary():  # M_f is discarded (its samples are all that is kept)
        shutil.rmtree(os.path.join(fut_dir, "dpo", "checkpoints"), ignore_errors=True)
    future_judged = _judge_stage(cfg, it_dir, t, future_gen, model, tok, base_fp, name="future/judge")
    return future_guided_pairs(d1, future_gen, future_judged)


def run_loop(cfg: LoopConfig, out: str, *, restart_changed: bool = False) -> dict:
    """Runs (or resumes) every iteration; returns the metrics of all iterations. ``cfg`` is resolved
    first (``experiments.configs.resolve``: the DPO settings the loop derives are filled in) and
    checked (``experiments.configs.validate``) before anything is loaded or written.

    Process 0 holds the lock of ``out`` (``models.files.DirLock``) for the whole run: a second
    run on the same directory stops at once, naming the holder. A stage whose stored settings
    differ from the current ones stops the run naming the keys, or, with ``restart_changed``,
    is run again from scratch with every stage after it (``metajudge.stages.Restart``).
    ``config.json`` is written once the settings are valid and the lock is held; when it holds
    other settings it is replaced only once this run has finished."""
    global _RESTART
    cfg = resolve(cfg)
    if cfg.log.wandb and not wandb_available():
        raise UsageError(f"log.wandb=true needs the wandb package: {WANDB_INSTALL}")
    mesh = resolve_mesh(cfg.mesh)
    validate(cfg, mesh)
    resolved = resolved_dict(cfg)
    distributed.check_same([resolved, out], "the loop settings and --out")
    pool = load_prompt_file(cfg.prompts) if cfg.prompts else load_seed_prompts()
    lock = DirLock(out)
    if distributed.is_primary():
        os.makedirs(out, exist_ok=True)
        lock.acquire()
    try:
        _RESTART = Restart(changed=restart_changed)
        config_path = os.path.join(out, "config.json")
        stored = _read_json(config_path) if distributed.is_primary() else None
        if stored is None:
            write_json_atomic(config_path, resolved)
        elif stored != json.loads(json.dumps(resolved, default=str)):
            print(f"{config_path}: the run was made with other settings ("
                  f"{describe_differences(stored, resolved)}); it is replaced when this run finishes", file=sys.stderr)
        result = _run_loop(cfg, out, mesh, pool, resolved)
        if stored is not None:
            write_json_atomic(config_path, resolved)
        return result
    finally:
        _RESTART = Restart()
        lock.release()


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _run_loop(cfg: LoopConfig, out: str, mesh: Any, pool: list[dict], resolved: dict) -> dict:
    train_prompts, _ = _prompts(cfg, out, pool)
    wandb_run = (start_wandb(out, project=cfg.log.wandb_project, mode=cfg.log.wandb_mode,
                             name=os.path.basename(os.path.normpath(out)), config=resolved) if cfg.log.wandb else None)
    # Every iteration's metrics are logged again on a resumed run, so older events are hidden (purge).
    loop_log = MetricLog(os.path.join(out, "tensorboard"), prefix="loop", purge_step=1, wandb_run=wandb_run)
    try:
        return _iterations(cfg, out, mesh, train_prompts, loop_log, wandb_run)
    finally:
        loop_log.close()
        if wandb_run is not None:
            wandb_run.finish()


def _iterations(cfg: LoopConfig, out: str, mesh: Any, train_prompts: list[dict], loop_log: MetricLog, wandb_run: Any) -> dict:
    all_metrics = []
    for t in range(1, cfg.iterations + 1):
        it_dir = os.path.join(out, f"iter_{t}")
        source = _model_source(cfg, out, t)
        t0 = time.time()
        config, model, tok = _load(cfg, source, mesh)
        # The model's name, not its path: a run directory that is moved or copied still resumes.
        base_fp = {"model": cfg.model if t == 1 else f"iter_{t - 1}/dpo/model", "seed": cfg.seed, "iteration": t}
        prompts = fit_context(cfg, iteration_prompts(train_prompts, t, cfg.prompts_per_iteration, seed=cfg.seed),
                              tok, config, t)
        generated = _generate_stage(cfg, it_dir, t, prompts, model, tok, base_fp)
        judged = _judge_stage(cfg, it_dir, t, generated, model, tok, base_fp)
        metajudged = None
        if cfg.method == "meta_reward" and t in cfg.judge_pair_iterations:
            metajudged = _meta_judge_stage(cfg, it_dir, t, generated, judged, model, tok, base_fp)
        pairs_fp = {**base_fp, "temporal": cfg.temporal, "battle_rule": cfg.battle_rule, "rho": cfg.rho_at(t),
                    "pair_tiebreak": cfg.pair_tiebreak}
        pairs_stage = _stage(os.path.join(it_dir, "pairs"), "pairs", fingerprint_of=pairs_fp)
        pairs_path = os.path.join(pairs_stage.dir, "pairs.jsonl")
        if not pairs_stage.done:
            actor = None
            if cfg.temporal:
                actor = _temporal_actor_pairs(cfg, out, it_dir, t, prompts, generated, judged, model, config, tok,
                                              base_fp, mesh, wandb_run=wandb_run)
            pairs, pair_stats = build_pairs(generated, judged, metajudged, rho=cfg.rho_at(t), battle_rule=cfg.battle_rule,
                                            judgment_max_chars=cfg.judgment_max_chars, actor=actor,
                                            tiebreak=cfg.pair_tiebreak, seed=cfg.seed * 1000 + t)
            pair_stats["hidden_cosine"] = hidden_cosine(model, tok, pairs)
            write_jsonl_atomic(pairs_path, pairs)
            pairs_stage.finish(pair_stats)
        pair_stats = pairs_stage.summary()
        dpo_dir = os.path.join(it_dir, "dpo")
        dpo_stage = _stage(dpo_dir, "dpo", fingerprint_of={**base_fp, "dpo": config_dict(cfg.dpo)})
        new_model = None  # M_{t+1} when this call trains it; else the evaluation loads it if needed
        if not dpo_stage.done:
            n_pairs = pair_stats.get("actor_pairs", 0) + pair_stats.get("judge_pairs", 0)
            dpo_cfg = fit_batch(cfg.dpo, n_pairs, mesh, f"iter {t}: dpo")
            if dpo_cfg is None:
                print(f"iter {t}: {n_pairs} preference pairs, too few for one batch; the model is carried over unchanged",
                      file=sys.stderr)
                save_hf(config, model, os.path.join(dpo_dir, "model"))
                new_model = model
            else:
                new_model = run_dpo(model, config, tok, pairs_path, dpo_dir, dpo_cfg, resume=True, mesh=mesh,
                                    wandb_run=wandb_run, log_prefix=f"iter_{t}/dpo", key_prefix="dpo.")
            dpo_stage.finish({"seconds": round(time.time() - t0, 1)})
        metrics = iteration_metrics(t, generated, judged, metajudged, pair_stats, dpo_dir)
        if cfg.evaluate.enabled:
            metrics["evaluation"] = evaluate_iteration(out, t, cfg.evaluate, run=cfg, model=new_model, tokenizer=tok,
                                                       mesh=mesh)
        del new_model
        write_json_atomic(os.path.join(it_dir, "metrics.json"), metrics)
        loop_log.log(metrics, step=t)
        all_metrics.append(metrics)
        if distributed.is_primary():  # one writer on multi-process runs
            write_report(out, all_metrics)
        del model
    return {"iterations": all_metrics}

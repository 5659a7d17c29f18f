"""Named loop settings: `tiny` (tests), `smollm2_cpu` (`make run`), `llama3_8b_paper` (a TPU pod)."""

from __future__ import annotations

import dataclasses

from experiments.cli import UsageError
from experiments.evaluate import EvalConfig
from experiments.loop import LoopConfig
from metajudge.roles import Sampling
from metajudge.train import TrainConfig
from metajudge.trainer import DPORunConfig
from models.sources import TINY_MODEL


def tiny() -> LoopConfig:
    """A random tiny model: every stage runs in seconds. Its judgments never parse, so the
    `expected` readout is what produces pairs."""
    return LoopConfig(
        model=TINY_MODEL, iterations=1, prompts_per_iteration=4, prompts_per_shard=2, readout="expected",
        actor=Sampling(n=3, temperature=1.0, top_p=1.0, max_new_tokens=12),
        judge=Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8),
        meta_judge=Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=8),
        dpo=DPORunConfig(max_len=640, batch_size=4, save_every=1,
                         train=TrainConfig(learning_rate=1e-3, warmup_steps=0)),
        evaluate=EvalConfig(max_prompts=4, prompts_per_shard=2, batch_size=8, n_boot=200,
                            answer=Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=12)),
    )


def smollm2_cpu() -> LoopConfig:
    """One full iteration of every stage with the embedded SmolLM2-135M on 2 CPU cores (`make run`).

    SmolLM2-135M rarely writes a parseable `Score:` line, so scores are read with `expected`; its
    meta-judge picks the first position every time, so battles are scored `order_averaged`. Sizes
    keep the whole run within about a quarter of an hour: 4 prompts, one shard per stage (fewer
    compiled shapes), short generations, no rematerialisation (135M fits without it).
    """
    return LoopConfig(
        iterations=1, prompts_per_iteration=4, prompts_per_shard=4, readout="expected", battle_rule="order_averaged",
        actor=Sampling(n=3, temperature=0.8, top_p=0.95, max_new_tokens=64),
        judge=Sampling(n=3, temperature=0.8, top_p=0.95, max_new_tokens=32),
        meta_judge=Sampling(n=1, temperature=0.8, top_p=0.95, max_new_tokens=24),
        dpo=DPORunConfig(max_len=640, batch_size=2, save_every=2, ref_batch_size=4,
                         train=TrainConfig(learning_rate=5e-6, beta=0.1, warmup_steps=1, remat=False)),
        evaluate=EvalConfig(max_prompts=8, prompts_per_shard=8, batch_size=16,
                            answer=Sampling(n=1, temperature=0.7, top_p=0.9, max_new_tokens=64)),
    )


def llama3_8b_paper() -> LoopConfig:
    """Meta-Rewarding as published: Llama-3-8B-Instruct, K=7, N=11, 5,000 prompts x 4 iterations."""
    return LoopConfig(
        model="meta-llama/Meta-Llama-3-8B-Instruct", dtype="bfloat16", mesh="fsdp=-1,tensor=4",
        iterations=4, prompts_per_iteration=5000, prompts_per_shard=256, gen_batch_size=512, readout="parse",
        actor=Sampling(n=7, temperature=0.8, top_p=0.95, max_new_tokens=1024),
        judge=Sampling(n=11, temperature=0.8, top_p=0.95, max_new_tokens=512),
        meta_judge=Sampling(n=1, temperature=0.8, top_p=0.95, max_new_tokens=512),
        rho=(0.0, 0.32, 0.32, 0.4), judge_pair_iterations=(1, 2), judgment_max_chars=2000,
        dpo=DPORunConfig(max_len=4096, batch_size=32, save_every=100,
                         train=TrainConfig(learning_rate=5e-6, beta=0.1, warmup_steps=20, remat=True)),
        evaluate=EvalConfig(max_prompts=0, prompts_per_shard=64, batch_size=256,
                            answer=Sampling(n=1, temperature=0.7, top_p=0.9, max_new_tokens=1024)),
    )


PRESETS = {"tiny": tiny, "smollm2_cpu": smollm2_cpu, "llama3_8b_paper": llama3_8b_paper}


def get_preset(name: str, method: str) -> LoopConfig:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), method=method)

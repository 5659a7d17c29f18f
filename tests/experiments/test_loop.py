"""The loop's settings and helpers around the pairs: the rho schedule, the hidden-state cosine, the
future model's settings, the batch fitted to few pairs."""

from __future__ import annotations

import dataclasses

from experiments.configs import LoopConfig


def test_rho_schedule_takes_the_iteration_value_and_repeats_the_last():
    cfg = dataclasses.replace(LoopConfig(), rho=(0.0, 0.32, 0.4))
    assert [cfg.rho_at(t) for t in (1, 2, 3, 4, 5)] == [0.0, 0.32, 0.4, 0.4, 0.4]


def test_hidden_cosine_equals_numpy_cosine_of_plain_forward_hidden_means():
    import jax.numpy as jnp
    import numpy as np

    import models
    from experiments.loop import hidden_cosine
    from models.sources import tiny_config

    tok = models.load_tokenizer(models.EMBEDDED_NAME)
    model = models.create_model(tiny_config(tok, "float32"), seed=3)
    pairs = [{"kind": "actor", "prompt": "Name a colour.", "chosen": "Red, like a rose.", "rejected": "Blue"},
             {"kind": "judge", "prompt": "ignored", "chosen": "x", "rejected": "y"},
             {"kind": "actor", "prompt": "Say hi.", "chosen": "Hello there, friend!", "rejected": "Hi."}]
    cos = []
    for p in (pairs[0], pairs[2]):
        prompt = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}])
        means = []
        for side in ("chosen", "rejected"):
            resp = tok.encode(p[side])
            h, _ = model.hidden_states(jnp.asarray([prompt + resp], jnp.int32))
            means.append(np.asarray(h[0, len(prompt):], np.float64).mean(0))
        cos.append(means[0] @ means[1] / np.linalg.norm(means[0]) / np.linalg.norm(means[1]))
    assert abs(hidden_cosine(model, tok, pairs) - np.mean(cos)) < 1e-5
    assert np.isnan(hidden_cosine(model, tok, pairs[1:2]))


def test_future_model_settings_start_from_the_dpo_settings():
    from experiments.cli import apply_overrides
    from experiments.configs import get_preset

    cfg = get_preset("tiny", "self_reward")
    assert cfg.future_dpo is None and cfg.group_default("future_dpo") == cfg.dpo
    fut = apply_overrides(cfg, ["future_dpo.train.learning_rate=2e-5"]).future_dpo
    assert fut.train.learning_rate == 2e-5
    assert dataclasses.replace(fut, train=cfg.dpo.train) == cfg.dpo


def test_fit_batch_shrinks_to_what_the_pairs_fill_on_the_mesh():
    from metajudge.trainer import DPORunConfig
    from experiments.loop import fit_batch
    from metajudge.train_state import TrainConfig

    class Mesh:
        shape = {"data": 2, "fsdp": 2, "tensor": 2}

    run = DPORunConfig(batch_size=16, train=TrainConfig(grad_accum_steps=2))
    assert fit_batch(run, 40, Mesh, "x") is run
    assert fit_batch(run, 13, Mesh, "x").batch_size == 8  # multiples of data*fsdp*grad_accum = 4*2
    assert fit_batch(run, 7, Mesh, "x") is None

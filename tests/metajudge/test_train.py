"""Train steps: they learn, shard, accumulate, and refuse non-finite updates; config overrides."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from experiments.cli import UsageError, apply_overrides
from metajudge.train import TrainingDiverged, compute_reference_logps, first_loss_position, make_dpo_step, make_sft_step
from metajudge.train_state import TrainConfig, init_train_state, make_schedule

CFG = models.get_config("tiny")  # vocab 256, width 64, 2 layers
T = 24
# One optimizer config for most tests (here and in test_checkpoint): compiled steps are cached per config.
STD = TrainConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)


def _row(rng, prompt_len: int, resp_len: int) -> dict:
    """One pre-shifted row: tokens of a prompt then a response, loss on the response only."""
    n = prompt_len + resp_len
    toks = rng.integers(3, CFG.vocab_size, size=n + 1).astype(np.int32)
    row = {k: np.zeros(T, np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    row["loss_mask"] = np.zeros(T, np.float32)
    row["inputs"][:n], row["targets"][:n] = toks[:-1], toks[1:]
    row["positions"][:n], row["segment_ids"][:n] = np.arange(n), 1
    row["loss_mask"][prompt_len - 1 : n] = 1.0
    return row


def sft_batch(seed: int, b: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    rows = [_row(rng, int(rng.integers(2, 8)), int(rng.integers(4, T - 8))) for _ in range(b)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def dpo_rows(seed: int, n: int = 8, prompt_lens: tuple[int, int] = (2, 8)) -> list[dict]:
    """``n`` pairs, each with a prompt of ``prompt_lens[0] <= p < prompt_lens[1]`` tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = int(rng.integers(*prompt_lens))
        most = min(T - 8, T - p + 1)
        c, r = _row(rng, p, int(rng.integers(4, most))), _row(rng, p, int(rng.integers(4, most)))
        out.append({**{f"chosen_{k}": v for k, v in c.items()}, **{f"rejected_{k}": v for k, v in r.items()}})
    return out


def stack(rows: list[dict]) -> dict:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def flat_params(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_schedule_warms_up_from_the_first_step_then_decays_to_min():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=4, total_steps=14, decay="cosine", min_lr_ratio=0.1)
    lr = make_schedule(cfg)
    np.testing.assert_allclose([lr(s) for s in (0, 1, 3)], [0.25, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose([lr(9), lr(14), lr(100)], [0.55, 0.1, 0.1], rtol=1e-5)
    lin = make_schedule(cfg.replace(decay="linear", warmup_steps=0, min_lr_ratio=0.0))
    np.testing.assert_allclose([lin(0), lin(7), lin(14)], [1.0, 0.5, 0.0], atol=1e-6)


def test_one_dpo_step_increases_the_chosen_minus_rejected_margin():
    model = models.create_model(CFG, seed=0)
    rows = compute_reference_logps(model, dpo_rows(0), batch_size=8)
    cfg = STD
    state = init_train_state(model, cfg)
    state, metrics = make_dpo_step(cfg, state)(state, stack(rows))
    assert abs(metrics["rewards/margin"]) < 1e-5  # policy == reference before the update
    np.testing.assert_allclose(metrics["loss"], np.log(2.0), rtol=1e-4)

    after = compute_reference_logps(state.model, rows, batch_size=8)
    margin = np.mean([(a["ref_chosen_logp"] - r["ref_chosen_logp"]) - (a["ref_rejected_logp"] - r["ref_rejected_logp"])
                      for a, r in zip(after, rows)])
    assert margin > 0.1, margin
    assert int(state.step) == 1


def test_sft_steps_lower_the_loss_on_a_repeated_batch():
    model = models.create_model(CFG, seed=0)
    cfg = STD
    state = init_train_state(model, cfg)
    step = make_sft_step(cfg, state)
    batch = sft_batch(0)
    losses = []
    for _ in range(5):
        state, m = step(state, batch)
        losses.append(m["loss"])
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0]
    # The caller's model is not donated away by the step.
    assert np.isfinite(np.asarray(model.embedding_vd.value)).all()


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("kind,accum", [("sft", 2), ("dpo", 1)])
def test_sharded_step_on_2x2x2_mesh_equals_single_device_full_batch(kind, accum):
    """For SFT the sharded side also splits each batch in 2 micro-batches (4 rows over data*fsdp = 4)
    while the single-device side does not: one compile checks both claims."""
    mesh = models.make_mesh("data=2,fsdp=2,tensor=2")
    # Adam divides by sqrt(v): on parameters with ~1e-7 gradients (rare tokens) float32 reduction-order
    # noise moves the update by up to ~3% of the lr, so the lr sets the tolerance that is reachable.
    cfg = TrainConfig(learning_rate=1e-4, warmup_steps=0, total_steps=10)
    cfg8 = cfg.replace(grad_accum_steps=accum)
    single, sharded = models.create_model(CFG, seed=0), models.create_model(CFG, seed=0, mesh=mesh)
    nnx.update(sharded, nnx.state(single))  # sharded init draws differ in the last bit; start equal
    if kind == "sft":
        batches = [sft_batch(1), sft_batch(2)]
        make = make_sft_step
    else:
        rows = compute_reference_logps(single, dpo_rows(1, 16), batch_size=8)
        batches = [stack(rows[:8]), stack(rows[8:])]
        make = make_dpo_step
    s1, s8 = init_train_state(single, cfg), init_train_state(sharded, cfg8, mesh)
    step1, step8 = make(cfg, s1), make(cfg8, s8, mesh)
    for batch in batches:
        s1, m1 = step1(s1, batch)
        s8, m8 = step8(s8, batch)
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    q = s8.params["layers"][0]["attn"]["q_proj_dnh"].value
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    mu = s8.opt_state[1][0].mu["layers"][0]["attn"]["q_proj_dnh"].value  # Adam moment sharded like its param
    assert mu.sharding.spec == q.sharding.spec
    for a, b in zip(flat_params(s1), flat_params(s8)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("poison", ["lr=inf", "nan batch"])
def test_nonfinite_update_raises_training_diverged_and_keeps_the_state(poison):
    model = models.create_model(CFG, seed=0)
    cfg = STD.replace(learning_rate=float("inf")) if poison == "lr=inf" else STD
    state = init_train_state(model, cfg)
    before = flat_params(state)
    batch = sft_batch(4)
    if poison == "nan batch":
        batch["loss_mask"][0, 5] = np.nan
    with pytest.raises(TrainingDiverged, match=r"diverged at step 1: .*Lower the learning rate") as info:
        make_sft_step(cfg, state)(state, batch)
    kept = info.value.state
    assert int(kept.step) == 0
    for a, b in zip(before, flat_params(kept)):
        np.testing.assert_array_equal(a, b)


def test_reference_logps_match_a_direct_forward_and_pad_the_last_batch():
    from metajudge.losses import sequence_logps

    model = models.create_model(CFG, seed=0)
    rows = dpo_rows(5, n=11)
    got = compute_reference_logps(model, rows, batch_size=8)
    b = stack(rows)
    logits = model(jnp.asarray(b["chosen_inputs"]), positions=jnp.asarray(b["chosen_positions"]),
                   segment_ids=jnp.asarray(b["chosen_segment_ids"]))
    want = sequence_logps(logits, jnp.asarray(b["chosen_targets"]), jnp.asarray(b["chosen_loss_mask"]))
    np.testing.assert_allclose([g["ref_chosen_logp"] for g in got], want, rtol=1e-5)
    assert len(got) == 11 and all(g["ref_rejected_logp"] < 0 for g in got)


def test_first_loss_position_is_the_earliest_loss_token_rounded_down_to_8():
    rng = np.random.default_rng(0)
    rows = [_row(rng, 14, 6), _row(rng, 20, 3)]  # loss from 13 and from 19
    assert first_loss_position(stack(rows), "sft") == 8
    assert first_loss_position(rows[1:], "sft") == 16
    empty = dict(rows[0], loss_mask=np.zeros(T, np.float32))
    assert first_loss_position([empty, rows[1]], "sft") == 16
    assert first_loss_position([empty], "sft") == 0
    pair = {**{f"chosen_{k}": v for k, v in rows[1].items()}, **{f"rejected_{k}": v for k, v in rows[0].items()}}
    assert first_loss_position([pair]) == 8  # the rejected side starts earlier


def _numpy_logps(model, b: dict, side: str) -> np.ndarray:
    """Response log-prob sums from a full forward, log-softmax in float64 numpy."""
    logits = np.asarray(model(jnp.asarray(b[f"{side}_inputs"]), positions=jnp.asarray(b[f"{side}_positions"]),
                              segment_ids=jnp.asarray(b[f"{side}_segment_ids"])), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, b[f"{side}_targets"][..., None], -1)[..., 0]
    return (picked * b[f"{side}_loss_mask"]).sum(-1)


def test_dpo_from_loss_from_equals_the_full_head_and_refuses_earlier_loss_tokens():
    model = models.create_model(CFG, seed=0)
    rows = dpo_rows(6, prompt_lens=(12, 16))  # no loss before position 11
    assert first_loss_position(rows) == 8
    rows = compute_reference_logps(model, rows, batch_size=8)  # scores from position 8 on
    b = stack(rows)
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(b[f"ref_{side}_logp"], _numpy_logps(model, b, side), rtol=1e-5)
    # Reference = policy, so shift the stored values to make the step's gradient nonzero.
    b["ref_chosen_logp"] = b["ref_chosen_logp"] + np.linspace(-2, 2, 8, dtype=np.float32)
    states, metrics = [], []
    for loss_from in (0, 8):
        state = init_train_state(model, STD)
        state, m = make_dpo_step(STD, state, loss_from=loss_from)(state, b)
        states.append(state)
        metrics.append(m)
    np.testing.assert_allclose(metrics[1]["loss"], metrics[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics[1]["grad_norm"], metrics[0]["grad_norm"], rtol=1e-5)
    for a, c in zip(flat_params(states[0]), flat_params(states[1])):
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="loss tokens before position loss_from=16; build the step with"):
        make_dpo_step(STD, states[1], loss_from=16)(states[1], b)


def test_set_overrides_parse_dotted_names_with_the_field_types():
    from metajudge.trainer import DPORunConfig

    run = apply_overrides(DPORunConfig(), [
        "train.learning_rate=inf", "train.decay=linear", "batch_size=4", "pack=true", "mesh=data=2,fsdp=-1",
        "max_prompt_len=none", "train.remat=1",
    ])
    assert run.train.learning_rate == float("inf") and run.train.decay == "linear" and run.train.remat is True
    assert (run.batch_size, run.pack, run.mesh, run.max_prompt_len) == (4, True, "data=2,fsdp=-1", None)
    for bad, msg in [("train.decay=exp", "must be one of"), ("train.lr=1", "has no field 'lr'"),
                     ("batch_size=four", "expected an integer"), ("train.label_smoothing=0.7", "label_smoothing"),
                     ("pack", "expected key=value")]:
        with pytest.raises(UsageError, match=msg):
            apply_overrides(DPORunConfig(), [bad])


class ByteTokenizer:
    """Bytes as tokens 3..252 and a prefix-stable chat template (1 = bos, 2 = end of turn)."""

    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [3 + b % 250 for b in text.encode()]

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> list[int]:
        ids = [1]
        for m in messages:
            ids += [253 if m["role"] == "assistant" else 254] + self.encode(m["content"]) + [2]
        return ids + ([253] if add_generation_prompt else [])


def test_run_dpo_stores_reference_logps_with_the_pairs_and_resumes_a_finished_run(tmp_path):
    import json

    from metajudge.trainer import REF_FILE, DPORunConfig, run_dpo

    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"question {i}?", "chosen": "a good answer", "rejected": f"bad {i}"}) + "\n")
    model = models.create_model(CFG, seed=0)
    before = np.asarray(model.embedding_vd.value).copy()
    run = DPORunConfig(batch_size=8, max_len=32, save_every=1, export=False, train=STD.replace(total_steps=1))
    one = models.make_mesh("fsdp=1", devices=jax.devices()[:1])
    new = run_dpo(model, CFG, ByteTokenizer(), str(pairs), str(tmp_path / "out"), run, mesh=one)
    stored = [json.loads(line) for line in open(tmp_path / "out" / REF_FILE)]
    assert len(stored) == 8 and all(r["ref_chosen_logp"] < 0 for r in stored)
    np.testing.assert_array_equal(np.asarray(model.embedding_vd.value), before)  # the reference is untouched
    assert not np.allclose(np.asarray(new.embedding_vd.value), before)
    again = run_dpo(model, CFG, ByteTokenizer(), str(pairs), str(tmp_path / "out"), run, mesh=one)  # finished
    np.testing.assert_array_equal(np.asarray(again.embedding_vd.value), np.asarray(new.embedding_vd.value))


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_chunked_lm_head_gives_the_plain_heads_logps_loss_and_update(kind):
    """``logits_chunk=5`` over 24 positions: five chunks, the last one padded, each recomputed in the
    backward pass. Log-probs against a float64 numpy log-softmax; the step against the plain head."""
    model = models.create_model(CFG, seed=0)
    rows = dpo_rows(7)
    chunked = compute_reference_logps(model, rows, batch_size=8, logits_chunk=5)
    b = stack(chunked)
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(b[f"ref_{side}_logp"], _numpy_logps(model, b, side), rtol=1e-5)
    if kind == "dpo":
        b["ref_chosen_logp"] = b["ref_chosen_logp"] + np.linspace(-2, 2, 8, dtype=np.float32)
        make = make_dpo_step
    else:
        b = sft_batch(7)
        make = make_sft_step
    out = []
    for chunk in (0, 5):
        cfg = STD.replace(logits_chunk=chunk)
        state = init_train_state(model, cfg)
        state, m = make(cfg, state)(state, b)
        out.append((state, m))
    (s0, m0), (s5, m5) = out
    for k in ("loss", "grad_norm") + (("accuracy",) if kind == "sft" else ()):
        np.testing.assert_allclose(m5[k], m0[k], rtol=1e-5, err_msg=k)
    # Adam divides by sqrt(v): where a gradient is ~1e-8 the summation order moves the update by a
    # fraction of the lr (1e-3), hence atol = 0.2% of the lr.
    for a, c in zip(flat_params(s0), flat_params(s5)):
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=2e-6)

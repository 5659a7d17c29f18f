"""Losses against formulas written independently in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metajudge.losses import dpo_loss, sequence_logps, sft_loss, token_logps


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_log_softmax(x):
    x = x.astype(np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def np_dpo(pc, pr, rc, rr, beta, ls, loss_type, w):
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        per = -(1 - ls) * np_log_sigmoid(beta * h) - ls * np_log_sigmoid(-beta * h)
    else:
        per = (h - 1 / (2 * beta)) ** 2
    wmean = lambda v: np.sum(w * v) / np.sum(w)
    rc_, rr_ = beta * (pc - rc), beta * (pr - rr)
    return wmean(per), {
        "rewards/chosen": wmean(rc_),
        "rewards/rejected": wmean(rr_),
        "rewards/margin": wmean(rc_ - rr_),
        "rewards/accuracy": wmean((rc_ > rr_).astype(np.float64)),
        "logps/chosen": wmean(pc),
        "logps/rejected": wmean(pr),
    }


def random_logps(seed, b=16):
    rng = np.random.default_rng(seed)
    return [-np.abs(rng.normal(50.0, 20.0, size=b)) for _ in range(4)]


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
@pytest.mark.parametrize("use_weights", [False, True])
def test_dpo_loss_matches_numpy_formula(loss_type, ls, use_weights):
    pc, pr, rc, rr = random_logps(0)
    w = np.ones(16)
    if use_weights:
        w = np.random.default_rng(1).uniform(0.0, 2.0, size=16)
        w[[3, 7, 11]] = 0.0
    beta = 0.1
    want, want_metrics = np_dpo(pc, pr, rc, rr, beta, ls, loss_type, w)
    loss, metrics = dpo_loss(
        *map(jnp.asarray, (pc, pr, rc, rr)),
        beta=beta,
        label_smoothing=ls,
        loss_type=loss_type,
        weights=jnp.asarray(w) if use_weights else None,
    )
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    for k, v in want_metrics.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_dpo_zero_weight_rows_do_not_count():
    pc, pr, rc, rr = random_logps(2, b=8)
    garbage = [np.concatenate([x, np.full(4, -1e4)]) for x in (pc, pr, rc, rr)]
    w = np.concatenate([np.ones(8), np.zeros(4)])
    full, _ = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)))
    padded, _ = dpo_loss(*map(jnp.asarray, garbage), weights=jnp.asarray(w))
    np.testing.assert_allclose(padded, full, rtol=1e-6)


def test_dpo_hand_example_equal_margin_gives_log2():
    z = jnp.zeros(3)
    loss, metrics = dpo_loss(z - 5.0, z - 7.0, z - 5.0, z - 7.0)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
    assert float(metrics["rewards/accuracy"]) == 0.0


def test_dpo_loss_is_jittable_and_gradients_finite():
    pc, pr, rc, rr = map(jnp.asarray, random_logps(3))

    @jax.jit
    def f(pc, pr):
        return dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)[0]

    for fn in (f, lambda a, b: dpo_loss(a, b, rc, rr, loss_type="ipo")[0]):
        g = jax.grad(fn, argnums=(0, 1))(pc, pr)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)
    # Extreme margins must not overflow log-sigmoid.
    g = jax.grad(lambda a: dpo_loss(a, pr, rc, rr)[0])(pc * 1e4)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_dpo_unknown_loss_type_names_valid_ones():
    z = jnp.zeros(2)
    with pytest.raises(ValueError, match="sigmoid.*ipo"):
        dpo_loss(z, z, z, z, loss_type="hinge")


def test_dpo_rejects_label_smoothing_with_ipo():
    z = jnp.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(z, z, z, z, loss_type="ipo", label_smoothing=0.1)


def random_lm_batch(seed, b=3, t=7, v=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t))
    mask = (rng.uniform(size=(b, t)) < 0.6).astype(np.float32)
    mask[0, 0] = 1.0
    return logits, targets, mask


def np_token_logps(logits, targets):
    lsm = np_log_softmax(logits)
    b, t = targets.shape
    return lsm[np.arange(b)[:, None], np.arange(t)[None, :], targets]


def test_sft_loss_matches_numpy():
    logits, targets, mask = random_lm_batch(0)
    tok = np_token_logps(logits, targets)
    want = -np.sum(tok * mask) / np.sum(mask)
    want_acc = np.sum((logits.argmax(-1) == targets) * mask) / np.sum(mask)
    loss, metrics = sft_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["n_tokens"], mask.sum())
    np.testing.assert_allclose(metrics["accuracy"], want_acc, rtol=1e-6)


def test_sft_loss_bf16_logits_reduce_in_float32():
    logits, targets, mask = random_lm_batch(1)
    lb = jnp.asarray(logits).astype(jnp.bfloat16)
    want = -np.sum(np_token_logps(np.asarray(lb.astype(jnp.float32)), targets) * mask) / mask.sum()
    loss, _ = sft_loss(lb, jnp.asarray(targets), jnp.asarray(mask))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_sft_loss_empty_mask_is_zero_and_grads_finite():
    logits, targets, mask = random_lm_batch(2)
    loss, _ = sft_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros_like(jnp.asarray(mask)))
    assert float(loss) == 0.0
    g = jax.grad(lambda x: sft_loss(x, jnp.asarray(targets), jnp.asarray(mask))[0])(jnp.asarray(logits))
    assert bool(jnp.all(jnp.isfinite(g)))


def test_sequence_and_token_logps_match_numpy():
    logits, targets, mask = random_lm_batch(3)
    tok = np_token_logps(logits, targets)
    got_tok = token_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(got_tok, tok * mask, rtol=1e-5, atol=1e-6)
    got = sequence_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    assert got.shape == (3,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np.sum(tok * mask, axis=-1), rtol=1e-5)

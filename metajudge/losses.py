"""Training losses: DPO (sigmoid / IPO), SFT cross-entropy, and sequence log-probs.

Conventions
-----------
* ``logits`` are ``[B, T, V]`` and already aligned with ``targets`` ``[B, T]``: ``logits[b, t]`` is
  the model's prediction of ``targets[b, t]`` (the data pipeline in ``metajudge.data`` emits
  ``inputs`` / ``targets`` pre-shifted, so no shifting happens here).
* ``mask`` is ``[B, T]``, 1 on tokens that count (response tokens), 0 elsewhere (prompt, padding,
  packing boundaries). Any float/bool/int dtype is accepted.
* All reductions run in float32 whatever the logits' dtype.
* Every function is pure and jittable; ``beta``, ``label_smoothing`` and ``loss_type`` are Python
  values (mark them static under ``jax.jit``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def _weighted_mean(x: Array, w: Array) -> Array:
    """``sum(w * x) / sum(w)``; 0 when every weight is 0."""
    return jnp.sum(w * x) / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    weights: Optional[Array] = None,
) -> tuple[Array, dict[str, Array]]:
    """DPO loss on per-sequence log-probs (each ``[B]``: sums over response tokens).

    With ``h = (pc - rc) - (pr - rr)`` (policy/reference, chosen/rejected log-prob sums):

    * ``"sigmoid"`` (Rafailov et al. 2023; conservative DPO label smoothing ``ls``)::

          loss_b = -(1 - ls) * log σ(β h) - ls * log σ(-β h)

    * ``"ipo"`` (Azar et al. 2023)::

          loss_b = (h - 1 / (2β))²

      (the IPO paper uses length-averaged log-probs; pass those in if you want that variant).

    The loss is the ``weights``-weighted mean over the batch (``weights`` ``[B]``, default all
    ones; a row with weight 0, e.g. batch padding, does not count). Metrics are weighted means too:
    ``rewards/chosen = β (pc - rc)``, ``rewards/rejected = β (pr - rr)``, ``rewards/margin`` their
    difference, ``rewards/accuracy`` the fraction with chosen reward > rejected reward,
    ``logps/chosen`` / ``logps/rejected`` the policy log-probs.

    Raises:
      ValueError: unknown ``loss_type``, or ``label_smoothing`` outside ``[0, 0.5)`` or non-zero
        with ``"ipo"``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if isinstance(label_smoothing, (int, float)):
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if loss_type == "ipo" and label_smoothing != 0.0:
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only")

    f32 = jnp.float32
    pc, pr = policy_chosen_logps.astype(f32), policy_rejected_logps.astype(f32)
    rc, rr = ref_chosen_logps.astype(f32), ref_rejected_logps.astype(f32)
    w = jnp.ones_like(pc) if weights is None else jnp.asarray(weights).astype(f32)

    chosen_logratio = pc - rc
    rejected_logratio = pr - rr
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        per_example = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(
            -beta * h
        )
    else:  # ipo
        per_example = (h - 1.0 / (2.0 * beta)) ** 2
    loss = _weighted_mean(per_example, w)

    chosen_rewards = beta * chosen_logratio
    rejected_rewards = beta * rejected_logratio
    metrics = {
        "loss": loss,
        "rewards/chosen": _weighted_mean(chosen_rewards, w),
        "rewards/rejected": _weighted_mean(rejected_rewards, w),
        "rewards/margin": _weighted_mean(chosen_rewards - rejected_rewards, w),
        "rewards/accuracy": _weighted_mean((chosen_rewards > rejected_rewards).astype(f32), w),
        "logps/chosen": _weighted_mean(pc, w),
        "logps/rejected": _weighted_mean(pr, w),
    }
    return loss, metrics


def token_logps(logits: Array, targets: Array, mask: Array) -> Array:
    """Per-token ``log softmax(logits)[targets]`` in float32, ``[B, T]``; 0 where ``mask`` is 0.

    Computed as ``logits[target] - logsumexp(logits)`` so no second ``[B, T, V]`` array is kept.
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(mask.astype(bool), logp, 0.0)


def sequence_logps(logits: Array, targets: Array, mask: Array) -> Array:
    """``[B]`` sum over ``t`` of ``mask[b, t] * log p(targets[b, t])`` (float32).

    With a packed row (several segments) this sums every segment together; unpack first, or use
    :func:`token_logps` and reduce per segment.
    """
    return jnp.sum(token_logps(logits, targets, mask) * mask.astype(jnp.float32), axis=-1)


def sft_loss(logits: Array, targets: Array, mask: Array) -> tuple[Array, dict[str, Array]]:
    """Masked token-level cross-entropy: ``-sum(mask * log p(target)) / sum(mask)``.

    The mean is over masked-in tokens of the whole batch (0 when there are none). Metrics:
    ``loss``, ``n_tokens`` (``sum(mask)``), ``accuracy`` (masked fraction of tokens whose argmax
    equals the target).
    """
    correct = jnp.argmax(logits, axis=-1) == targets
    return sft_loss_terms(token_logps(logits, targets, mask), correct, mask)


def sft_loss_terms(token_logp: Array, correct: Array, mask: Array) -> tuple[Array, dict[str, Array]]:
    """:func:`sft_loss` from per-token ``log p(target)`` and ``argmax == target`` ``[B, T]`` (what a
    chunked LM head gives without ``[B, T, V]`` logits)."""
    m = mask.astype(jnp.float32)
    n_tokens = jnp.sum(m)
    denom = jnp.maximum(n_tokens, 1.0)
    loss = -jnp.sum(jnp.where(mask.astype(bool), token_logp, 0.0) * m) / denom
    metrics = {"loss": loss, "n_tokens": n_tokens, "accuracy": jnp.sum(correct.astype(jnp.float32) * m) / denom}
    return loss, metrics

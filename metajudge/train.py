"""Training: the jitted SFT and DPO steps and the reference log-prob pass (the train state they
update, its config and optimizer: :mod:`metajudge.train_state`).

One call of a step is one optimizer update. With ``grad_accum_steps = A`` the batch of ``A * m``
rows is split into ``A`` micro-batches of ``m`` rows, run one after another under ``lax.scan`` (peak
activation memory of ``m`` rows), and each micro-batch's loss is weighted so that the accumulated
gradient equals the full batch's: SFT by its share of the batch's loss tokens, DPO by its share of
pairs.

A step never applies a non-finite update: when the loss, the gradient norm or the update norm is
NaN/inf the old parameters and optimizer state are returned unchanged (inside the jitted step, so
buffer donation is safe) and the host raises :class:`TrainingDiverged`.

Reference log-probs for DPO come with the batch (``ref_chosen_logp`` / ``ref_rejected_logp``), so
no reference model is held in memory; :func:`compute_reference_logps` fills them in once per
dataset.

Logits are computed only from ``loss_from`` on (a static position, :func:`first_loss_position` of
the dataset): the LM head and log-softmax over prompt tokens that carry no loss are skipped (a
quarter of the head for a 128-token prompt in a 512-token row). A batch with a loss token before
``loss_from`` is refused, never silently truncated.

On a mesh spanning several processes, batch rows are split over ``("data", "fsdp")`` and each
process feeds only the rows its devices hold (:func:`batch_rows`; ``TrainStep.put_batch``
also takes the whole global batch and keeps those rows). Parameters, optimizer state, step and
rng are global arrays, identical to a single-process run's on the same mesh shape.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metajudge.losses import dpo_loss, sft_loss_terms, token_logps
from metajudge.train_state import TrainConfig, TrainState, make_optimizer, make_schedule, train_state_shardings
from models.distributed import process_rows, put_global, put_process_rows, to_host
from models.sharding import compiler_options, data_parallel_size

Array = jax.Array
Batch = dict[str, Any]

LOSS_FROM_MULTIPLE = 8  # loss_from is rounded down to this, so the head's matmul keeps aligned rows
_DPO_FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or update; the update was not applied.

    ``state`` holds the last good train state (the step's donated input, returned unchanged).
    """

    def __init__(self, message: str, *, step: int, metrics: dict[str, float], state: Any = None):
        super().__init__(message)
        self.step, self.metrics, self.state = step, metrics, state


# ----------------------------------------------------------------------------------- the steps


def first_loss_position(rows: Sequence[dict] | Batch, kind: str = "dpo") -> int:
    """The earliest position holding a loss token in any row (``"sft"`` or ``"dpo"`` rows, or a
    batch of them), rounded down to a multiple of ``LOSS_FROM_MULTIPLE``: the ``loss_from`` a
    :class:`TrainStep` may use for them. 0 when no row has a loss token."""
    keys = ("loss_mask",) if kind == "sft" else ("chosen_loss_mask", "rejected_loss_mask")
    masks = [rows[k] for k in keys] if isinstance(rows, dict) else [r[k] for r in rows for k in keys]
    firsts = [int(np.argmax(row)) for m in masks for row in np.atleast_2d(np.asarray(m)) if np.any(row)]
    return min(firsts, default=0) // LOSS_FROM_MULTIPLE * LOSS_FROM_MULTIPLE


def target_logps(model: nnx.Module, h: Array, targets: Array, chunk: int) -> tuple[Array, Array]:
    """Per-token ``log p(targets)`` ``[B, T]`` (float32) and whether the argmax is the target, from
    final hidden states ``h`` ``[B, T, D]``.

    With ``0 < chunk < T`` the LM head and log-softmax run over ``chunk`` positions at a time
    (``lax.map``), each chunk under ``jax.checkpoint``: the forward keeps only ``h``, the backward
    recomputes one chunk's logits at a time, so no ``[B, T, V]`` array exists in either pass (the
    price: the head's matmul runs once more). Otherwise the whole ``[B, T, V]`` logits are built.
    The values are the same either way (:func:`metajudge.losses.token_logps`).
    """
    def head(hc: Array, tc: Array) -> tuple[Array, Array]:
        logits = model.logits(hc)
        return token_logps(logits, tc, jnp.ones_like(tc)), jnp.argmax(logits, axis=-1) == tc

    b, t, d = h.shape
    if chunk <= 0 or t <= chunk:
        return head(h, targets)
    n = -(-t // chunk)
    h = jnp.pad(h, ((0, 0), (0, n * chunk - t), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, n * chunk - t)))
    split = lambda x: jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)
    lp, ok = jax.lax.map(lambda a: jax.checkpoint(head)(*a), (split(h), split(targets)))
    join = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * chunk)[:, :t]
    return join(lp), join(ok)


def _forward(graphdef, params, inputs, positions, segment_ids, targets, loss_from: int, chunk: int) -> tuple[Array, Array]:
    """:func:`target_logps` of ``targets[:, loss_from:]``: hidden states of every position, the head
    from ``loss_from`` on."""
    model = nnx.merge(graphdef, params)
    h, _ = model.hidden_states(inputs, positions=positions, segment_ids=segment_ids)
    return target_logps(model, h[:, loss_from:], targets[:, loss_from:], chunk)


def _sft_micro_loss(params, mb, *, graphdef, n_total, loss_from: int, chunk: int):
    """Micro-batch cross-entropy weighted by its share of the batch's loss tokens."""
    lp, correct = _forward(graphdef, params, mb["inputs"], mb["positions"], mb["segment_ids"], mb["targets"],
                           loss_from, chunk)
    loss, m = sft_loss_terms(lp, correct, mb["loss_mask"][:, loss_from:])
    share = m["n_tokens"] / n_total
    return loss * share, {"loss": loss * share, "accuracy": m["accuracy"] * share, "n_tokens": m["n_tokens"]}


def _interleave(mb: Batch, field: str) -> Array:
    """``[B, T]`` chosen and rejected rows -> ``[2B, T]`` (pair i at rows 2i, 2i+1: a pair stays on one shard)."""
    c, r = mb[f"chosen_{field}"], mb[f"rejected_{field}"]
    return jnp.stack([c, r], axis=1).reshape((-1,) + c.shape[1:])


def _pair_logps(graphdef, params, mb: Batch, loss_from: int, chunk: int = 0) -> Array:
    """``[B, 2]`` chosen/rejected response log-prob sums, from one forward over both."""
    fields = (_interleave(mb, f) for f in ("inputs", "positions", "segment_ids", "targets"))
    lp, _ = _forward(graphdef, params, *fields, loss_from=loss_from, chunk=chunk)
    mask = _interleave(mb, "loss_mask")[:, loss_from:].astype(jnp.float32)
    return jnp.sum(lp * mask, axis=-1).reshape(-1, 2)


def _dpo_micro_loss(params, mb, *, graphdef, n_total, cfg: TrainConfig, loss_from: int):
    """One forward over chosen and rejected rows; DPO loss weighted by the micro-batch's share of pairs."""
    logps = _pair_logps(graphdef, params, mb, loss_from, cfg.logits_chunk)
    loss, m = dpo_loss(
        logps[:, 0], logps[:, 1], mb["ref_chosen_logp"], mb["ref_rejected_logp"],
        beta=cfg.beta, label_smoothing=cfg.label_smoothing, loss_type=cfg.loss_type,
    )
    share = logps.shape[0] / n_total
    return loss * share, {k: v * share for k, v in m.items()}


def _accumulate(loss_fn, params, batch: Batch, accum: int, constrain_mb) -> tuple[Any, dict]:
    """Gradient and metrics summed over ``accum`` micro-batches (rows ``a, a+A, a+2A, ...``)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (_, metrics), grads = grad_fn(params, constrain_mb(batch))
        return grads, metrics

    def split(x):  # [A*m, ...] -> [A, m, ...]; contiguous per-device blocks stay put
        return jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1)

    micro = jax.tree.map(split, batch)

    def body(carry, mb):
        (_, metrics), grads = grad_fn(params, constrain_mb(mb))
        return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    metrics_shape = jax.eval_shape(loss_fn, params, jax.tree.map(lambda x: x[0], micro))[1]
    zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape))
    (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
    return grads, metrics


def _update(state: TrainState, grads, metrics: dict, cfg: TrainConfig) -> tuple[TrainState, dict]:
    """Applies the optimizer unless loss, gradient or update is non-finite (then nothing changes)."""
    tx = make_optimizer(cfg)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    rng = jax.random.split(state.rng)[0]
    new = TrainState(
        keep(params, state.params), keep(opt_state, state.opt_state),
        state.step + ok.astype(jnp.int32), jnp.where(ok, rng, state.rng), state.graphdef,
    )
    metrics = dict(metrics, grad_norm=grad_norm, lr=make_schedule(cfg)(state.step), finite=ok)
    return new, metrics


def _sft_update(state: TrainState, batch: Batch, *, cfg: TrainConfig, constrain_mb, loss_from: int) -> tuple[TrainState, dict]:
    n_total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    loss_fn = functools.partial(_sft_micro_loss, graphdef=state.graphdef, n_total=n_total, loss_from=loss_from,
                                chunk=cfg.logits_chunk)
    grads, metrics = _accumulate(loss_fn, state.params, batch, cfg.grad_accum_steps, constrain_mb)
    return _update(state, grads, metrics, cfg)


def _dpo_update(state: TrainState, batch: Batch, *, cfg: TrainConfig, constrain_mb, loss_from: int) -> tuple[TrainState, dict]:
    loss_fn = functools.partial(
        _dpo_micro_loss, graphdef=state.graphdef, n_total=batch["chosen_inputs"].shape[0], cfg=cfg, loss_from=loss_from
    )
    grads, metrics = _accumulate(loss_fn, state.params, batch, cfg.grad_accum_steps, constrain_mb)
    return _update(state, grads, metrics, cfg)


_STEP_CACHE: dict = {}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over ``("data", "fsdp")``."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def batch_rows(mesh: Optional[Mesh], batch_size: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of every ``batch_size``-row batch this process feeds to its devices
    (all of them on a single process)."""
    if mesh is None:
        return 0, batch_size
    return process_rows(batch_sharding(mesh), batch_size)


def _jit_update(kind: str, cfg: TrainConfig, state: TrainState, mesh: Optional[Mesh], batch_sharding, loss_from: int) -> Callable:
    update = functools.partial(_sft_update if kind == "sft" else _dpo_update, loss_from=loss_from)
    if mesh is None:
        return jax.jit(functools.partial(update, cfg=cfg, constrain_mb=lambda mb: mb), donate_argnums=0)
    constrain_mb = lambda mb: jax.lax.with_sharding_constraint(mb, batch_sharding)
    sh = train_state_shardings(state, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        functools.partial(update, cfg=cfg, constrain_mb=constrain_mb),
        in_shardings=(sh, batch_sharding), out_shardings=(sh, replicated), donate_argnums=0,
        compiler_options=compiler_options(mesh, windowed_einsum=cfg.windowed_einsum),
    )


class TrainStep:
    """A jitted SFT or DPO step: ``state, metrics = step(state, batch)``.

    The state argument is donated: use only the returned state afterwards. Metrics come back as
    Python floats; a non-finite loss/gradient/update raises :class:`TrainingDiverged` (carrying
    the unchanged state) instead of returning.

    ``loss_from``: no row of any batch has a loss token before this position (take it from
    :func:`first_loss_position` of the dataset); logits are computed from there on only.
    """

    def __init__(self, kind: str, cfg: TrainConfig, state: TrainState, mesh: Optional[Mesh] = None,
                 batch_size: Optional[int] = None, loss_from: int = 0):
        if kind not in ("sft", "dpo"):
            raise ValueError(f"kind must be 'sft' or 'dpo', got {kind!r}")
        if loss_from < 0:
            raise ValueError(f"loss_from must be >= 0, got {loss_from}")
        self.kind, self.cfg, self.mesh, self.loss_from = kind, cfg, mesh, int(loss_from)
        self.batch_size = batch_size  # rows per step over all processes (None: whatever each batch has)
        self.batch_sharding = None if mesh is None else batch_sharding(mesh)
        # One jitted function per (kind, config, mesh, state layout): a later run with the same setup
        # (the next DPO iteration, say) reuses the compiled step instead of compiling it again.
        key = (kind, cfg, mesh, self.loss_from, jax.tree.structure(state), tuple(x.shape for x in jax.tree.leaves(state)))
        if key not in _STEP_CACHE:
            if len(_STEP_CACHE) >= 8:
                _STEP_CACHE.pop(next(iter(_STEP_CACHE)))  # the oldest
            _STEP_CACHE[key] = _jit_update(kind, cfg, state, mesh, self.batch_sharding, self.loss_from)
        self.jitted = _STEP_CACHE[key]

    @property
    def data_parallel(self) -> int:
        return data_parallel_size(self.mesh)

    def put_batch(self, batch: Batch) -> Batch:
        """Numpy batch -> device arrays, rows split over ``("data", "fsdp")``.

        On a multi-process mesh ``batch`` is either this process's rows of a ``batch_size``-row
        global batch (:func:`batch_rows`) or the whole global batch, of which it keeps those rows.
        """
        batch = {k: v for k, v in batch.items() if k in _batch_keys(self.kind)}
        missing = sorted(set(_batch_keys(self.kind)) - set(batch))
        if missing:
            hint = " (fill them with compute_reference_logps)" if "ref_chosen_logp" in missing else ""
            raise ValueError(f"{self.kind} batch lacks {', '.join(missing)}{hint}")
        if self.loss_from and any(np.any(np.asarray(batch[k])[:, : self.loss_from]) for k in batch if k.endswith("loss_mask")):
            raise ValueError(
                f"a {self.kind} batch has loss tokens before position loss_from={self.loss_from}; build the "
                f"step with loss_from=first_loss_position(all rows) (or 0)"
            )
        rows = len(next(iter(batch.values())))
        total = self.batch_size or rows
        need = self.data_parallel * self.cfg.grad_accum_steps
        if total % need:
            raise ValueError(
                f"batch of {total} rows does not split into grad_accum_steps={self.cfg.grad_accum_steps} "
                f"micro-batches over {self.data_parallel} data-parallel devices; use a multiple of {need}"
            )
        if self.batch_sharding is None:
            return jax.device_put(batch)
        if self.batch_sharding.is_fully_addressable:
            return {k: jax.device_put(np.asarray(v), self.batch_sharding) for k, v in batch.items()}
        start, stop = process_rows(self.batch_sharding, total)
        if rows == total:
            batch = {k: np.asarray(v)[start:stop] for k, v in batch.items()}
        elif rows != stop - start:
            raise ValueError(f"a batch of {rows} rows is neither the global batch ({total} rows) nor this process's "
                             f"rows {start}:{stop} of it")
        return {k: put_process_rows(v, self.batch_sharding, total) for k, v in batch.items()}

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, float]]:
        step = int(state.step)
        state, metrics = self.jitted(state, self.put_batch(batch))
        metrics = {k: float(to_host(v)) for k, v in metrics.items()}
        if not metrics.pop("finite"):
            raise TrainingDiverged(
                f"training diverged at step {step + 1}: loss={metrics['loss']:.6g}, "
                f"grad_norm={metrics['grad_norm']:.6g}, lr={metrics['lr']:.3g}; the update was not applied. "
                "Lower the learning rate (--set train.learning_rate=...) or check the data of this batch.",
                step=step + 1, metrics=metrics, state=state,
            )
        return state, metrics


def _batch_keys(kind: str) -> tuple[str, ...]:
    if kind == "sft":
        return _DPO_FIELDS
    return tuple(f"{s}_{f}" for s in ("chosen", "rejected") for f in _DPO_FIELDS) + ("ref_chosen_logp", "ref_rejected_logp")


def make_sft_step(cfg: TrainConfig, state: TrainState, mesh: Optional[Mesh] = None, *, loss_from: int = 0) -> TrainStep:
    """The jitted SFT step (masked token cross-entropy) for states shaped like ``state``."""
    return TrainStep("sft", cfg, state, mesh, loss_from=loss_from)


def make_dpo_step(cfg: TrainConfig, state: TrainState, mesh: Optional[Mesh] = None, *, loss_from: int = 0) -> TrainStep:
    """The jitted DPO step (reference log-probs from the batch) for states shaped like ``state``."""
    return TrainStep("dpo", cfg, state, mesh, loss_from=loss_from)


# ------------------------------------------------------------------------- reference log-probs


@functools.lru_cache(maxsize=8)
def _pair_scorer(graphdef, loss_from: int, chunk: int = TrainConfig.logits_chunk) -> Callable:
    """Jitted ``(params, batch) -> [B, 2]`` chosen/rejected log-prob sums (cached per model layout)."""
    return jax.jit(functools.partial(_pair_logps, graphdef, loss_from=loss_from, chunk=chunk))


def compute_reference_logps(
    model: nnx.Module, dataset_rows: Sequence[dict], batch_size: int, *, mesh: Optional[Mesh] = None,
    logits_chunk: int = TrainConfig.logits_chunk,
) -> list[dict]:
    """Copies of DPO rows (from ``build_dpo_examples``) with ``ref_chosen_logp`` / ``ref_rejected_logp``.

    Log-probs are summed over each response's ``loss_mask`` under ``model`` (the reference, i.e.
    the model at the start of the DPO iteration). The last batch is padded by repetition so only
    one shape is compiled. ``logits_chunk`` bounds the logits' memory as in :func:`target_logps`.
    """
    if not dataset_rows:
        return []
    graphdef, params = nnx.split(model)
    sharding = None
    if mesh is not None:
        dp = data_parallel_size(mesh)
        batch_size = math.ceil(batch_size / dp) * dp
        sharding = batch_sharding(mesh)
    score = _pair_scorer(graphdef, first_loss_position(dataset_rows, "dpo"), logits_chunk)
    keys = _batch_keys("dpo")[:-2]
    out: list[dict] = []
    for start in range(0, len(dataset_rows), batch_size):
        rows = list(dataset_rows[start : start + batch_size])
        n = len(rows)
        rows += [rows[-1]] * (batch_size - n)
        batch = {k: np.stack([r[k] for r in rows]) for k in keys}
        batch = {k: put_global(v, sharding) for k, v in batch.items()} if sharding is not None else batch
        logps = to_host(score(params, batch))[:n]
        for row, (c, r) in zip(rows[:n], logps):
            out.append(dict(row, ref_chosen_logp=np.float32(c), ref_rejected_logp=np.float32(r)))
    return out

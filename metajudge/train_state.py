"""The train state and what builds it: ``TrainConfig``, the optimizer and its schedule, the
``TrainState`` pytree (parameters, optimizer state, step, RNG) and its placement on a mesh.

The jitted steps that update it are in :mod:`metajudge.train`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metajudge.losses import DPO_LOSS_TYPES
from models.distributed import put_global
from models.llama import with_sharding
from models.sharding import ShardingContext

Array = jax.Array

DECAYS = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization settings shared by SFT and DPO (defaults follow METHODS.md for DPO)."""

    learning_rate: float = 1e-6
    warmup_steps: int = 10
    total_steps: int = 0  # 0: derived from the data (len // batch_size * num_epochs) by the caller
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # the decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.0  # AdamW, on parameters with >= 2 dims only (not norm scales)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 1.0  # 0 disables clipping
    grad_accum_steps: int = 1
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    remat: bool = False  # rematerialize each decoder block in the backward pass
    # The LM head and log-softmax run over this many positions at a time, each chunk recomputed in
    # the backward pass, so [B, T, V] logits never exist; rows of at most this many loss positions
    # take the plain path (whole logits, nothing recomputed). 0: always the plain path.
    logits_chunk: int = 1024
    # TPU only: let the compiler overlap the all-gathers of sharded matmuls with the matmuls
    # (models.sharding.compiler_options). False trades that overlap for memory.
    windowed_einsum: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.grad_accum_steps < 1 or self.warmup_steps < 0 or self.total_steps < 0 or self.logits_chunk < 0:
            raise ValueError("grad_accum_steps must be >= 1; warmup_steps, total_steps and logits_chunk >= 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------ optimizer


def make_schedule(cfg: TrainConfig) -> Callable[[Array], Array]:
    """``lr(s) = lr · min(1, (s+1)/W) · f(clip((s-W)/(S-W), 0, 1))`` for ``W`` warmup, ``S`` total steps.

    ``f(t) = r + (1-r)·(1+cos πt)/2`` (cosine), ``1 - (1-r)·t`` (linear) or ``1`` (constant), with
    ``r = min_lr_ratio``. The first update already uses ``lr/W`` (not 0).
    """
    lr, w, r = cfg.learning_rate, cfg.warmup_steps, cfg.min_lr_ratio
    span = max(cfg.total_steps - w, 1)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (s + 1.0) / w) if w > 0 else 1.0
        t = jnp.clip((s - w) / span, 0.0, 1.0)
        if cfg.decay == "cosine":
            f = r + (1.0 - r) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        elif cfg.decay == "linear":
            f = 1.0 - (1.0 - r) * t
        else:
            f = 1.0
        return lr * warm * f

    return schedule


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on :func:`make_schedule`; decay skips 1-D parameters.

    Gradient accumulation is done inside the step (see the module doc), not by the optimizer.
    """
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(
        make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    return adamw


# ---------------------------------------------------------------------------------- train state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, optimizer state, update count and RNG; the graphdef rides along as static data."""

    params: Any  # nnx.State of nnx.Param (Variables keep their logical_axes metadata)
    opt_state: Any  # optax state; its param-shaped parts are Variables with the params' metadata
    step: Array  # int32 scalar: optimizer updates applied
    rng: Array  # uint32[2] raw PRNG key, split once per applied update
    graphdef: Any = dataclasses.field(metadata=dict(static=True))

    def replace(self, **changes: Any) -> "TrainState":
        return dataclasses.replace(self, **changes)

    @property
    def model(self) -> nnx.Module:
        """The model with these parameters (shares the arrays)."""
        return nnx.merge(self.graphdef, self.params)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _split_model(model: nnx.Module, remat: bool, mesh: Optional[Mesh]) -> tuple[Any, Any]:
    """``(graphdef, params)``; the graphdef's activation constraints are re-pointed at ``mesh``
    (so a model built for one mesh trains or restores on another) and ``remat`` is switched on."""
    _, _, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model holds non-Param state; TrainState only carries nnx.Param variables")
    old = getattr(model, "shard", None)
    clone = with_sharding(model,  # new module objects: the caller's model is left as it is
                          None if mesh is None else (ShardingContext(mesh) if old is None else ShardingContext(mesh, old.rules)))
    if remat and hasattr(clone, "config"):
        clone.config = clone.config.replace(remat=True)
    return nnx.split(clone, nnx.Param)


def train_state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """``NamedSharding`` of every leaf: params and their optimizer moments by the model's rules,
    everything else (counts, step, rng) replicated. Works on concrete or abstract states."""
    ctx = ShardingContext(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if _is_var(x):
            return x.replace(ctx.sharding(x.get_metadata().get("logical_axes"), x.value.shape))
        return replicated

    tree = lambda t: jax.tree.map(one, t, is_leaf=_is_var)
    return TrainState(tree(state.params), tree(state.opt_state), replicated, replicated, state.graphdef)


def init_train_state(model: nnx.Module, cfg: TrainConfig, mesh: Optional[Mesh] = None) -> TrainState:
    """A fresh train state; with a mesh, params and optimizer state are placed by the model's rules."""
    graphdef, params = _split_model(model, cfg.remat, mesh)
    tx = make_optimizer(cfg)
    step = jnp.zeros((), jnp.int32)
    rng = jax.random.PRNGKey(cfg.seed)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # fresh buffers: the step donates them, not the model's
    if mesh is None:
        params = jax.jit(copy)(params)
        return TrainState(params, jax.jit(tx.init)(params), step, rng, graphdef)
    abstract = TrainState(params, jax.eval_shape(tx.init, params), step, rng, graphdef)
    sh = train_state_shardings(abstract, mesh)
    params = jax.jit(copy, out_shardings=sh.params)(params)
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
    return TrainState(params, opt_state, put_global(np.asarray(step), sh.step), put_global(np.asarray(rng), sh.rng), graphdef)


def abstract_train_state(model: nnx.Module, cfg: TrainConfig, mesh: Optional[Mesh] = None) -> TrainState:
    """Shapes, dtypes and target shardings of :func:`init_train_state` (nothing is allocated).

    ``model`` may itself be abstract (``nnx.eval_shape``). Without a mesh, leaves go to device 0.
    """
    graphdef, params = _split_model(model, cfg.remat, mesh)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state = TrainState(
        params, jax.eval_shape(make_optimizer(cfg).init, params),
        jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32), graphdef,
    )
    if mesh is None:
        sh = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
    else:
        sh = train_state_shardings(state, mesh)
    return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), state, sh)

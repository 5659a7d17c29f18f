"""The run configuration in one place: the loop's settings, the evaluation's, the model options, the presets.

- :class:`LoopConfig`: everything one run of the loop depends on. The model options are its
  fields ``dtype``, ``mesh``, ``attention_impl`` (``xla``, ``pallas`` or ``auto``: Pallas on
  TPU/GPU, XLA on CPU) and ``remat`` (rematerialise each decoder block in the backward pass); they
  apply to every model the run loads (M_t, M_0, the evaluation's models) and are saved with each
  exported model (``models.loading.save_hf``).
- :class:`EvalConfig`: the held-out evaluation (``LoopConfig.evaluate``; ``experiments.evaluate``).
- :class:`RunInfo`: what the evaluation reads back from a run's ``config.json``.
- The presets :func:`tiny`, :func:`smollm2_cpu`, :func:`llama3_8b_paper` (:func:`get_preset`).
- The DPO settings are the training library's own ``metajudge.trainer.DPORunConfig`` (with
  ``metajudge.train_state.TrainConfig``).

Every field can be set with ``--set dotted.name=value`` (``experiments.cli.apply_overrides``),
except the DPO settings the loop derives (:data:`DPO_DERIVED`): a ``--set`` of one of those is a
usage error saying what it follows. :func:`resolve` fills them in; :func:`resolved_dict` is the
``config.json`` of a run, whose ``derived`` section says where each derived or forced value comes from.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal, Mapping, Optional

from experiments.cli import UsageError, config_dict
from metajudge import meta_judge as mj
from metajudge.pairs import Tiebreak
from metajudge.roles import Sampling
from metajudge.train_state import TrainConfig
from metajudge.trainer import DPORunConfig
from models.sharding import data_parallel_size
from models.sources import TINY_MODEL

AttentionImpl = Literal["xla", "pallas", "auto"]


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Where the loop's metrics go besides ``metrics.json(l)`` and the plots (``metajudge.metric_log``):
    TensorBoard event files always; Weights & Biases with ``wandb=True``."""

    wandb: bool = False
    wandb_project: str = "metajudge"
    wandb_mode: Literal["online", "offline"] = "online"  # offline: no network, files under <out>/wandb


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How a run's models are evaluated on held-out prompts (``LoopConfig.evaluate``)."""

    enabled: bool = True  # the loop evaluates every iteration (the CLI ignores this)
    max_prompts: int = 64  # cap on the held-out prompts used (0 = all of them)
    # One answer per prompt (model and baseline); answer.n must be 1.
    answer: Sampling = Sampling(n=1, temperature=0.7, top_p=0.9, max_new_tokens=256)
    judge: Optional[str] = None  # a models.load_model source or "tiny"; None = the run's seed model
    baseline: Optional[str] = None  # None = the run's seed model
    prompts: Optional[str] = None  # JSONL of evaluation prompts; None = <run>/heldout_prompts.jsonl
    external_judge: Optional[str] = None  # "module:function" replacing the model judge
    readout: Literal["logprob", "verdict"] = "logprob"
    judge_sampling: Sampling = Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=64)  # readout=verdict
    batch_size: int = 32  # sequences per generation / forward batch, triples per external-judge call
    prompts_per_shard: int = 16
    n_boot: int = 2000
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0 (0 = all), got {self.max_prompts}")
        if self.answer.n != 1:
            raise ValueError(f"answer.n must be 1 (one answer per prompt is judged against the baseline's), "
                             f"got {self.answer.n}")
        if self.readout not in ("logprob", "verdict"):
            raise ValueError(f"readout must be 'logprob' or 'verdict', got {self.readout!r}")
        if self.batch_size < 1 or self.prompts_per_shard < 1 or self.n_boot < 1:
            raise ValueError("batch_size, prompts_per_shard and n_boot must be >= 1")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Everything one run of the loop depends on; saved (resolved) as ``<out>/config.json``."""

    method: Literal["meta_reward", "self_reward"] = "meta_reward"
    model: str = "smollm2-135m-instruct"  # any models.load_model source, or "tiny" (models.sources)
    tokenizer: Optional[str] = None  # default: the model's own (the embedded one for "tiny")
    dtype: str = "float32"  # compute dtype of every model (and of the exported models)
    # Master weights and optimizer moments: float32 by default, so updates of lr ~1e-6 are not
    # rounded away in bfloat16 (sampling and scoring use a copy cast to `dtype`).
    param_dtype: str = "float32"
    mesh: Optional[str] = None  # e.g. "data=2,fsdp=-1,tensor=4"; default: every device on fsdp
    attention_impl: AttentionImpl = "xla"  # "auto": Pallas on TPU/GPU, XLA on CPU
    remat: bool = False  # the models rematerialise each decoder block when differentiated
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
    # How the actor pair is picked within its score bands (metajudge/pairs.py): "length" (length
    # control: the shortest chosen, the longest rejected) or "random" (uniform, seeded per run,
    # iteration and prompt; with rho=0 Self-Rewarding's best vs worst with no length preference).
    pair_tiebreak: Tiebreak = "length"
    judge_pair_iterations: tuple[int, ...] = (1, 2)
    # How meta-judge battles become Elo inputs (metajudge/meta_judge.py): "paper" weighs hard
    # verdicts by the batch's position-bias weights ω; "order_averaged" scores each pair by the
    # probability that m beats n averaged over both orders, which still ranks judgments when the
    # meta-judge picks the same position every time (the 135M model does).
    battle_rule: mj.BattleRule = "paper"
    # Temporal anchoring (METHODS.md): rejected responses anchored to the initial model M_0 and
    # chosen responses from a temporary future model M_f = DPO(M_t, anchored pairs). With
    # method=self_reward this is Temporal Self-Rewarding; with meta_reward, the combination.
    temporal: bool = False
    future_dpo: Optional[DPORunConfig] = None  # how M_f is trained; default: the `dpo` settings
    judgment_max_chars: int = 1500  # chosen judgments longer than this are dropped
    gen_batch_size: int = 64
    prompts_per_shard: int = 8
    dpo: DPORunConfig = DPORunConfig(max_len=768, batch_size=8, num_epochs=1, save_every=50,
                                     train=TrainConfig(learning_rate=1e-6, beta=0.1, warmup_steps=2))
    evaluate: EvalConfig = EvalConfig()  # held-out win rates of M_{t+1} against the seed (experiments/evaluate.py)
    log: LogConfig = LogConfig()  # TensorBoard and W&B

    def __post_init__(self) -> None:
        if not self.rho:
            raise ValueError("rho needs at least one value (the last one repeats)")

    def group_default(self, name: str) -> Any:
        """What an unset optional group of settings means (``--set future_dpo.x=...`` starts here)."""
        return self.dpo if name == "future_dpo" else None

    def fixed_keys(self) -> dict[str, str]:
        """Dotted names ``--set`` refuses, with the reason (the loop derives them: :data:`DPO_DERIVED`)."""
        return {f"{group}.{k}": f"the loop sets it: {why(group)}" for group in ("dpo", "future_dpo")
                for k, why in DPO_DERIVED.items()}

    def rho_at(self, t: int) -> float:
        return self.rho[min(t, len(self.rho)) - 1]

    def model_options(self) -> dict[str, Any]:
        """The options every model of the run is loaded with (``models.sources.load_model_and_tokenizer``)."""
        return {"dtype": self.dtype, "param_dtype": self.param_dtype, "attention_impl": self.attention_impl,
                "remat": self.remat}


# ------------------------------------------------------------------------ derived settings

_M_T = "DPO trains M_t (`model` at t = 1, else iter_<t-1>/dpo/model)"

# DPO settings the loop derives, for `dpo` and `future_dpo`: the reason, by group.
DPO_DERIVED: dict[str, Any] = {
    "mesh": lambda g: "it follows `mesh` (DPO trains the model on the mesh it was loaded on); set mesh",
    "dtype": lambda g: "it follows `dtype` (the loaded model's); set dtype",
    "train.seed": lambda g: "it follows `seed`; set seed",
    "preset": lambda g: f"unused: {_M_T}; set model",
    "model": lambda g: f"unused: {_M_T}; set model",
    "tokenizer": lambda g: "unused: DPO uses the run's tokenizer; set tokenizer",
    "data": lambda g: "iter_<t>/pairs/pairs.jsonl" if g == "dpo" else "iter_<t>/future/anchored/pairs.jsonl",
    "out": lambda g: "iter_<t>/dpo" if g == "dpo" else "iter_<t>/future/dpo",
    "export": lambda g: ("always true: the next iteration and the evaluation load M_{t+1} from iter_<t>/dpo/model"
                         if g == "dpo" else "always false: M_f only samples and is deleted"),
}
_FOLLOWS = {"mesh": "mesh", "dtype": "dtype", "train.seed": "seed"}


def _get(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def _resolve_dpo(cfg: LoopConfig, group: str, run: DPORunConfig) -> DPORunConfig:
    """``run`` with the derived settings filled in; a derived setting given another value than its
    default or the one it follows is a usage error."""
    default = DPORunConfig()
    for key, why in DPO_DERIVED.items():
        value = _get(run, key)
        follows = _get(cfg, _FOLLOWS[key]) if key in _FOLLOWS else _get(default, key)
        if value != _get(default, key) and value != follows:
            raise UsageError(f"{group}.{key}={value!r} cannot be set in the loop: {why(group)}")
    train = run.train.replace(seed=cfg.seed, remat=run.train.remat or cfg.remat)
    return dataclasses.replace(run, mesh=cfg.mesh, dtype=cfg.dtype, train=train)


def resolve(cfg: LoopConfig) -> LoopConfig:
    """``cfg`` with every derived setting filled in (see :func:`derived`); idempotent."""
    if cfg.method not in ("meta_reward", "self_reward"):
        raise UsageError(f"method={cfg.method!r}: expected meta_reward or self_reward")
    fut = cfg.future_dpo and _resolve_dpo(cfg, "future_dpo", cfg.future_dpo)
    return dataclasses.replace(cfg, dpo=_resolve_dpo(cfg, "dpo", cfg.dpo), future_dpo=fut)


def derived(cfg: LoopConfig) -> dict[str, str]:
    """Where each derived, forced or defaulted value of the run comes from (``config.json``'s ``derived``)."""
    out: dict[str, str] = {}
    if cfg.tokenizer is None:
        out["tokenizer"] = "null: the model's own (the embedded SmolLM2's for tiny)"
    for group in ("dpo", "future_dpo"):  # future_dpo's apply to M_f (temporal) even when it is null
        out.update({f"{group}.{k}": why(group) for k, why in DPO_DERIVED.items()})
        out[f"{group}.train.remat"] = "dpo.train.remat or remat"
        out[f"{group}.batch_size"] = ("shrinks to the largest multiple of data*fsdp*train.grad_accum_steps the "
                                      "pairs fill when they are fewer than one batch (printed; in iter_<t>/dpo/config.json)")
    if cfg.future_dpo is None:
        out["future_dpo"] = "null: M_f is trained with the dpo settings"
    out["evaluate.answer.n"] = "1: one answer per prompt (the only value accepted)"
    for name in ("judge", "baseline"):
        if getattr(cfg.evaluate, name) is None:
            out[f"evaluate.{name}"] = "null: the run's seed model (model)"
    return out


def resolved_dict(cfg: LoopConfig) -> dict:
    """The run's ``config.json``: every setting of ``resolve(cfg)``, then the ``derived`` section."""
    cfg = resolve(cfg)
    return {**config_dict(cfg), "derived": derived(cfg)}


# ------------------------------------------------------------------------------- validation


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sampling_problems(name: str, s: Sampling) -> list[str]:
    out = []
    if not (isinstance(s.n, int) and s.n >= 1):
        out.append(f"{name}.n={s.n!r}: must be an integer >= 1")
    if not (_finite(s.temperature) and s.temperature >= 0):
        out.append(f"{name}.temperature={s.temperature!r}: must be a finite number >= 0")
    if not (_finite(s.top_p) and 0 < s.top_p <= 1):
        out.append(f"{name}.top_p={s.top_p!r}: must lie in (0, 1]")
    if not (isinstance(s.top_k, int) and s.top_k >= 0):
        out.append(f"{name}.top_k={s.top_k!r}: must be an integer >= 0")
    if not (isinstance(s.max_new_tokens, int) and s.max_new_tokens >= 1):
        out.append(f"{name}.max_new_tokens={s.max_new_tokens!r}: must be an integer >= 1")
    return out


def _dpo_problems(group: str, run: DPORunConfig, dp: int) -> list[str]:
    out = []
    for key in ("batch_size", "max_len", "num_epochs", "save_every", "keep", "ref_batch_size"):
        v = getattr(run, key)
        if not (isinstance(v, int) and v >= 1):
            out.append(f"{group}.{key}={v!r}: must be an integer >= 1")
    if isinstance(run.max_len, int) and run.max_len < 2:
        out.append(f"{group}.max_len={run.max_len}: must be >= 2 (a prompt token and a response token)")
    mpl = run.max_prompt_len
    if mpl is not None and not (isinstance(mpl, int) and 1 <= mpl < max(run.max_len, 2)):
        out.append(f"{group}.max_prompt_len={mpl!r}: must be an integer in [1, max_len)")
    if run.stop_after < 0:
        out.append(f"{group}.stop_after={run.stop_after}: must be >= 0")
    tr = run.train
    if not (_finite(tr.learning_rate) and tr.learning_rate > 0):
        out.append(f"{group}.train.learning_rate={tr.learning_rate!r}: must be a finite number > 0")
    if not (_finite(tr.beta) and tr.beta > 0):
        out.append(f"{group}.train.beta={tr.beta!r}: must be a finite number > 0")
    for key in ("min_lr_ratio", "weight_decay", "grad_clip_norm", "eps", "label_smoothing"):
        v = getattr(tr, key)
        if not (_finite(v) and v >= 0):
            out.append(f"{group}.train.{key}={v!r}: must be a finite number >= 0")
    for key in ("b1", "b2"):
        v = getattr(tr, key)
        if not (_finite(v) and 0 <= v < 1):
            out.append(f"{group}.train.{key}={v!r}: must lie in [0, 1)")
    unit = dp * tr.grad_accum_steps
    if isinstance(run.batch_size, int) and run.batch_size >= 1 and run.batch_size % unit:
        out.append(f"{group}.batch_size={run.batch_size}: must be a multiple of data*fsdp={dp} times "
                   f"{group}.train.grad_accum_steps={tr.grad_accum_steps}")
    return out


def problems(cfg: LoopConfig, mesh: Any = None) -> list[str]:
    """Every setting of ``cfg`` (resolved or not) that cannot work, one message each; ``mesh`` (the
    run's device mesh) adds the divisibility of the DPO batch by its data-parallel size."""
    out: list[str] = []
    if not (isinstance(cfg.iterations, int) and cfg.iterations >= 1):
        out.append(f"iterations={cfg.iterations!r}: must be an integer >= 1")
    for key in ("prompts_per_iteration", "prompts_per_shard", "gen_batch_size", "judgment_max_chars"):
        v = getattr(cfg, key)
        if not (isinstance(v, int) and v >= 1):
            out.append(f"{key}={v!r}: must be an integer >= 1")
    if not (_finite(cfg.heldout_fraction) and 0 <= cfg.heldout_fraction < 1):
        out.append(f"heldout_fraction={cfg.heldout_fraction!r}: must lie in [0, 1)")
    bad_rho = [r for r in cfg.rho if not (_finite(r) and 0 <= r <= 0.5)]
    if bad_rho:
        out.append(f"rho={','.join(map(str, cfg.rho))}: every value must lie in [0, 0.5] (got {bad_rho[0]})")
    if any(not (isinstance(t, int) and t >= 1) for t in cfg.judge_pair_iterations):
        out.append(f"judge_pair_iterations={cfg.judge_pair_iterations}: iterations are numbered from 1")
    for name in ("actor", "judge", "meta_judge"):
        out += _sampling_problems(name, getattr(cfg, name))
    if cfg.readout not in ("parse", "expected"):
        out.append(f"readout={cfg.readout!r}: must be parse or expected")
    if cfg.battle_rule not in typing.get_args(mj.BattleRule):
        out.append(f"battle_rule={cfg.battle_rule!r}: must be one of {', '.join(typing.get_args(mj.BattleRule))}")
    if cfg.attention_impl not in typing.get_args(AttentionImpl):
        out.append(f"attention_impl={cfg.attention_impl!r}: must be one of {', '.join(typing.get_args(AttentionImpl))}")
    dp = data_parallel_size(mesh)
    out += _dpo_problems("dpo", cfg.dpo, dp)
    if cfg.future_dpo is not None:
        out += _dpo_problems("future_dpo", cfg.future_dpo, dp)
    return out


def validate(cfg: LoopConfig, mesh: Any = None) -> None:
    """Raises one :class:`UsageError` listing every problem of :func:`problems`, before any work."""
    found = problems(cfg, mesh)
    if found:
        raise UsageError("bad settings: " + "; ".join(found))


# -------------------------------------------------------------------------- evaluation's view


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the evaluation needs from a run's ``LoopConfig`` (or its ``config.json``)."""

    model: str = "smollm2-135m-instruct"
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    param_dtype: Optional[str] = None  # None: dtype (runs saved before the setting existed)
    mesh: Optional[str] = None
    attention_impl: AttentionImpl = "xla"
    remat: bool = False
    seed: int = 0
    prompts: Optional[str] = None
    heldout_fraction: float = 0.1
    method: str = ""
    evaluate: EvalConfig = EvalConfig()

    @classmethod
    def of(cls, cfg: Any) -> "RunInfo":
        """From a ``LoopConfig`` or the dict of a run's ``config.json``; missing keys get defaults."""
        d = config_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name != "evaluate"}
        ev = d.get("evaluate")
        if isinstance(ev, EvalConfig):
            kw["evaluate"] = ev
        elif isinstance(ev, dict):
            kw["evaluate"] = from_dict(EvalConfig, ev)
        return cls(**kw)

    def model_options(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "param_dtype": self.param_dtype or self.dtype, "attention_impl": self.attention_impl,
                "remat": self.remat}


def from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """A (nested) frozen dataclass from its ``dataclasses.asdict`` form; unknown keys are ignored."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            v = d[f.name]
            tp = hints[f.name]
            kw[f.name] = from_dict(tp, v) if dataclasses.is_dataclass(tp) and isinstance(v, dict) else v
    return cls(**kw)


# ---------------------------------------------------------------------------------- presets


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
    compiled shapes), short generations, N=2 judgments per response (so 2 meta-judge battles per
    prompt, both orders of the one pair), no rematerialisation (135M fits without it).
    """
    return LoopConfig(
        iterations=1, prompts_per_iteration=4, prompts_per_shard=4, readout="expected", battle_rule="order_averaged",
        actor=Sampling(n=3, temperature=0.8, top_p=0.95, max_new_tokens=64),
        judge=Sampling(n=2, temperature=0.8, top_p=0.95, max_new_tokens=32),
        meta_judge=Sampling(n=1, temperature=0.8, top_p=0.95, max_new_tokens=24),
        dpo=DPORunConfig(max_len=640, batch_size=2, save_every=2, ref_batch_size=4,
                         train=TrainConfig(learning_rate=5e-6, beta=0.1, warmup_steps=1, remat=False)),
        evaluate=EvalConfig(max_prompts=8, prompts_per_shard=8, batch_size=16,
                            answer=Sampling(n=1, temperature=0.7, top_p=0.9, max_new_tokens=64)),
    )


def llama3_8b_paper() -> LoopConfig:
    """Meta-Rewarding as published: Llama-3-8B-Instruct, K=7, N=11, 5,000 prompts x 4 iterations."""
    return LoopConfig(
        model="meta-llama/Meta-Llama-3-8B-Instruct", dtype="bfloat16", mesh="fsdp=-1,tensor=4", attention_impl="auto",
        iterations=4, prompts_per_iteration=5000, prompts_per_shard=256, gen_batch_size=512, readout="parse",
        actor=Sampling(n=7, temperature=0.8, top_p=0.95, max_new_tokens=1024),
        judge=Sampling(n=11, temperature=0.8, top_p=0.95, max_new_tokens=512),
        meta_judge=Sampling(n=1, temperature=0.8, top_p=0.95, max_new_tokens=512),
        rho=(0.0, 0.32, 0.32, 0.4), judge_pair_iterations=(1, 2), judgment_max_chars=2000,
        # Windowed einsum off: the whole 32-pair step fits a v5e-32 (experiments.aot: 10.0 of 16 GiB per
        # chip; with it, 15.8 GiB of temporaries are asked for 15.75 and two micro-batches are needed).
        dpo=DPORunConfig(max_len=4096, batch_size=32, save_every=100,
                         train=TrainConfig(learning_rate=5e-6, beta=0.1, warmup_steps=20, remat=True,
                                           windowed_einsum=False)),
        evaluate=EvalConfig(max_prompts=0, prompts_per_shard=64, batch_size=256,
                            answer=Sampling(n=1, temperature=0.7, top_p=0.9, max_new_tokens=1024)),
    )


PRESETS = {"tiny": tiny, "smollm2_cpu": smollm2_cpu, "llama3_8b_paper": llama3_8b_paper}


def get_preset(name: str, method: str) -> LoopConfig:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), method=method)

"""Compile the loop's programs ahead of time for a TPU topology, on a machine without one.

    TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu \\
    python -m experiments.aot --preset llama3_8b_paper --topology v5e-32 [--set key=value ...] [--out DIR]

Needs libtpu (``pip install -e ".[tpu]"``); no TPU and no weights: every argument is a
``jax.ShapeDtypeStruct`` with its ``NamedSharding`` on a mesh over the topology's devices
(``jax.experimental.topologies``), and ``jit(...).lower(...).compile()`` runs the real TPU compiler.
For the preset's settings (after ``--set``) it compiles

* ``dpo_step``: the DPO train step (policy forward and backward, optimizer update) on
  ``dpo.batch_size`` pairs of ``dpo.max_len`` tokens, with the preset's remat and gradient
  accumulation;
* ``reference_logps``: the reference model's log-probs of ``dpo.ref_batch_size`` pairs;
* ``sft_step``: the SFT step on ``dpo.batch_size`` rows of ``dpo.max_len`` tokens;
* ``future_dpo_step`` (``temporal=true``): the future model's DPO step (``future_dpo`` settings)
  while M_t's parameters stay on the chips (it judges the future model's samples next);
* ``actor``, ``judge``, ``meta_judge``: the sampler's ``generate`` as the loop calls it
  (``gen_batch_size // n`` prompts, ``n`` samples each, the role's ``max_new_tokens`` and
  sampling), run under `models.executables.compile_only`, so that every program a real call runs
  is compiled with the shapes its buckets give: ``prefill`` (per chunk; ``prefix`` for the rubric
  shared by a judge's prompts), ``start`` (the first token of every sample), ``decode`` (the
  decode loop, at each capacity bucket; the row keeps the largest), ``grow`` (the cache into the
  next bucket). Prompt lengths: ``--prompt-len`` tokens for the actor (default 512); the judge
  reads ``RUBRIC_TOKENS`` of rubric, the prompt and a whole response; the meta-judge also two whole
  judgments;
* ``judge_readout``, ``meta_judge_readout``: ``next_token_logprobs`` (``readout=expected``) on
  ``gen_batch_size`` judge or meta-judge prompts followed by a whole judgment;

and prints one row per program: compile seconds, per-device bytes (arguments, outputs,
temporaries, generated code, total), the chip's HBM, whether it fits and by how much, the number
of Pallas (Mosaic) kernel calls in the compiled program, and the collectives per step (count and
bytes of all-gather, reduce-scatter, all-reduce, all-to-all, from the compiled HLO). ``--out DIR``
writes the rows to ``DIR/aot.json``, after each program (``"complete": false`` and the program being
compiled until the end, so a compiler crash leaves the rows before it). ``--suggest`` compiles a program that does not fit again
with more gradient accumulation, remat, or a smaller reference batch, and names the first
setting that fits (or says none of those tried does). The compiler plans for the HBM it has, so read "fits", not
the bytes, as the verdict; this is a compile-time result, not a run on a TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.cli import UsageError, apply_overrides, run_main
from experiments.configs import LoopConfig, get_preset, resolve
from metajudge.roles import Sampling
from metajudge.stages import write_json_atomic
from metajudge.train import TrainStep, _pair_scorer, batch_sharding
from metajudge.train_state import abstract_train_state
from models.llama import Llama, LlamaConfig, get_config
from models.executables import compile_only
from models.loading import config_from_hf
from models.sampler import generate
from models.scoring import next_token_logprobs
from models.sharding import ShardingContext, data_parallel_size, make_mesh, state_shardings

GiB = 1 << 30

# Topology names as users know them -> (topology description, chip config, HBM GiB per chip).
TOPOLOGIES: dict[str, tuple[str, Optional[str], float]] = {
    "v5e-1": ("v5e:1x1", None, 16), "v5e-4": ("v5e:2x2", None, 16), "v5e-16": ("v5e:4x4", None, 16),
    "v5e-32": ("v5e:4x8", None, 16), "v5e-256": ("v5e:16x16", None, 16),
    "v6e-4": ("v6e:2x2", None, 32), "v6e-32": ("v6e:4x8", None, 32), "v6e-64": ("v6e:8x8", None, 32),
    "v6e-256": ("v6e:16x16", None, 32),
    "v4-8": ("v4:2x2x1", "megacore", 32), "v4-16": ("v4:2x2x2", "megacore", 32),
    "v4-32": ("v4:2x2x4", "megacore", 32),
    "v5p-8": ("v5:2x2x1", "megacore", 95), "v5p-16": ("v5:2x2x2", "megacore", 95),
    "v5p-32": ("v5:2x2x4", "megacore", 95), "v5p-64": ("v5:4x4x2", "megacore", 95),
}
# The architecture of a preset's model source, when it cannot be read from a local checkpoint.
_ARCH = {"meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b", "meta-llama/Meta-Llama-3-8B": "llama3-8b",
         "meta-llama/Meta-Llama-3-70B-Instruct": "llama3-70b", "smollm2-135m-instruct": "smollm2-135m"}
RUBRIC_TOKENS = 512  # a judge's or meta-judge's instructions around the texts it reads, shared by its prompts
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}


def topology_devices(name: str) -> tuple[list[Any], float]:
    """The devices of a named topology (``TOPOLOGIES``) and its HBM per chip in bytes."""
    if name not in TOPOLOGIES:
        raise UsageError(f"--topology {name!r}: known topologies: {', '.join(TOPOLOGIES)}")
    desc, chip_config, hbm = TOPOLOGIES[name]
    try:
        from jax.experimental import topologies
    except ImportError:  # pragma: no cover - very old JAX
        raise UsageError("this JAX has no jax.experimental.topologies; upgrade jax") from None
    kw = {"chip_config_name": chip_config} if chip_config else {}
    # A host holds a 2x2 block of chips, or the whole slice when it is smaller (v5e-1: one chip).
    dims = [int(d) for d in desc.split(":")[1].split("x")]
    host = (min(2, dims[0]), min(2, dims[1]), 1)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=desc, chips_per_host_bounds=host, **kw)
    except Exception as e:  # libtpu missing or unable to describe the topology
        raise UsageError(f"cannot describe TPU topology {desc} ({type(e).__name__}: {e}); install libtpu with "
                         "pip install -e \".[tpu]\" and run with TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu") from None
    return list(topo.devices), hbm * GiB


def model_config(cfg: LoopConfig, vocab_size: int = 49152) -> LlamaConfig:
    """The architecture of the run's model with its dtypes, remat and attention settings."""
    options = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat, attention_impl=cfg.attention_impl)
    if cfg.model == "tiny":
        return get_config("tiny", vocab_size=vocab_size, max_position_embeddings=4096, **options)
    if os.path.isfile(os.path.join(cfg.model, "config.json")):
        with open(os.path.join(cfg.model, "config.json")) as f:
            return config_from_hf(json.load(f), source=cfg.model).replace(**options)
    if cfg.model not in _ARCH:
        raise UsageError(f"model {cfg.model!r}: give a local checkpoint directory, or one of {', '.join(_ARCH)}")
    return get_config(_ARCH[cfg.model], **options)


def abstract_model(config: LlamaConfig, mesh: Any) -> Llama:
    """The model with ``ShapeDtypeStruct`` parameters placed as ``create_model`` would place them."""
    shard = ShardingContext(mesh)
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), shard=shard))
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, shard)
    placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                          jax.tree.map(lambda v: v, shardings))
    return nnx.merge(graphdef, placed)


def _batch(mesh: Any, rows: int, length: int, fields: Sequence[str]) -> dict[str, jax.ShapeDtypeStruct]:
    sh = batch_sharding(mesh)
    out = {}
    for f in fields:
        if f.startswith("ref_"):
            out[f] = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sh)
        else:
            out[f] = jax.ShapeDtypeStruct((rows, length), jnp.float32 if f.endswith("loss_mask") else jnp.int32, sharding=sh)
    return out


def _side_fields(prefixes: Sequence[str]) -> list[str]:
    return [f"{p}{f}" for p in prefixes for f in ("inputs", "targets", "positions", "segment_ids", "loss_mask")]


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Count and result bytes of each collective op in compiled HLO text.

    The TPU compiler may split one collective into a chain of asynchronous fusions that fill its
    result a piece at a time; each link names the whole result and the chain's ``chain_id``, so a
    chain counts once, with its largest link's bytes."""
    out = {c: {"count": 0, "bytes": 0} for c in _COLLECTIVES}
    chains: dict[tuple[str, str], int] = {}
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s(" + "|".join(_COLLECTIVES) + r")(-start)?\(", line)
        if not m:
            continue
        op, size = m.group(2), 0
        for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            size += n * _DTYPE_BYTES.get(dt, 4)
        chain = re.search(r'chain_id="(\d+)"', line)
        if chain:
            key = (op, chain.group(1))
            chains[key] = max(chains.get(key, 0), size)
        else:
            out[op]["count"] += 1
            out[op]["bytes"] += size
    for (op, _), size in chains.items():
        out[op]["count"] += 1
        out[op]["bytes"] += size
    return out


def pallas_calls(hlo: str) -> int:
    """Mosaic (Pallas) kernel calls in compiled TPU HLO text. The TPU compiler also emits custom calls
    of its own, named ``online-softmax`` (it fuses a plain-XLA softmax and matmul into one); those
    are XLA's, not ours, and are not counted."""
    names = re.findall(r"^\s*(?:ROOT\s+)?%([\w.-]+) = .*custom_call_target=\"tpu_custom_call\"", hlo, flags=re.M)
    return sum(not n.startswith("online-softmax") for n in names)


def _failed(name: str, e: Exception, seconds: float, hbm: float) -> dict[str, Any]:
    """The row of a program the compiler refused (e.g. out of memory): a result, not a crash."""
    # The compiler's whole message (for an out-of-memory: its largest allocations) goes to stderr.
    print(f"--- {name}: the compiler's message ---\n{e}\n---", file=sys.stderr, flush=True)
    return {"program": name, "compiled": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
            "compile_s": round(seconds, 1), "hbm_bytes": int(hbm), "fits": False}


def compile_program(name: str, fn: Callable[[], Any], hbm: float) -> dict[str, Any]:
    """Lowers and compiles ``fn()`` (a ``jit(...).lower(...)``) and measures the executable."""
    t0 = time.perf_counter()
    try:
        compiled = fn().compile()
    except Exception as e:
        return _failed(name, e, time.perf_counter() - t0, hbm)
    return measure(name, compiled, time.perf_counter() - t0, hbm)


def measure(name: str, compiled: Any, seconds: float, hbm: float) -> dict[str, Any]:
    """The row of a compiled program: bytes per device, fit, Pallas calls and collectives."""
    mem = compiled.memory_analysis()
    args, outs = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp, code = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes), int(mem.generated_code_size_in_bytes)
    total = args + outs - alias + temp + code
    hlo = compiled.as_text()
    return {"program": name, "compiled": True, "compile_s": round(seconds, 1), "argument_bytes": args,
            "output_bytes": outs, "alias_bytes": alias, "temp_bytes": temp, "code_bytes": code, "total_bytes": total,
            "hbm_bytes": int(hbm), "fits": total <= hbm, "margin_bytes": int(hbm - total),
            "pallas_calls": pallas_calls(hlo), "collectives": collectives(hlo)}


def programs(cfg: LoopConfig, mesh: Any) -> dict[str, Callable[[], Any]]:
    """``{name: () -> Lowered}`` of the training programs (module doc)."""
    config = model_config(cfg)
    dpo = cfg.dpo
    train = dpo.train
    model = abstract_model(config, mesh)

    def dpo_inputs(run):
        """The DPO step of ``run`` (a DPORunConfig) with its abstract state and batch."""
        state = abstract_train_state(model, run.train, mesh)
        step = TrainStep("dpo", run.train, state, mesh, batch_size=run.batch_size)
        fields = _side_fields(("chosen_", "rejected_")) + ["ref_chosen_logp", "ref_rejected_logp"]
        return step, state, _batch(mesh, run.batch_size, run.max_len, fields)

    def dpo_step():
        step, state, batch = dpo_inputs(dpo)
        return step.jitted.lower(state, batch)

    def reference_logps():
        graphdef, params = nnx.split(model)
        return _pair_scorer(graphdef, 0, train.logits_chunk).lower(params, _batch(mesh, dpo.ref_batch_size, dpo.max_len,
                                                              _side_fields(("chosen_", "rejected_"))))

    def sft_step():
        state = abstract_train_state(model, train, mesh)
        step = TrainStep("sft", train, state, mesh, batch_size=dpo.batch_size)
        return step.jitted.lower(state, _batch(mesh, dpo.batch_size, dpo.max_len, _side_fields(("",))))

    out = {"dpo_step": dpo_step, "reference_logps": reference_logps, "sft_step": sft_step}
    if cfg.temporal:
        def future_dpo_step():
            step, state, batch = dpo_inputs(cfg.future_dpo or dpo)
            resident = nnx.split(model)[1]  # M_t stays on the chips: it judges M_f's samples next
            held = jax.jit(lambda st, b, _resident: step.jitted(st, b), donate_argnums=0, keep_unused=True)
            return held.lower(state, batch, resident)

        out["future_dpo_step"] = future_dpo_step
    return out


def role_inputs(cfg: LoopConfig, prompt_len: int) -> dict[str, tuple[Sampling, int, int]]:
    """``{role: (sampling, prompt tokens, of which a prefix shared by the call's prompts)}`` of the
    sampler's calls: the actor on ``prompt_len``-token prompts; the judge on the rubric
    (``RUBRIC_TOKENS``, shared), the prompt and a whole response; the meta-judge on the rubric, the
    prompt, a response and two whole judgments."""
    a, j, m = cfg.actor, cfg.judge, cfg.meta_judge
    return {"actor": (a, prompt_len, 0),
            "judge": (j, RUBRIC_TOKENS + prompt_len + a.max_new_tokens, RUBRIC_TOKENS),
            "meta_judge": (m, RUBRIC_TOKENS + prompt_len + a.max_new_tokens + 2 * j.max_new_tokens, RUBRIC_TOKENS)}


def _token_rows(rows: int, length: int, shared: int) -> list[list[int]]:
    """``rows`` prompts of ``length`` tokens, the first ``shared`` the same in all, the rest not."""
    return [[7] * shared + [(i * 31 + t) % 1000 + 10 for t in range(length - shared)] for i in range(rows)]


def sampler_programs(cfg: LoopConfig, mesh: Any, prompt_len: int = 512) -> dict[str, Callable[[], list[dict]]]:
    """``{name: () -> [compiled programs]}`` of the sampler's calls (module doc): each runs
    ``generate`` or ``next_token_logprobs`` on the abstract model under
    `models.executables.compile_only`, so the programs are those a real call with these shapes runs."""
    model = abstract_model(model_config(cfg), mesh)
    out: dict[str, Callable[[], list[dict]]] = {}
    for role, (s, length, shared) in role_inputs(cfg, prompt_len).items():
        def sample(s=s, length=length, shared=shared):
            prompts = _token_rows(max(1, cfg.gen_batch_size // s.n), length, shared)
            with compile_only() as compiled:
                generate(model, prompts, n_samples=s.n, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                         top_p=s.top_p, top_k=s.top_k, stop_ids=(1,), rng=jax.random.key(0))
            return compiled
        out[role] = sample
        if role != "actor":  # readout=expected: the judgment's text, then the forced prefix's next token
            def readout(s=s, length=length, shared=shared):
                with compile_only() as compiled:
                    next_token_logprobs(model, _token_rows(cfg.gen_batch_size, length + s.max_new_tokens, shared),
                                        list(range(10, 16)), batch_size=cfg.gen_batch_size)
                return compiled
            out[f"{role}_readout"] = readout
    return out


def sampler_rows(name: str, fn: Callable[[], list[dict]], hbm: float) -> list[dict[str, Any]]:
    """One row per program of a sampler call (``name.prefill``, ``name.decode``, ...): of several
    shapes of a program (decode at each capacity bucket), the one needing the most memory, with
    ``shapes`` saying how many were compiled."""
    t0 = time.perf_counter()
    try:
        compiled = fn()
    except Exception as e:
        return [_failed(name, e, time.perf_counter() - t0, hbm)]
    best: dict[str, dict[str, Any]] = {}
    for rec in compiled:
        row = {**measure(f"{name}.{rec['name']}", rec["compiled"], rec["seconds"], hbm), "shape": rec["desc"]}
        old = best.get(rec["name"])
        row["shapes"] = 1 + (old["shapes"] if old else 0)
        if old is None or row["total_bytes"] > old["total_bytes"]:
            best[rec["name"]] = row
        else:
            old["shapes"] = row["shapes"]
    return list(best.values())


def _gib(x: Optional[int]) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def table(rows: Sequence[dict]) -> str:
    """Markdown table of the compiled programs."""
    head = ["program", "compile s", "args GiB", "temp GiB", "total GiB", "HBM GiB", "fits", "Pallas calls",
            "all-gather", "reduce-scatter", "all-reduce"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if not r["compiled"]:
            lines.append(f"| {r['program']} | {r['compile_s']} | - | - | - | {_gib(r['hbm_bytes'])} | no: {r['error']} | - | - | - | - |")
            continue
        coll = [f"{r['collectives'][c]['count']} ({r['collectives'][c]['bytes'] / GiB:.2f} GiB)"
                for c in ("all-gather", "reduce-scatter", "all-reduce")]
        fits = "yes" if r["fits"] else f"no ({_gib(-r['margin_bytes'])} GiB over)"
        lines.append("| " + " | ".join([r["program"], str(r["compile_s"]), _gib(r["argument_bytes"]), _gib(r["temp_bytes"]),
                                          _gib(r["total_bytes"]), _gib(r["hbm_bytes"]), fits, str(r["pallas_calls"]), *coll]) + " |")
    for r in rows:
        sug = r.get("suggestion")
        if sug is None:
            continue
        if sug["set"]:
            lines.append(f"\n{r['program']} fits with --set {' --set '.join(sug['set'])}: "
                         f"{_gib(sug['total_bytes'])} GiB, {_gib(sug['margin_bytes'])} GiB to spare")
        else:
            tried = "; ".join(" ".join(t["set"]) for t in sug["tried"]) or "no setting to try"
            lines.append(f"\n{r['program']}: no tried setting makes it fit ({tried}); a larger slice or a "
                         "wider fsdp axis (--set mesh=...) is left")
    return "\n".join(lines)


def candidate_settings(name: str, cfg: LoopConfig, mesh: Any, limit: int = 8) -> list[list[str]]:
    """``--set`` lists that lower a program's memory, tried in order when it does not fit: for the
    train steps, windowed einsum off (it keeps the batch whole), then gradient accumulation doubled
    (while the batch divides), then remat; for the reference pass, ``dpo.ref_batch_size`` halved
    (while a multiple of ``data*fsdp``)."""
    dp = data_parallel_size(mesh)
    out: list[list[str]] = []
    if name in ("dpo_step", "sft_step"):
        if cfg.dpo.train.windowed_einsum:
            out.append(["dpo.train.windowed_einsum=false"])
        accum = cfg.dpo.train.grad_accum_steps * 2
        while len(out) < limit and cfg.dpo.batch_size % (dp * accum) == 0:
            out.append([f"dpo.train.grad_accum_steps={accum}"])
            accum *= 2
        if not cfg.remat and len(out) < limit:
            out.append(["remat=true"])
    elif name == "reference_logps":
        rows = cfg.dpo.ref_batch_size // 2
        while len(out) < limit and rows >= dp and rows % dp == 0:
            out.append([f"dpo.ref_batch_size={rows}"])
            rows //= 2
    return out


def suggest(name: str, cfg: LoopConfig, mesh: Any, hbm: float) -> dict[str, Any]:
    """Compiles ``name`` under each of :func:`candidate_settings` until one fits: ``{"set": [...],
    "total_bytes": ..., "margin_bytes": ...}`` for the first that does, or ``{"set": None,
    "tried": [...]}``."""
    tried = []
    for extra in candidate_settings(name, cfg, mesh):
        variant = resolve(apply_overrides(cfg, extra))
        print(f"  trying {name} with --set {' --set '.join(extra)} ...", file=sys.stderr)
        row = compile_program(name, programs(variant, mesh)[name], hbm)
        tried.append({"set": extra, "fits": row["fits"], "total_bytes": row.get("total_bytes")})
        if row["fits"]:
            return {"set": extra, "total_bytes": row["total_bytes"], "margin_bytes": row["margin_bytes"], "tried": tried}
    return {"set": None, "tried": tried}


def run(preset: str, topology: str, overrides: Sequence[str] = (), only: Optional[Sequence[str]] = None,
        out: Optional[str] = None, suggest_fit: bool = False, prompt_len: int = 512) -> list[dict]:
    """Compiles the preset's programs for the topology; returns the rows (and writes ``out/aot.json``).
    With ``suggest_fit``, a program that does not fit is compiled again under the settings of
    :func:`candidate_settings` and its row gets ``suggestion`` (:func:`suggest`)."""
    cfg = resolve(apply_overrides(get_preset(preset, "meta_reward"), list(overrides)))
    devices, hbm = topology_devices(topology)
    try:
        mesh = make_mesh(cfg.mesh, devices=devices)
    except ValueError as e:
        raise UsageError(f"mesh={cfg.mesh!r} on {topology} ({len(devices)} chips): {e}") from None
    progs, sampling = programs(cfg, mesh), sampler_programs(cfg, mesh, prompt_len)
    unknown = sorted(set(only or ()) - set(progs) - set(sampling))
    if unknown:
        raise UsageError(f"--programs {', '.join(unknown)}: known programs: {', '.join([*progs, *sampling])}")
    where = {"topology": topology, "chips": len(devices), "mesh": dict(mesh.shape)}
    rows: list[dict] = []

    def save(pending: Optional[str]) -> None:
        """``out/aot.json`` with the rows so far, written atomically after each program, so a
        compiler that aborts the process (a failed internal check) leaves what was compiled and
        names the program it was compiling."""
        if out:
            write_json_atomic(os.path.join(out, "aot.json"), {
                "preset": preset, "topology": topology, "set": list(overrides), "prompt_len": prompt_len,
                "rubric_tokens": RUBRIC_TOKENS, "config": dataclasses.asdict(cfg), "programs": rows,
                "complete": pending is None, "compiling": pending})

    for name, fn in progs.items():
        if only and name not in only:
            continue
        print(f"compiling {name} for {topology} ...", file=sys.stderr)
        save(name)
        row = {**where, **compile_program(name, fn, hbm)}
        if suggest_fit and not row["fits"]:
            row["suggestion"] = suggest(name, cfg, mesh, hbm)
        rows.append(row)
    for name, fn in sampling.items():
        if only and name not in only:
            continue
        print(f"compiling the {name} sampler calls for {topology} ...", file=sys.stderr)
        save(name)
        rows.extend({**where, **row} for row in sampler_rows(name, fn, hbm))
    save(None)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (see the module doc)."""
    ap = argparse.ArgumentParser(prog="python -m experiments.aot", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, help="a loop preset (experiments.configs), e.g. llama3_8b_paper")
    ap.add_argument("--topology", required=True, help=f"one of {', '.join(TOPOLOGIES)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a loop setting")
    ap.add_argument("--programs", nargs="+", default=None, help="compile only these (default: all)")
    ap.add_argument("--out", default=None, help="write DIR/aot.json")
    ap.add_argument("--prompt-len", type=int, default=512, help="tokens of an actor prompt (judge and meta-judge "
                    f"prompts add the texts they read and {RUBRIC_TOKENS} tokens of rubric)")
    ap.add_argument("--suggest", action="store_true", help="for a program that does not fit, compile it again with "
                    "more gradient accumulation, remat, or a smaller reference batch, and say which setting fits")
    args = ap.parse_args(argv)
    if args.prompt_len < 1:
        raise UsageError(f"--prompt-len {args.prompt_len}: must be >= 1")
    rows = run(args.preset, args.topology, args.set, args.programs, args.out, suggest_fit=args.suggest,
               prompt_len=args.prompt_len)
    print(table(rows))
    return 0 if all(r["compiled"] for r in rows) else 1


if __name__ == "__main__":
    run_main(main)

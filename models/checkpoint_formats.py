"""Readers for checkpoint files: safetensors (memory-mapped, any dtype) and GGUF (dequantized).

Both expose tensors under Hugging Face Llama names in Hugging Face orientation
(``[out_features, in_features]``), so one converter (``models.loading``) serves both.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable

import ml_dtypes
import numpy as np

from models.files import write_atomic


class LoadError(ValueError):
    """A checkpoint or tokenizer could not be loaded; the message names the file and the fix."""


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsFile:
    """A memory-mapped safetensors file; ``get(name)`` reads nothing until the data is touched."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise LoadError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise LoadError(f"{path}: corrupt safetensors file (header of {n} bytes runs past the end)")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoadError(f"{path}: corrupt safetensors header ({e})") from None
        self._data_start = 8 + n
        self._meta = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, info in self._meta.items():
            begin, end = info["data_offsets"]
            if self._data_start + end > size:
                raise LoadError(f"{path}: tensor {name!r} runs past the end of the file (truncated download?)")
            if info["dtype"] not in _ST_DTYPES:
                raise LoadError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if self._meta else None

    def keys(self) -> list[str]:
        return list(self._meta)

    def get(self, name: str) -> np.ndarray:
        info = self._meta[name]
        begin, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        shape = tuple(info["shape"])
        if raw.size != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise LoadError(f"{self.path}: tensor {name!r} has {raw.size} bytes, not what shape {shape} needs")
        return raw.view(dtype).reshape(shape)


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes tensors (any dtype in the safetensors spec, bfloat16 included) to ``path``."""
    names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(f: Any) -> None:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())

    write_atomic(path, write, binary=True)


def open_safetensors_dir(directory: str) -> dict[str, Callable[[], np.ndarray]]:
    """Maps every tensor name of an HF checkpoint directory to a lazy getter.

    Reads ``model.safetensors.index.json`` when present, else every ``*.safetensors`` file.
    """
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        weight_map = None
    if not files:
        raise LoadError(
            f"{directory}: no *.safetensors files (PyTorch .bin checkpoints are not read; "
            "convert them with transformers' save_pretrained(..., safe_serialization=True))"
        )
    opened: dict[str, SafetensorsFile] = {}
    for fname in files:
        path = os.path.join(directory, fname)
        if not os.path.exists(path):
            raise LoadError(f"{path}: listed in the safetensors index but missing")
        opened[fname] = SafetensorsFile(path)
    getters: dict[str, Callable[[], np.ndarray]] = {}
    for fname, st in opened.items():
        for name in st.keys():
            if weight_map is None or weight_map.get(name) == fname:
                getters[name] = (lambda st=st, name=name: st.get(name))
    return getters


# --------------------------------------------------------------------------------------------- GGUF


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's conversion-time reordering of Q/K rows.

    llama.cpp stores each head's rows with the two rotary halves interleaved (pairs ``(i, i+H/2)``
    adjacent); Hugging Face keeps the halves as two contiguous blocks. Rows of one head are viewed
    as ``[H/2, 2]`` and transposed back to ``[2, H/2]``.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GGUFCheckpoint:
    """A llama-architecture GGUF file: HF-style config dict and lazily dequantized HF-named tensors."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises several kinds on malformed input
            raise LoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.fields = {k: f for k, f in self.reader.fields.items()}
        arch = self.field("general.architecture")
        if arch != "llama":
            raise LoadError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
        self.tensors = {t.name: t for t in self.reader.tensors}
        if "rope_freqs.weight" in self.tensors:
            raise LoadError(
                f"{path}: this GGUF carries per-frequency RoPE factors (Llama-3.1 long-context "
                "scaling), which are not read from GGUF; load the Hugging Face checkpoint directory instead"
            )
        self._config = self.hf_config()

    def field(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def hf_config(self) -> dict[str, Any]:
        a = "llama."
        heads = int(self.field(a + "attention.head_count"))
        hidden = int(self.field(a + "embedding_length"))
        cfg: dict[str, Any] = {
            "model_type": "llama",
            "vocab_size": int(self.field(a + "vocab_size", len(self.field("tokenizer.ggml.tokens", [])))),
            "hidden_size": hidden,
            "intermediate_size": int(self.field(a + "feed_forward_length")),
            "num_hidden_layers": int(self.field(a + "block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.field(a + "attention.head_count_kv", heads)),
            "head_dim": int(self.field(a + "attention.key_length", hidden // heads)),
            "rope_theta": float(self.field(a + "rope.freq_base", 10000.0)),
            "rms_norm_eps": float(self.field(a + "attention.layer_norm_rms_epsilon", 1e-5)),
            "max_position_embeddings": int(self.field(a + "context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.field("tokenizer.ggml.padding_token_id"),
        }
        scaling = self.field(a + "rope.scaling.type")
        if scaling == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(self.field(a + "rope.scaling.factor"))}
        elif scaling not in (None, "none"):
            raise LoadError(f"{self.path}: RoPE scaling type {scaling!r} is not supported in GGUF files")
        return cfg

    def _hf_name(self, gguf_name: str) -> str | None:
        if gguf_name == "token_embd.weight":
            return "model.embed_tokens.weight"
        if gguf_name == "output_norm.weight":
            return "model.norm.weight"
        if gguf_name == "output.weight":
            return "lm_head.weight"
        parts = gguf_name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
        return None

    def _dequantized(self, gguf_name: str) -> np.ndarray:
        import gguf

        t = self.tensors[gguf_name]
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise LoadError(f"{self.path}: tensor {gguf_name} uses {t.tensor_type.name}, which cannot be dequantized") from None
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        cfg = self._config
        if gguf_name.endswith("attn_q.weight"):
            w = _unpermute_rope_rows(w, cfg["num_attention_heads"])
        elif gguf_name.endswith("attn_k.weight"):
            w = _unpermute_rope_rows(w, cfg["num_key_value_heads"])
        return w

    def tensor_getters(self) -> dict[str, Callable[[], np.ndarray]]:
        getters = {}
        for name in self.tensors:
            hf = self._hf_name(name)
            if hf is not None:
                getters[hf] = (lambda name=name: self._dequantized(name))
        return getters


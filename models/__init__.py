"""The model layer: Flax NNX Llama-3, sharding, weight loading, tokenizers, sampler and scorer."""

from models.checkpoint_formats import LoadError
from models.llama import PRESETS, KVCache, Llama, LlamaConfig, RopeScaling, create_model, get_config
from models.loading import EMBEDDED_NAME, load_model, save_hf
from models.sharding import make_mesh
from models.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "EMBEDDED_NAME", "KVCache", "Llama", "LlamaConfig", "LoadError", "PRESETS", "RopeScaling",
    "Tokenizer", "create_model", "get_config", "load_model", "load_tokenizer", "make_mesh", "save_hf",
]

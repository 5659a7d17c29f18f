"""Session fixtures: the embedded SmolLM2 loaded by us and by Hugging Face (the oracle)."""

from __future__ import annotations

import os

import pytest

@pytest.fixture(scope="session")
def embedded_hf():
    """The embedded SmolLM2 GGUF loaded by Hugging Face's own GGUF reader (the oracle)."""
    from models.loading import embedded_gguf_path

    path = embedded_gguf_path()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    d, f = os.path.dirname(path), os.path.basename(path)
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


@pytest.fixture(scope="session")
def embedded_ours():
    import models

    return models.load_model(models.EMBEDDED_NAME)

"""What the held-out evaluation reads: the models it loads (kept for reuse) and its prompts.

``ModelPool`` loads the judge, the baseline and each iteration's model once (``tokenizer_source``
says whose tokenizer each uses); ``training_prompts`` and ``heldout_candidates`` give the prompts a
run trained on and the held-out ones it may be evaluated on (``experiments.evaluate``).
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Optional

from experiments.configs import RunInfo
from metajudge.prompt_sources import PromptFileError, load_prompt_file, load_seed_prompts, split_prompts
from metajudge.stages import read_jsonl, write_jsonl_atomic
from metajudge.trainer import UsageError
from models.sources import TINY_MODEL, default_tokenizer, load_model_and_tokenizer

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------- models


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def tokenizer_source(run: RunInfo, source: str, *, policy: bool) -> str:
    """Where the tokenizer of model ``source`` comes from. The run's own models (``policy``: the
    seed and the iterations' exports, which carry no tokenizer) and a local checkpoint directory
    without tokenizer files use the run's tokenizer; ``"tiny"`` the run's or the embedded one;
    any other source its own."""
    run_tok = default_tokenizer(run.model, run.tokenizer)
    if source == TINY_MODEL:
        return default_tokenizer(TINY_MODEL, run.tokenizer)
    bare_dir = os.path.isdir(source) and not any(os.path.exists(os.path.join(source, f)) for f in _TOKENIZER_FILES)
    return run_tok if policy or bare_dir else source


class ModelPool:
    """Models loaded on demand and kept for reuse (the judge and the baseline across iterations)."""

    def __init__(self, mesh: Any = None):
        self.mesh = mesh
        self._models: dict[tuple, tuple[Any, Any, Any]] = {}

    def get(self, run: RunInfo, source: str, *, policy: bool) -> tuple[Any, Any, Any]:
        """``(config, model, tokenizer)`` of ``source``; ``policy``: one of the run's own models
        (the seed or an iteration's), which share the run's tokenizer."""
        tok_source = tokenizer_source(run, source, policy=policy)
        options = run.model_options()
        key = (source, tok_source, *options.values(), run.seed if source == TINY_MODEL else None)
        if key not in self._models:
            self._models[key] = load_model_and_tokenizer(source, tok_source, mesh=self.mesh, seed=run.seed, **options)
        return self._models[key]

    def drop(self, source: str) -> None:
        """Forgets every loaded model of ``source``."""
        for key in [k for k in self._models if k[0] == source]:
            del self._models[key]


# ------------------------------------------------------------------------------------- prompts


def training_prompts(run_dir: str, run: RunInfo) -> list[dict]:
    """Every prompt the run could have trained on: the train side of its prompt split, plus the
    prompts its generate stages actually used."""
    out: list[dict] = []
    if run.prompts is None or os.path.isfile(run.prompts):
        pool = load_prompt_file(run.prompts) if run.prompts else load_seed_prompts()
        out += split_prompts(pool, heldout_fraction=run.heldout_fraction, seed=run.seed)[0]
    else:
        log.warning("%s: the run's prompt file is gone; checking against the prompts its iterations used", run.prompts)
    for path in sorted(glob.glob(os.path.join(run_dir, "iter_*", "generate", "shard_*.jsonl"))):
        out += [{"id": r["id"], "prompt": r["prompt"]} for r in read_jsonl(path)]
    return out


def heldout_candidates(run_dir: str, run: RunInfo, prompts_file: Optional[str]) -> list[dict]:
    """``prompts_file`` if given, else the run's recorded held-out split (recomputed and recorded
    from its config when the file is missing)."""
    try:
        if prompts_file:
            return load_prompt_file(prompts_file)
        path = os.path.join(run_dir, "heldout_prompts.jsonl")
        if os.path.exists(path):
            return read_jsonl(path)
        pool = load_prompt_file(run.prompts) if run.prompts else load_seed_prompts()
        heldout = split_prompts(pool, heldout_fraction=run.heldout_fraction, seed=run.seed)[1]
        write_jsonl_atomic(path, heldout)
        return heldout
    except PromptFileError as e:
        raise UsageError(str(e)) from None

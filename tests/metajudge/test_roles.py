"""The roles on prompts that do not fit the model's context: a judge or meta-judge prompt around a
very long response is skipped and counted, the other items are still judged, and the limit is the
sampler's own."""

from __future__ import annotations

import dataclasses
import math

import jax
import pytest

import models
from metajudge.prompts import judge_prompt
from metajudge.roles import Sampling, judge, meta_judge
from models.sampler import generate_text
from models.sources import tiny_config

CONTEXT = 512


@pytest.fixture(scope="module")
def small():
    tok = models.load_tokenizer(models.EMBEDDED_NAME)
    config = dataclasses.replace(tiny_config(tok, "float32"), max_position_embeddings=CONTEXT)
    return models.create_model(config, seed=0), tok


def _prompt_len(tok, text):
    return len(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))


def test_a_judge_prompt_longer_than_the_context_is_skipped_and_counted(small, capsys):
    model, tok = small
    items = [("Name a colour.", "Red."), ("Name a colour.", "red " * 2000), ("Say hi.", "Hello!")]
    s = Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8)
    res = judge(model, tok, items, s, rng=jax.random.key(0), readout="expected")
    assert [r["too_long"] for r in res] == [False, True, False]
    assert res[1]["judgments"] == ["", ""] and res[1]["scores"] == [None, None]
    assert res[1]["n_fallback"] == 2 and math.isnan(res[1]["mean"])  # no valid score: left out of the pairs
    for r in (res[0], res[2]):  # the others are judged; the expected readout gives every one a score
        assert len(r["judgments"]) == 2 and all(sc is not None for sc in r["scores"])
    assert "1 of 3 prompt(s) leave no room for 8 new tokens" in capsys.readouterr().err


def test_the_limit_is_the_samplers(small):
    """A prompt of exactly context - max_new_tokens tokens is judged (and the sampler takes it); one
    more new token and it is skipped (and the sampler refuses it)."""
    model, tok = small
    item = ("Name a colour.", "red " * 120)
    n = _prompt_len(tok, judge_prompt(*item))
    assert n < CONTEXT
    fits = Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=CONTEXT - n)
    over = dataclasses.replace(fits, max_new_tokens=CONTEXT - n + 1)
    conv = [[{"role": "user", "content": judge_prompt(*item)}]]
    generate_text(model, tok, conv, max_new_tokens=fits.max_new_tokens, temperature=1.0, rng=jax.random.key(1))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate_text(model, tok, conv, max_new_tokens=over.max_new_tokens, temperature=1.0, rng=jax.random.key(1))
    assert judge(model, tok, [item], fits, rng=jax.random.key(1))[0]["too_long"] is False
    assert judge(model, tok, [item], over, rng=jax.random.key(1))[0]["too_long"] is True


def test_a_meta_judge_battle_longer_than_the_context_is_a_counted_tie(small):
    model, tok = small
    short = ("Name a colour.", "Red.", "Score: 4", "Score: 2")
    long = ("Name a colour.", "red " * 2000, "Score: 4", "Score: 2")
    s = Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=8)
    res = meta_judge(model, tok, [short, long], s, rng=jax.random.key(2), readout="expected")
    assert res[0]["too_long"] is False and res[0]["verdict"] in (1, -1)  # the expected readout decides it
    assert res[1]["too_long"] is True and res[1]["text"] == ""
    assert res[1]["verdict"] == 0 and res[1]["fallback"] is True and res[1]["p_first"] == 0.5

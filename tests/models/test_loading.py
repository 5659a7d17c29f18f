"""Weight loading: the embedded GGUF against HF's own GGUF reader, save_hf round trips, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.llama import KVCache
from tests.models.oracle import hf_logits, make_hf_checkpoint, max_rel_err

CHAT = [{"role": "user", "content": "Give me three tips for staying focused while studying."}]


def test_embedded_smollm2_logits_match_hf_gguf_loading_within_1e3(embedded_ours, embedded_hf):
    config, model = embedded_ours
    hf_model, hf_tok = embedded_hf
    tokens = models.load_tokenizer(models.EMBEDDED_NAME).apply_chat_template(CHAT)
    err = max_rel_err(model(jnp.asarray([tokens])), hf_logits(hf_model, np.asarray([tokens])))
    print(f"SmolLM2 GGUF: max relative logit error vs HF = {err:.2e}")
    assert config.num_layers == 30 and config.tie_word_embeddings
    assert err < 1e-3


def _greedy_with_cache(model, config, prompt, n_new):
    """A plain greedy loop over the model's KV cache (the sampler has its own tests)."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, cache):
        logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    cache = KVCache.create(config, 1, len(prompt) + n_new)
    nxt, cache = step(state, jnp.asarray([prompt], jnp.int32), cache)
    out = [int(nxt[0])]
    for _ in range(n_new - 1):
        nxt, cache = step(state, nxt[:, None], cache)
        out.append(int(nxt[0]))
    return out


def test_embedded_smollm2_32_greedy_tokens_equal_hf(embedded_ours, embedded_hf):
    import torch

    config, model = embedded_ours
    hf_model, _ = embedded_hf
    prompt = models.load_tokenizer(models.EMBEDDED_NAME).apply_chat_template(CHAT)
    ours = _greedy_with_cache(model, config, prompt, 32)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                min_new_tokens=32, pad_token_id=2)[0, len(prompt):].tolist()
    assert ours == ref


def test_save_hf_round_trip_loads_in_transformers_with_same_logits(tmp_path):
    import torch
    import transformers

    src, dst = tmp_path / "src", tmp_path / "dst"
    hf = make_hf_checkpoint(str(src), num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                            rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    config, model = models.load_model(str(src))
    models.save_hf(config, model, str(dst))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 90))
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(hf, tokens), rtol=0, atol=1e-5)
    assert not (tmp_path / "dst.tmp").exists()


def test_sharded_checkpoint_index_is_followed(tmp_path):
    hf = make_hf_checkpoint(str(tmp_path / "src"), tie_word_embeddings=True)
    config, model = models.load_model(str(tmp_path / "src"))
    models.save_hf(config, model, str(tmp_path / "sharded"), max_shard_bytes=40_000)
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    _, again = models.load_model(str(tmp_path / "sharded"))
    tokens = np.arange(20)[None] % 128
    assert max_rel_err(again(jnp.asarray(tokens)), hf_logits(hf, tokens)) < 1e-4


def test_model_options_survive_save_hf_and_load_model(tmp_path):
    config = models.get_config("tiny", attention_impl="pallas", remat=True)
    models.save_hf(config, models.create_model(config, seed=0), str(tmp_path / "m"))
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["metajudge"] == {"attention_impl": "pallas", "remat": True}
    again, _ = models.load_model(str(tmp_path / "m"))
    assert (again.attention_impl, again.remat) == ("pallas", True)
    # Options given to load_model replace the saved ones; a checkpoint without them gets the defaults.
    other, _ = models.load_model(str(tmp_path / "m"), attention_impl="auto", remat=False)
    assert (other.attention_impl, other.remat) == ("auto", False)
    del saved["metajudge"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(saved))
    plain, _ = models.load_model(str(tmp_path / "m"))
    assert (plain.attention_impl, plain.remat) == ("xla", False)
    (tmp_path / "m" / "config.json").write_text(json.dumps({**saved, "metajudge": {"attention_impl": "flash"}}))
    with pytest.raises(models.LoadError, match=r"metajudge.attention_impl='flash': expected one of"):
        models.load_model(str(tmp_path / "m"))


def test_hub_id_resolves_through_the_local_hf_cache(tmp_path):
    # No network here: a hub id must still go through huggingface_hub, served from its cache.
    make_hf_checkpoint(str(tmp_path / "ckpt"))
    snap = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in os.listdir(tmp_path / "ckpt"):
        os.symlink(tmp_path / "ckpt" / f, snap / f)
    (tmp_path / "hub" / "models--acme--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    code = textwrap.dedent("""
        import models
        config, model = models.load_model("acme/tiny-llama")
        print("layers", config.num_layers)
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": "", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "layers 2" in out.stdout


def _expect(match, fn):
    with pytest.raises(models.LoadError, match=match):
        fn()


def test_bad_inputs_give_one_clear_error_naming_the_file(tmp_path):
    d = tmp_path / "ckpt"
    make_hf_checkpoint(str(d))
    cfg = json.loads((d / "config.json").read_text())

    _expect("no such file", lambda: models.load_model(str(tmp_path / "nope.gguf")))
    _expect("not a model source", lambda: models.load_model("not a model"))
    (tmp_path / "empty").mkdir()
    _expect(r"empty: no config.json", lambda: models.load_model(str(tmp_path / "empty")))

    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    _expect(r"config.json: model_type 'gpt2'.*not a Llama", lambda: models.load_model(str(d)))

    (d / "config.json").write_text("{not json")
    _expect(r"config.json: invalid JSON", lambda: models.load_model(str(d)))

    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    _expect(r"mlp.gate_proj.weight' has shape \(96, 64\).*expected \(64, 100\)", lambda: models.load_model(str(d)))

    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    _expect(r"model.layers.2.* is missing", lambda: models.load_model(str(d)))

    (d / "config.json").write_text(json.dumps(cfg))
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    _expect(r"model.safetensors: .*runs past the end", lambda: models.load_model(str(d)))

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    _expect(r"bad.gguf: not a readable GGUF file", lambda: models.load_model(str(bad)))


def test_load_errors_reach_the_user_without_a_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.chat", "--model", str(tmp_path / "missing.gguf")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""},
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "missing.gguf: no such file" in out.stderr

"""The torch-free GGUF tokenizer (models.gguf_tokenizer) against transformers' own GGUF conversion."""

from __future__ import annotations

import os

import numpy as np
import pytest

import models
from models import gguf_tokenizer
from models.loading import embedded_gguf_path

CORPUS = [
    "Self-rewarding models judge themselves: Score: 4",
    "Hello world", "  two  spaces\n\n\nthree newlines\t tab", "trailing   ", " leading", "       ", "\n", "a\r\nb",
    "Année 2024: 12345 + 67.89 = ? and 1 22 333 4444 55555, 3.14159e-10, -7, 0x1F",
    "emoji 😀🎉 and a family 👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return x**2  # code\n\n\tif x != 0: print(f'{x!r}')\n",
    "中文 日本語 한국어 Ελληνικά русский עברית العربية", "Ünïcödé façade naïve, zero\u200bwidth, nbsp\u00a0here",
    "I'm sure you can't, we'll see; THEY'RE here", "<|im_start|>user\nhi<|im_end|>\n", "x<|endoftext|>y",
    "<|im_end|><|im_end|>", "",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Code:\n```py\nprint(1)\n```"}],
]


def _assert_same(ours, ref, texts):
    """Identical ids, and identical decoded text with and without special tokens."""
    for text in texts:
        ids = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAJUDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.slow
def test_embedded_gguf_tokenizer_equals_transformers_conversion(embedded_hf, fresh_cache):
    _, ref = embedded_hf
    ours = models.load_tokenizer(models.EMBEDDED_NAME)
    chats = [ours.render_chat(c) for c in CHATS]
    for c, text in zip(CHATS, chats):
        assert text == ref.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
    _assert_same(ours, ref, CORPUS + chats)
    assert ours.vocab_size == len(ref)
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    # Every token id decodes to the same piece (the whole vocabulary, special tokens included).
    every = list(range(ours.vocab_size))
    assert [ours.decode([i], skip_special_tokens=False) for i in every] == ref.batch_decode(
        [[i] for i in every], skip_special_tokens=False)


def test_reading_the_embedded_gguf_never_imports_torch(tmp_path):
    """The base install has no torch: building the tokenizer from the GGUF must not need it."""
    import subprocess
    import sys

    code = ("import sys, models; sys.modules['torch'] = None; "  # any `import torch` now raises ImportError
            "t = models.load_tokenizer(models.EMBEDDED_NAME); "
            "assert t.encode('Score: 4') and t.apply_chat_template([{'role': 'user', 'content': 'hi'}])")
    env = dict(os.environ, METAJUDGE_CACHE=str(tmp_path))  # empty: the tokenizer is built, not read back
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def _write_gguf(path, spec: gguf_tokenizer.GGUFTokenizerSpec):
    """A GGUF file with only tokenizer metadata (no tensors), as llama.cpp's converter writes it."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(spec.model)
    if spec.pre is not None:
        w.add_tokenizer_pre(spec.pre)
    w.add_token_list(list(spec.tokens))
    w.add_token_types(list(spec.token_types))
    if spec.merges:
        w.add_token_merges(list(spec.merges))
    w.add_bos_token_id(spec.bos_id)
    w.add_eos_token_id(spec.eos_id)
    w.add_unk_token_id(spec.unk_id)
    w.add_pad_token_id(spec.pad_id)
    w.add_add_bos_token(spec.add_bos)
    w.add_chat_template(spec.chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def embedded_spec():
    return gguf_tokenizer.read_gguf_tokenizer(embedded_gguf_path())


def test_read_gguf_tokenizer_reads_the_embedded_fields(embedded_spec):
    s = embedded_spec
    assert (s.model, s.pre, len(s.tokens), len(s.merges)) == ("gpt2", "smollm", 49152, 48900)
    assert s.tokens[:3] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert (s.bos_id, s.eos_id, s.unk_id, s.pad_id, s.add_bos) == (1, 2, 0, 2, False)
    assert "<|im_start|>assistant" in s.chat_template
    assert set(s.token_types) == {gguf_tokenizer.NORMAL, gguf_tokenizer.CONTROL}


@pytest.mark.slow
def test_llama3_pre_tokenizer_equals_transformers_conversion(embedded_spec, tmp_path, fresh_cache):
    """A Llama-3-style file (pre = "llama-bpe": numbers in runs of up to three digits, Llama-3's
    split regex) built from the embedded vocabulary, read by both converters."""
    import dataclasses

    from transformers import AutoTokenizer

    path = tmp_path / "llama3-style.gguf"
    _write_gguf(path, dataclasses.replace(embedded_spec, pre="llama-bpe"))
    ours = models.load_tokenizer(str(path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    _assert_same(ours, ref, CORPUS + [ours.render_chat(c) for c in CHATS])
    # The two pre-tokenizers split numbers differently, so the comparison would see a wrong choice
    # (this vocabulary has no multi-digit tokens, so the ids above agree either way).
    def pieces(pre):
        built = gguf_tokenizer.build_tokenizer(dataclasses.replace(embedded_spec, pre=pre))
        return [p for p, _ in built.pre_tokenizer.pre_tokenize_str(" 12345 (word")]

    assert pieces("llama-bpe") == ["Ġ", "123", "45", "Ġ(", "word"]
    assert pieces("smollm") == ["Ġ", "1", "2", "3", "4", "5", "Ġ(", "word"]


def test_user_defined_tokens_stay_whole_and_other_vocabularies_are_refused(embedded_spec, tmp_path):
    import dataclasses

    tok = gguf_tokenizer.build_tokenizer(dataclasses.replace(
        embedded_spec, tokens=embedded_spec.tokens + ("<think>",),
        token_types=embedded_spec.token_types + (gguf_tokenizer.USER_DEFINED,)))
    ids = tok.encode("a<think>b").ids
    assert ids[1] == len(embedded_spec.tokens) and tok.decode(ids, skip_special_tokens=True) == "a<think>b"

    sp = tmp_path / "sentencepiece.gguf"
    _write_gguf(sp, dataclasses.replace(embedded_spec, model="llama"))
    with pytest.raises(models.LoadError, match="tokenizer type 'llama' is not supported.*Hugging Face directory"):
        models.load_tokenizer(str(sp))
    with pytest.raises(models.LoadError, match="pre-tokenizer 'qwen2' is not supported"):
        gguf_tokenizer.build_tokenizer(dataclasses.replace(embedded_spec, pre="qwen2"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + np.arange(8, dtype=np.uint8).tobytes())
    with pytest.raises(models.LoadError, match="not a readable GGUF file"):
        models.load_tokenizer(str(broken))


def test_byte_alphabet_is_a_bijection_onto_printable_characters():
    table = gguf_tokenizer.byte_alphabet()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert all(c.isprintable() and not c.isspace() for c in table.values())

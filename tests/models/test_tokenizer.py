"""Tokenizers: GGUF-embedded, tokenizer.json and SentencePiece, against transformers' own."""

from __future__ import annotations

import json

import pytest

import models

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime number above 10."},
    {"role": "assistant", "content": "11"},
    {"role": "user", "content": "Another, please!"},
]


def test_gguf_tokenizer_ids_and_chat_template_equal_transformers(embedded_hf):
    _, hf_tok = embedded_hf
    tok = models.load_tokenizer(models.EMBEDDED_NAME)
    text = "Self-rewarding models judge themselves: Score: 4"
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    rendered = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CHAT) == hf_tok.encode(rendered, add_special_tokens=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert 2 in tok.eos_token_ids  # <|im_end|> ends a SmolLM2 turn
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_tokenizer_json_directory_matches_the_gguf_tokenizer(tmp_path, embedded_hf):
    _, hf_tok = embedded_hf
    hf_tok.save_pretrained(str(tmp_path))
    from_dir = models.load_tokenizer(str(tmp_path))
    from_gguf = models.load_tokenizer(models.EMBEDDED_NAME)
    assert from_dir.apply_chat_template(CHAT) == from_gguf.apply_chat_template(CHAT)
    assert from_dir.eos_token_ids == from_gguf.eos_token_ids


def test_gguf_tokenizer_is_cached_and_a_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch, embedded_hf):
    import glob

    from models.tokenizer import tokenizer_cache_dir

    _, hf_tok = embedded_hf
    monkeypatch.setenv("METAJUDGE_CACHE", str(tmp_path))
    texts = ["Self-rewarding models judge themselves: Score: 4", "Ünïcödé, 日本語 and  two  spaces\n\ttab",
             "<|im_start|>user\nhi<|im_end|>"]
    first = models.load_tokenizer(models.EMBEDDED_NAME)  # converts from the GGUF and writes the cache
    entries = glob.glob(f"{tokenizer_cache_dir()}/*/tokenizer.json")
    assert len(entries) == 1
    with open(entries[0], "w") as f:
        f.write("{ not json")  # a damaged entry is rebuilt, not fatal
    rebuilt = models.load_tokenizer(models.EMBEDDED_NAME)
    cached = models.load_tokenizer(models.EMBEDDED_NAME)  # read from the cache
    for tok in (first, rebuilt, cached):
        for text in texts:
            ids = hf_tok.encode(text, add_special_tokens=False)
            assert tok.encode(text) == ids and tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids)
        rendered = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(CHAT) == hf_tok.encode(rendered, add_special_tokens=False)
        assert tok.eos_token_ids == first.eos_token_ids and tok.vocab_size == len(hf_tok)
    assert not glob.glob(f"{tokenizer_cache_dir()}/.tmp-*")


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(f"the judge gives score {i % 6} to answer number {i}" for i in range(400)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=60, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=3,
    )
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return d


def test_sentencepiece_model_encodes_like_sentencepiece_and_maps_special_tokens(sentencepiece_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))
    tok = models.load_tokenizer(str(sentencepiece_dir))
    text = "the judge gives score 3"
    assert tok.encode(text) == sp.encode(text)
    ids = tok.apply_chat_template([{"role": "user", "content": "score 5"}])
    # "<s>" and "</s>" in the rendered text become the control ids, not pieces of text.
    assert ids[0] == 1 and ids.count(2) == 1
    assert ids[1:ids.index(2)] == sp.encode("[user] score 5")
    assert tok.decode(sp.encode(text)) == text
    assert tok.eos_token_ids == (2,) and tok.pad_token_id == 3


def test_missing_tokenizer_files_name_the_directory(tmp_path):
    with pytest.raises(models.LoadError, match="no tokenizer.json or tokenizer.model"):
        models.load_tokenizer(str(tmp_path))

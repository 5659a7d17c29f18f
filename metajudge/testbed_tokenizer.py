"""The verifiable testbed's tokenizer (a byte-level BPE learnt on its own text, template stretches
as added tokens) and the size of its seed model (:mod:`metajudge.testbed`)."""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Sequence

from metajudge.prompts import DEFAULT_TEMPLATES, PromptTemplates, judge_prompt, meta_judge_prompt
from metajudge.stages import write_json_atomic
from models.files import replace_dir, temp_name
from models.llama import LlamaConfig

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>")


def template_pieces(templates: PromptTemplates = DEFAULT_TEMPLATES) -> list[str]:
    """The fixed stretches of text between the inserted parts of the judge and meta-judge prompts."""
    marks = ["\x00%d\x00" % i for i in range(4)]
    texts = [judge_prompt(marks[0], marks[1], templates), meta_judge_prompt(*marks, templates=templates)]
    pieces: list[str] = []
    for text in texts:
        for piece in re.split("\x00\\d\x00", text):
            if piece and piece not in pieces:
                pieces.append(piece)
    return pieces


def build_tokenizer(directory: str, corpus: Iterable[str], *, vocab_size: int = 640,
                    templates: PromptTemplates = DEFAULT_TEMPLATES) -> None:
    """Learns a byte-level BPE on ``corpus`` and writes an HF tokenizer directory (atomically).

    Template stretches (:func:`template_pieces`) are added tokens, never split; the chat template
    is ``<|user|>...<|end|><|assistant|>...<|end|>``; ``<|end|>`` ends a turn (EOS).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    pieces = template_pieces(templates)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts() -> Iterable[str]:
        for t in corpus:
            for part in _split_on(t, pieces):
                yield part

    tok.train_from_iterator(texts(), trainer=trainer)
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in pieces])
    tmp = temp_name(directory)
    os.makedirs(tmp)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    write_json_atomic(os.path.join(tmp, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end|>", "pad_token": "<|pad|>", "bos_token": None,
        "unk_token": None, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE}, writer=True)
    replace_dir(tmp, directory)


def _split_on(text: str, pieces: Sequence[str]) -> list[str]:
    parts = [text]
    for p in pieces:
        parts = [q for part in parts for q in part.split(p)]
    return [q for q in parts if q]


def model_config(tok: Any, *, hidden: int = 128, layers: int = 3, heads: int = 4, mlp: int = 384,
                 max_positions: int = 512, dtype: str = "float32") -> Any:
    """A small Llama for the testbed tokenizer (``vocab_size`` rounded up to a multiple of 64)."""
    vocab = -(-tok.vocab_size // 64) * 64
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, rope_theta=10000.0, max_position_embeddings=max_positions,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_ids=tuple(tok.eos_token_ids),
        pad_token_id=tok.pad_token_id, dtype=dtype, param_dtype=dtype,
    )

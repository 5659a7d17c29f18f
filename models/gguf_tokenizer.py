"""The tokenizer a GGUF file describes, built with the ``tokenizers`` library (no torch, no transformers).

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary as metadata (``tokenizer.ggml.*``).
:func:`read_gguf_tokenizer` reads those fields with the ``gguf`` package into a :class:`GGUFTokenizerSpec`;
:func:`build_tokenizer` turns a spec into a ``tokenizers.Tokenizer``.

Supported: byte-level BPE vocabularies (``tokenizer.ggml.model = "gpt2"``), as in SmolLM2 and Llama-3
GGUFs, with the pre-tokenizer named by ``tokenizer.ggml.pre`` (:data:`PRE_TOKENIZERS`). SentencePiece
(``"llama"``) and other vocabularies are refused with an error that names the type and the way out
(load the checkpoint's Hugging Face directory instead).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from models.checkpoint_formats import LoadError

# llama.cpp's token types (``tokenizer.ggml.token_type``).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclasses.dataclass(frozen=True)
class GGUFTokenizerSpec:
    """The tokenizer fields of a GGUF file (``tokenizer.ggml.*`` and ``tokenizer.chat_template``)."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (SentencePiece), ...
    pre: Optional[str]  # tokenizer.ggml.pre: the pre-tokenizer's name in llama.cpp ("smollm", "llama-bpe", ...)
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]  # "left right" per merge, best first
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    unk_id: Optional[int] = None
    pad_id: Optional[int] = None
    add_bos: bool = False
    chat_template: Optional[str] = None

    def token(self, i: Optional[int]) -> Optional[str]:
        """The text of token id ``i`` (None for None or an id outside the vocabulary)."""
        return self.tokens[i] if i is not None and 0 <= i < len(self.tokens) else None


def read_gguf_tokenizer(path: str) -> GGUFTokenizerSpec:
    """The tokenizer fields of the GGUF file at ``path``; a :class:`LoadError` if it has none."""
    import gguf

    try:
        fields = gguf.GGUFReader(path).fields
    except Exception as e:  # a truncated or foreign file: numpy/struct errors of every kind
        raise LoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def get(key: str, default=None):
        f = fields.get(key)
        return default if f is None else f.contents()

    model = get("tokenizer.ggml.model")
    tokens = get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise LoadError(f"{path}: the GGUF carries no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens); "
                        "pass --tokenizer with a Hugging Face tokenizer directory")
    ids = {k: get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    return GGUFTokenizerSpec(
        model=str(model), pre=get("tokenizer.ggml.pre"), tokens=tuple(tokens),
        token_types=tuple(int(t) for t in get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))),
        merges=tuple(get("tokenizer.ggml.merges", ())),
        bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unknown"], pad_id=ids["padding"],
        add_bos=bool(get("tokenizer.ggml.add_bos_token", False)), chat_template=get("tokenizer.chat_template"),
    )


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table of byte-level BPE: printable Latin-1 bytes stand for
    themselves; the other 68 bytes (controls, space, DEL, NBSP, soft hyphen) take the characters
    U+0100, U+0101, ... in byte order, so every byte is one visible character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    moved = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + k) for k, b in enumerate(moved)})
    return table


# The regex llama.cpp and Meta split Llama-3 text with before BPE: contractions, letters with one
# leading non-letter, numbers of up to three digits, punctuation runs, newlines, other spaces.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _single_digits_pre():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


def _llama3_pre():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


# ``tokenizer.ggml.pre`` -> the pre-tokenizer its merges were learned with.
PRE_TOKENIZERS: dict[Optional[str], Callable] = {
    None: _gpt2_pre, "default": _gpt2_pre, "gpt2": _gpt2_pre, "gpt-2": _gpt2_pre,
    # SmolLM, StarCoder and kin: every digit alone, then GPT-2's split.
    "smollm": _single_digits_pre, "starcoder": _single_digits_pre,
    "llama3": _llama3_pre, "llama-v3": _llama3_pre, "llama-bpe": _llama3_pre, "smaug-bpe": _llama3_pre,
}


def build_tokenizer(spec: GGUFTokenizerSpec, source: str = "GGUF"):
    """A ``tokenizers.Tokenizer`` for ``spec``: byte-level BPE over the file's vocabulary and merges,
    the pre-tokenizer of ``spec.pre``, control tokens (type 3) as special added tokens and
    user-defined ones (type 4) as plain added tokens, so that both are matched whole in text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    if spec.model != "gpt2":
        raise LoadError(f"{source}: GGUF tokenizer type {spec.model!r} is not supported (only byte-level BPE, 'gpt2', "
                        "as in SmolLM2 and Llama-3); load the model's Hugging Face directory, whose tokenizer.json "
                        "or tokenizer.model is read directly")
    if spec.pre not in PRE_TOKENIZERS:
        raise LoadError(f"{source}: GGUF pre-tokenizer {spec.pre!r} is not supported (known: "
                        f"{', '.join(sorted(k for k in PRE_TOKENIZERS if k))}); load the model's Hugging Face directory")
    alphabet = byte_alphabet()
    spelled = set(alphabet.values())

    def in_alphabet(token: str) -> str:
        return token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode("utf-8"))

    vocab = {in_alphabet(t): i for i, t in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise LoadError(f"{source}: malformed BPE merge {' '.join(bad)!r} in tokenizer.ggml.merges")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=spec.token(spec.unk_id),
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[spec.pre]()
    tok.decoder = decoders.ByteLevel()
    types = spec.token_types
    # A "control" token outside the byte alphabet is a mislabelled byte sequence, not a marker.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(spec.tokens, types) if k == CONTROL and set(t) <= spelled])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(spec.tokens, types) if k == USER_DEFINED])
    return tok


def special_tokens(spec: GGUFTokenizerSpec) -> dict[str, Optional[str]]:
    """``bos_token``, ``eos_token``, ``unk_token``, ``pad_token`` as text (None where the file has none)."""
    return {"bos_token": spec.token(spec.bos_id), "eos_token": spec.token(spec.eos_id),
            "unk_token": spec.token(spec.unk_id), "pad_token": spec.token(spec.pad_id)}


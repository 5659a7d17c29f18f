"""Tokenizers with chat templates: HF ``tokenizer.json``, SentencePiece ``tokenizer.model``, GGUF.

``load_tokenizer(source)`` takes the same sources as ``load_model``. Every tokenizer exposes
``encode``, ``decode``, ``apply_chat_template`` (token ids), ``render_chat`` (text), the special
ids, and ``vocab_size``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Optional, Sequence

from models import gguf_tokenizer
from models.checkpoint_formats import LoadError
from models.loading import resolve_source

log = logging.getLogger(__name__)

# transformers advises at import that "PyTorch was not found": true of the base install and
# harmless, since only its tokenizers are used here. A user's own setting of the variable wins.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

Message = dict[str, str]

# Used only when a SentencePiece checkpoint ships no chat template of its own.
_FALLBACK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class Tokenizer:
    """A tokenizer plus chat template. Backed by a transformers tokenizer or by SentencePiece."""

    def __init__(
        self,
        *,
        hf: Any = None,
        sp: Any = None,
        chat_template: Optional[str] = None,
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        extra_eos_ids: Sequence[int] = (),
        source: str = "",
    ):
        self._hf, self._sp, self.source = hf, sp, source
        if hf is not None:
            self.chat_template = chat_template or getattr(hf, "chat_template", None)
            self.bos_token, self.eos_token = hf.bos_token, hf.eos_token
            self.bos_token_id, self.pad_token_id = hf.bos_token_id, hf.pad_token_id
            eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
            self.vocab_size = len(hf)
        else:
            self.chat_template = chat_template
            self.bos_token, self.eos_token = bos_token or sp.id_to_piece(sp.bos_id()), eos_token or sp.id_to_piece(sp.eos_id())
            self.bos_token_id = sp.bos_id() if sp.bos_id() >= 0 else None
            self.pad_token_id = sp.pad_id() if sp.pad_id() >= 0 else None
            eos = [sp.eos_id()] if sp.eos_id() >= 0 else []
            self.vocab_size = sp.get_piece_size()
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *extra_eos_ids]))
        if self.pad_token_id is None and self.eos_token_ids:
            self.pad_token_id = self.eos_token_ids[0]
        if not self.chat_template:
            log.warning("%s: no chat template found; using a plain role-tagged fallback", source)
            self.chat_template = _FALLBACK_TEMPLATE
        self._template = None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=False))
        return self._sp_encode_with_specials(text)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if not self._sp.is_control(i)]
        return self._sp.decode(ids)

    def render_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages``, as text."""
        if self._hf is not None:
            return self._hf.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
            )
        if self._template is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise jinja2.TemplateError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (special tokens in the text become their ids)."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))

    def _sp_encode_with_specials(self, text: str) -> list[int]:
        sp = self._sp
        specials = {p: i for p, i in ((self.bos_token, self.bos_token_id), (self.eos_token, self.eos_token_ids[0] if self.eos_token_ids else None)) if p and i is not None}
        out: list[int] = []
        rest = text
        while rest:
            hits = [(rest.find(p), p) for p in specials if rest.find(p) >= 0]
            if not hits:
                out += sp.encode(rest)
                break
            at, piece = min(hits)
            if at:
                out += sp.encode(rest[:at])
            out.append(specials[piece])
            rest = rest[at + len(piece):]
        return out


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: invalid JSON ({e})") from None


def _chat_template_from_dir(directory: str) -> Optional[str]:
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    cfg = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(cfg):
        tmpl = _read_json(cfg).get("chat_template")
        if isinstance(tmpl, list):  # named templates: take the default one
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
        return tmpl
    return None


def _generation_eos_ids(directory: str) -> list[int]:
    path = os.path.join(directory, "generation_config.json")
    if not os.path.exists(path):
        return []
    eos = _read_json(path).get("eos_token_id")
    return [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]


def load_tokenizer(source: str) -> Tokenizer:
    """Loads the tokenizer of any ``load_model`` source."""
    kind, path = resolve_source(source)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if kind == "gguf":
        hf = _gguf_tokenizer(path)
        extra = _im_end_ids(hf)
        return Tokenizer(hf=hf, extra_eos_ids=extra, source=path)
    template = _chat_template_from_dir(path)
    extra = _generation_eos_ids(path)
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise LoadError(f"{path}: could not load tokenizer.json ({type(e).__name__}: {e})") from None
        return Tokenizer(hf=hf, chat_template=template, extra_eos_ids=extra + _im_end_ids(hf), source=path)
    sp_path = os.path.join(path, "tokenizer.model")
    if os.path.exists(sp_path):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(sp_path)
        except (OSError, RuntimeError) as e:
            raise LoadError(f"{sp_path}: not a SentencePiece model ({e})") from None
        return Tokenizer(sp=sp, chat_template=template, extra_eos_ids=extra, source=path)
    raise LoadError(f"{path}: no tokenizer.json or tokenizer.model found")


# Bump when models.gguf_tokenizer builds a different tokenizer from the same file (invalidates caches).
_GGUF_BUILD = 1


def tokenizer_cache_dir() -> str:
    """Where tokenizers converted from GGUF files are kept: ``$METAJUDGE_CACHE/tokenizers``
    (default ``~/.cache/metajudge/tokenizers``)."""
    root = os.environ.get("METAJUDGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "metajudge")
    return os.path.join(root, "tokenizers")


def _gguf_tokenizer(path: str) -> Any:
    """The tokenizer embedded in a GGUF file, as a transformers fast tokenizer (no torch).

    :mod:`models.gguf_tokenizer` reads the file's tokenizer fields with the ``gguf`` package and
    builds it with the ``tokenizers`` library. Parsing the whole metadata takes a few seconds for
    SmolLM2's 49k tokens, so the result is saved once as a ``tokenizer.json`` directory, keyed by the
    file's path, size and modification time and by the ``tokenizers`` version, and later loads read
    that (~0.3 s). A cache that cannot be written is skipped with a log line.
    """
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|tokenizers-{tokenizers.__version__}|"
                         f"{_GGUF_BUILD}".encode()).hexdigest()[:16]
    cached = os.path.join(tokenizer_cache_dir(), f"{os.path.basename(path)}-{key}")
    if os.path.exists(os.path.join(cached, "tokenizer.json")):
        try:
            return PreTrainedTokenizerFast.from_pretrained(cached)
        except Exception as e:  # a damaged cache entry: rebuild it from the GGUF
            log.warning("%s: unreadable cached tokenizer (%s); rebuilding it", cached, e)
            shutil.rmtree(cached, ignore_errors=True)
    spec = gguf_tokenizer.read_gguf_tokenizer(path)
    hf = PreTrainedTokenizerFast(tokenizer_object=gguf_tokenizer.build_tokenizer(spec, source=path),
                                 chat_template=spec.chat_template, clean_up_tokenization_spaces=False,
                                 **{k: v for k, v in gguf_tokenizer.special_tokens(spec).items() if v is not None})
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(cached))
        hf.save_pretrained(tmp)
        try:
            os.replace(tmp, cached)  # atomic; fails if another process put its copy there first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        log.info("tokenizer cache %s not written (%s)", cached, e)
    return hf


def _im_end_ids(hf: Any) -> list[int]:
    """End-of-turn markers that chat models emit instead of (or before) their EOS."""
    ids = []
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        i = hf.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i != hf.unk_token_id and i >= 0:
            ids.append(i)
    return ids

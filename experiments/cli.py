"""What every entry point shares: user errors as one line (exit 2), and ``--set key=value`` overrides.

``run_main(main)`` starts ``jax.distributed`` when the run spans several processes (a TPU pod
slice, or the ``METAJUDGE_COORDINATOR`` / ``METAJUDGE_NUM_PROCESSES`` / ``METAJUDGE_PROCESS_ID``
variables: see ``models.distributed``), then runs ``main(argv)`` and turns the errors a user can
fix (a bad data file, a bad preset or model path, a diverged run, a missing file, a bad option, an
incomplete multi-process setting) into ``error: <message>`` on stderr and exit status 2, without a
traceback. Anything else is a bug and keeps its traceback.

``apply_overrides(cfg, ["train.learning_rate=1e-5", "pack=false"])`` replaces fields of a frozen
dataclass by dotted name, parsing each value with the field's declared type. An unknown name, a
group of settings given a value, a value of the wrong type and a name the config's
``fixed_keys()`` refuses (a setting derived from another: ``experiments.configs``) are each a
``UsageError`` saying what is valid.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
import traceback
import types
import typing
from typing import Any, Callable, Literal, Optional, Sequence, Union

from metajudge.checkpoint import CheckpointError
from metajudge.data import DataError
from metajudge.prompt_sources import PromptFileError
from metajudge.stages import StageMismatch
from metajudge.train import TrainingDiverged
from metajudge.trainer import UsageError  # raised by the training run too, so it lives there
from models.checkpoint_formats import LoadError
from models.distributed import DistributedSetupError, initialize, is_initialized, shutdown
from models.files import DirectoryLocked

USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, LoadError, DataError, TrainingDiverged, DistributedSetupError, FileNotFoundError, IsADirectoryError,
    NotADirectoryError, PermissionError, PromptFileError, StageMismatch, CheckpointError, DirectoryLocked,
)
# File-system conditions a user fixes (a read-only or full disk, a quota, a name clash): any OSError
# with one of these errno values is a user error too.
USER_ERRNOS = frozenset(getattr(errno, n) for n in ("EROFS", "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EEXIST",
                                                    "ENOTEMPTY", "ENAMETOOLONG", "ELOOP") if hasattr(errno, n))


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS) or (isinstance(e, OSError) and e.errno in USER_ERRNOS)


def error_message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


def run_main(fn: Callable[..., Any], argv: Optional[Sequence[str]] = None) -> None:
    """Runs ``fn()`` (``fn(argv)`` when ``argv`` is given) and exits: 0 (or ``fn``'s int result),
    2 on a user error, 130 on Ctrl-C, 1 on a bug (with its traceback).

    A multi-process run starts ``jax.distributed`` first. When one of its processes fails it
    exits at once instead of waiting at ``jax.distributed``'s shutdown barrier for processes that
    may be gone (the others fail at their next collective and exit likewise). A failure that every
    process reaches at the same point (settings that differ between them) is the exception: they
    leave through the barrier together, so process 0 does not take the coordination service down
    while the others still poll it.
    """
    try:
        initialize()
        rc = fn() if argv is None else fn(argv)
    except Exception as e:
        if not is_user_error(e):
            if not is_initialized():
                raise
            traceback.print_exc()
            _exit(1)
        print(f"error: {error_message(e)}", file=sys.stderr)
        if getattr(e, "every_process", False):  # all processes failed together: leave together
            sys.stderr.flush()
            shutdown()
        _exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


def _exit(code: int) -> None:
    """``sys.exit(code)``; on a multi-process run ``os._exit`` after flushing, which skips the
    shutdown barrier of ``jax.distributed``."""
    if is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ------------------------------------------------------------------------------ --set overrides

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_value(raw: str, tp: Any, key: str) -> Any:
    """``raw`` as type ``tp`` (bool, int, float, str, Optional, Literal, tuple[X, ...])."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and raw.strip().lower() in ("none", "null"):
            return None
        rest = [a for a in args if a is not type(None)]
        errors = []
        for a in rest:
            try:
                return parse_value(raw, a, key)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"--set {key}: cannot parse {raw!r}")
    if origin is Literal:
        for a in args:
            if str(a) == raw:
                return a
        raise UsageError(f"--set {key}={raw}: must be one of {', '.join(map(str, args))}")
    if origin is tuple:
        item = args[0] if args else str
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        return tuple(parse_value(p, item, key) for p in parts)
    if tp is bool:
        low = raw.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise UsageError(f"--set {key}={raw}: expected true or false")
    if tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            raise UsageError(f"--set {key}={raw}: expected {'an integer' if tp is int else 'a number'}") from None
    if tp is str or tp is Any:
        return raw
    raise UsageError(f"--set {key}: fields of type {tp} cannot be set from the command line")


def _group(obj: Any, name: str) -> Any:
    """The group of settings ``obj.name`` (an unset optional group starts from its default), or None."""
    sub = getattr(obj, name)
    if sub is None and hasattr(obj, "group_default"):
        sub = obj.group_default(name)
    return sub if dataclasses.is_dataclass(sub) else None


def _set(obj: Any, path: list[str], raw: str, key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = path[0]
    if name not in fields:
        raise UsageError(f"--set {key}: {type(obj).__name__} has no field {name!r}; fields: {', '.join(fields)}")
    sub = _group(obj, name)
    if len(path) > 1:
        if sub is None:
            raise UsageError(f"--set {key}: {name!r} is a single setting, not a group of settings")
        value = _set(sub, path[1:], raw, key)
    else:
        tp = typing.get_type_hints(type(obj))[name]
        if sub is not None and not (raw.strip().lower() in ("none", "null") and type(None) in typing.get_args(tp)):
            prefix = key[: len(key) - len(name)]
            names = ", ".join(prefix + name + "." + f.name for f in dataclasses.fields(sub))
            raise UsageError(f"--set {key}: {name!r} is a group of settings; set one of {names}")
        value = parse_value(raw, tp, key)
    try:
        return dataclasses.replace(obj, **{name: value})
    except (TypeError, ValueError) as e:
        raise UsageError(f"--set {key}={raw}: {e}") from None


def apply_overrides(cfg: Any, items: Sequence[str]) -> Any:
    """``cfg`` with each ``dotted.name=value`` of ``items`` applied, in order."""
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected key=value, e.g. train.learning_rate=1e-5")
        fixed = cfg.fixed_keys() if hasattr(cfg, "fixed_keys") else {}
        if key in fixed:
            raise UsageError(f"--set {key}: {fixed[key]}")
        cfg = _set(cfg, key.split("."), raw.strip(), key)
    return cfg


def config_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a (nested) dataclass config."""
    return dataclasses.asdict(cfg)

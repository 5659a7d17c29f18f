"""`models.executables.compile_only`: ``generate``, ``score`` and ``next_token_logprobs`` run on
abstract parameters (``jax.ShapeDtypeStruct``s on a mesh) compile exactly the programs that a real
call with the same inputs compiles and runs, with the same shapes and shardings, and nothing runs.
This is what `experiments.aot` relies on to compile the sampler for a TPU topology."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import models
from models import buckets, executables, sampler, scoring
from models.sharding import make_mesh

TINY = models.get_config("tiny")


def _abstract(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))


def _program(key: tuple) -> tuple:
    """An executable's key with the placement of each argument placed on the mesh; host constants
    (sampling knobs), committed to no mesh, take the program's placement either way."""
    name, static, treedef, sig = key
    mesh_only = lambda sh: sh if isinstance(sh, jax.sharding.NamedSharding) else None
    return name, static, treedef, tuple((shape, dtype, mesh_only(sh)) for shape, dtype, sh in sig)


def _programs(monkeypatch, call) -> list[tuple]:
    """The executables ``call()`` compiles, in order, from an empty cache."""
    monkeypatch.setattr(executables, "_EXECUTABLES", {})
    call()
    return [_program(key) for key in executables._EXECUTABLES]


@pytest.fixture(scope="module")
def on_mesh():
    return models.create_model(TINY, seed=1, mesh=make_mesh("data=2,fsdp=2,tensor=2"))


def _prompts(shared: int):
    rs = np.random.default_rng(4)
    head = rs.integers(3, TINY.vocab_size, size=shared).tolist()
    return [head + rs.integers(3, TINY.vocab_size, size=n).tolist() for n in (5, 17, 9)]


@pytest.mark.parametrize("shared", [0, 21])  # 21: a prefix shared by every prompt, prefilled once
def test_generate_compiles_what_a_real_call_runs(monkeypatch, on_mesh, shared):
    kw = dict(n_samples=2, max_new_tokens=40, temperature=0.8, top_p=0.9, stop_ids=(), rng=jax.random.key(0),
              buckets=buckets.Buckets(min_shared_prefix=10))
    real = _programs(monkeypatch, lambda: sampler.generate(on_mesh, _prompts(shared), **kw))
    names = [key[0] for key in real]
    assert names.count("decode") >= 2 and "grow" in names  # the cache grew into a second bucket
    assert ("prefix" in names) == bool(shared)
    abstract = _abstract(on_mesh)
    with executables.compile_only() as compiled:
        tokens, lengths, logprobs = sampler.generate(abstract, _prompts(shared), **kw)
    assert [_program(r["key"]) for r in compiled] == real  # same programs, shapes and shardings, in the same order
    assert tokens.shape == (6, 40) and not tokens.any() and not lengths.any()  # nothing ran: zeros


def test_the_scorers_compile_what_a_real_call_runs(monkeypatch, on_mesh):
    seqs = _prompts(0)
    real = _programs(monkeypatch, lambda: (scoring.next_token_logprobs(on_mesh, seqs, [3, 4, 5]),
                                           scoring.score(on_mesh, seqs[:2], seqs[1:])))
    with executables.compile_only() as compiled:
        out = scoring.next_token_logprobs(_abstract(on_mesh), seqs, [3, 4, 5])
        scoring.score(_abstract(on_mesh), seqs[:2], seqs[1:])
    assert [_program(r["key"]) for r in compiled] == real
    assert out.shape == (3, 3) and not out.any()
    assert all(r["compiled"].memory_analysis() is not None for r in compiled)

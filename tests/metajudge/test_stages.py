"""Resumable stages: a crash inside a stage loses only the shard in flight."""

from __future__ import annotations

import json
import os

import pytest

from metajudge.stages import Stage, StageMismatch, read_jsonl


def _square(calls):
    def fn(i, chunk):
        calls.append(i)
        return [{"x": x, "y": x * x, "shard": i} for x in chunk]
    return fn


def test_stage_runs_every_shard_once_then_returns_stored_records(tmp_path):
    calls = []
    stage = Stage(str(tmp_path / "s"), "square", fingerprint_of={"k": 1})
    out = stage.run(list(range(10)), _square(calls), shard_size=4, progress=False)
    assert [r["y"] for r in out] == [x * x for x in range(10)]
    assert calls == [0, 1, 2]
    again = Stage(str(tmp_path / "s"), "square", fingerprint_of={"k": 1})
    assert again.done and again.run(list(range(10)), _square(calls), shard_size=4, progress=False) == out
    assert calls == [0, 1, 2]  # nothing re-ran
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["n_items"] == 10


def test_crash_inside_a_stage_resumes_at_the_shard_in_flight(tmp_path):
    calls = []

    def crashing(i, chunk):
        if i == 2:
            raise KeyboardInterrupt  # stands in for a kill
        return _square(calls)(i, chunk)

    stage = Stage(str(tmp_path / "s"), "square", fingerprint_of="cfg")
    with pytest.raises(KeyboardInterrupt):
        stage.run(list(range(14)), crashing, shard_size=4, progress=False)
    assert not stage.done and calls == [0, 1]
    assert not [f for f in os.listdir(tmp_path / "s") if ".tmp" in f]  # no half-written files
    out = Stage(str(tmp_path / "s"), "square", fingerprint_of="cfg").run(
        list(range(14)), _square(calls), shard_size=4, progress=False)
    assert calls == [0, 1, 2, 3]
    assert [r["x"] for r in out] == list(range(14))


def test_restart_with_other_settings_is_refused_with_a_message(tmp_path):
    Stage(str(tmp_path / "s"), "square", fingerprint_of={"K": 4}).run([1, 2], _square([]), shard_size=1, progress=False)
    with pytest.raises(StageMismatch, match="other inputs or settings.*new --out"):
        Stage(str(tmp_path / "s"), "square", fingerprint_of={"K": 7}).done


def test_records_survive_a_round_trip_through_jsonl(tmp_path):
    stage = Stage(str(tmp_path / "s"), "t", fingerprint_of=None)
    stage.run(["a", "b"], lambda i, c: [{"v": c[0], "nested": {"l": [1, 2]}}], shard_size=1, progress=False)
    assert read_jsonl(str(tmp_path / "s" / "shard_00001.jsonl")) == [{"v": "b", "nested": {"l": [1, 2]}}]

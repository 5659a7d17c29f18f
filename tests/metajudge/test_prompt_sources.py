"""Prompt sources: seed set, user JSONL, optional TFDS, held-out split, per-iteration slices."""

import json
import logging
import random
import sys
import types
from collections import Counter

import pytest

from metajudge.prompt_sources import (
    PromptFileError,
    iteration_prompts,
    load_prompt_file,
    load_seed_prompts,
    load_tfds_prompts,
    normalise_prompt,
    split_prompts,
)


def _prompts(n, prefix="p"):
    return [{"id": f"{prefix}-{i}", "prompt": f"{prefix} prompt number {i}"} for i in range(n)]


def _ids(prompts):
    return [p["id"] for p in prompts]


# ----------------------------------------------------------------------------- seed set


def test_seed_set_has_at_least_600_prompts_with_unique_normalised_text():
    seeds = load_seed_prompts()
    assert len(seeds) >= 600
    assert len({normalise_prompt(p["prompt"]) for p in seeds}) == len(seeds)


def test_seed_ids_are_unique_and_numbered():
    ids = _ids(load_seed_prompts())
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("seed-") and i[5:].isdigit() for i in ids)


def test_every_seed_category_has_at_least_20_prompts():
    counts = Counter(p["category"] for p in load_seed_prompts())
    assert len(counts) >= 12
    assert min(counts.values()) >= 20, counts


def test_seed_records_have_non_empty_prompt_strings():
    for p in load_seed_prompts():
        assert isinstance(p["prompt"], str) and p["prompt"].strip() == p["prompt"] and p["prompt"]
        assert isinstance(p["category"], str) and p["category"]


# ----------------------------------------------------------------------------- user JSONL


def _write(tmp_path, lines, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


def test_jsonl_loader_skips_bad_lines_and_reports_them_with_file_and_line(tmp_path, caplog):
    path = _write(
        tmp_path,
        [
            json.dumps({"id": "a", "prompt": "Explain tides."}),  # 1 ok
            "{not json",  # 2
            "",  # 3 blank: ignored, not bad
            json.dumps({"prompt": ""}),  # 4 empty prompt
            json.dumps(["a", "list"]),  # 5 not an object
            json.dumps({"messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Name three rivers."},
            ]}),  # 6 ok: the last user turn is the prompt
            json.dumps({"id": "a", "prompt": "Another prompt."}),  # 7 duplicate id
            b"\xff\xfe",  # 8 invalid UTF-8
            json.dumps({"messages": [{"role": "assistant", "content": "no user turn"}]}),  # 9
        ],
    )
    with caplog.at_level(logging.WARNING, logger="metajudge.prompt_sources"):
        prompts = load_prompt_file(path)
    assert [p["prompt"] for p in prompts] == ["Explain tides.", "Name three rivers."]
    assert prompts[0]["id"] == "a" and prompts[0]["source"] == f"{path}:1"
    assert prompts[1]["id"].startswith("sha-") and prompts[1]["source"] == f"{path}:6"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 6 invalid prompt record(s), kept 2" in warnings[0]
    for lineno in (2, 4, 5):  # the first three are spelled out, the rest counted
        assert f"{path}:{lineno}:" in warnings[0]
    assert "(+3 more)" in warnings[0]


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{oops", "invalid JSON"),
        (json.dumps({"prompt": 3}), "'prompt' must be a non-empty string"),
        (json.dumps({"text": "x"}), "no 'prompt' string and no 'messages' list"),
        (json.dumps({"messages": "hi"}), "'messages' must be a list"),
        (json.dumps({"messages": [{"role": "user", "content": ""}]}), "non-empty string content"),
        (json.dumps({"id": True, "prompt": "x"}), "'id' must be"),
    ],
)
def test_jsonl_loader_names_each_problem_and_keeps_the_good_lines(tmp_path, caplog, line, problem):
    path = _write(tmp_path, [json.dumps({"prompt": "fine"}), line])
    with caplog.at_level(logging.WARNING, logger="metajudge.prompt_sources"):
        assert [p["prompt"] for p in load_prompt_file(path)] == ["fine"]
    assert f"{path}:2: " in caplog.text and problem in caplog.text


def test_jsonl_loader_reads_a_custom_field_and_keeps_category(tmp_path):
    line = json.dumps({"instruction": "Sort these.", "category": "classification", "id": 7})
    path = _write(tmp_path, [line])
    (p,) = load_prompt_file(path, field="instruction")
    assert p == {"id": "7", "prompt": "Sort these.", "category": "classification", "source": f"{path}:1"}


def test_missing_file_raises_prompt_file_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(PromptFileError, match="nowhere.jsonl"):
        load_prompt_file(missing)
    assert issubclass(PromptFileError, ValueError)


def test_file_with_no_valid_prompt_raises_naming_the_file(tmp_path):
    path = _write(tmp_path, ["{bad", json.dumps({"prompt": "  "})], name="junk.jsonl")
    with pytest.raises(PromptFileError, match=r"junk\.jsonl: no valid prompts \(2 invalid"):
        load_prompt_file(path)
    empty = _write(tmp_path, [""], name="empty.jsonl")
    with pytest.raises(PromptFileError, match="empty.jsonl.*empty"):
        load_prompt_file(empty)


# ----------------------------------------------------------------------------- TFDS


def test_missing_tfds_names_the_pip_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install -e "\.\[tfds\]"'):
        load_tfds_prompts("some_dataset", "train", field="prompt", limit=5)


def test_tfds_loader_decodes_the_field_and_respects_limit(monkeypatch):
    texts = [b"First prompt", b"", "Third", b"Fourth"]
    rows = [{"meta": {"text": t}} for t in texts]

    class FakeDataset(list):
        def take(self, k):
            return FakeDataset(self[:k])

    fake = types.ModuleType("tensorflow_datasets")
    fake.load = lambda name, split, data_dir=None: FakeDataset(rows)
    fake.as_numpy = lambda ds: iter(ds)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    prompts = load_tfds_prompts("toy", "train", field="meta/text", limit=3)
    assert [(p["id"], p["prompt"]) for p in prompts] == [
        ("toy/train/0", "First prompt"),
        ("toy/train/2", "Third"),
    ]
    with pytest.raises(KeyError, match="missing"):
        load_tfds_prompts("toy", "train", field="missing", limit=3)


# ----------------------------------------------------------------------------- split


def test_split_is_deterministic_and_disjoint_and_covers_everything():
    seeds = load_seed_prompts()
    train, heldout = split_prompts(seeds, heldout_fraction=0.1, seed=0)
    train2, heldout2 = split_prompts(seeds, heldout_fraction=0.1, seed=0)
    assert _ids(train) == _ids(train2) and _ids(heldout) == _ids(heldout2)
    assert not set(_ids(train)) & set(_ids(heldout))
    assert len(train) + len(heldout) == len(seeds)
    assert 0.05 * len(seeds) <= len(heldout) <= 0.15 * len(seeds)


def test_split_is_stable_under_shuffling():
    prompts = _prompts(500)
    _, heldout = split_prompts(prompts, seed=3)
    shuffled = prompts[:]
    random.Random(0).shuffle(shuffled)
    train_s, heldout_s = split_prompts(shuffled, seed=3)
    assert set(_ids(heldout_s)) == set(_ids(heldout))
    assert _ids(heldout_s) == [p["id"] for p in shuffled if p["id"] in set(_ids(heldout))]  # input order kept


def test_split_is_stable_when_other_prompts_are_added():
    base = _prompts(300)
    _, heldout = split_prompts(base, seed=1)
    _, heldout_more = split_prompts(_prompts(700, prefix="other") + base, seed=1)
    assert {p["id"] for p in heldout_more if p["id"].startswith("p-")} == set(_ids(heldout))


def test_split_puts_equal_texts_on_the_same_side_whatever_their_ids():
    copies = [{"id": f"copy-{i}", "prompt": f"  P PROMPT number {i} "} for i in range(400)]
    prompts = _prompts(400) + copies
    train, heldout = split_prompts(prompts, heldout_fraction=0.3)
    held_texts = {normalise_prompt(p["prompt"]) for p in heldout}
    assert not held_texts & {normalise_prompt(p["prompt"]) for p in train}


def test_split_depends_on_the_seed_and_honours_the_extremes():
    prompts = _prompts(400)
    assert _ids(split_prompts(prompts, seed=0)[1]) != _ids(split_prompts(prompts, seed=1)[1])
    assert split_prompts(prompts, heldout_fraction=0.0)[1] == []
    assert split_prompts(prompts, heldout_fraction=1.0)[0] == []
    with pytest.raises(ValueError):
        split_prompts(prompts, heldout_fraction=1.5)


# ----------------------------------------------------------------------------- iterations


def test_iteration_prompts_are_disjoint_across_iterations_while_the_pool_lasts():
    train, _ = split_prompts(load_seed_prompts())
    n = 100
    batches = [iteration_prompts(train, t, n, seed=0) for t in range(1, len(train) // n + 1)]
    assert all(len(b) == n for b in batches)
    ids = [i for b in batches for i in _ids(b)]
    assert len(ids) == len(set(ids))


def test_iteration_prompts_are_deterministic_and_ignore_input_order():
    pool = _prompts(250)
    shuffled = pool[:]
    random.Random(5).shuffle(shuffled)
    for t in (1, 2, 3):
        assert _ids(iteration_prompts(pool, t, 60, seed=2)) == _ids(
            iteration_prompts(shuffled, t, 60, seed=2)
        )
    assert _ids(iteration_prompts(pool, 1, 60, seed=2)) != _ids(iteration_prompts(pool, 1, 60, seed=3))


def test_iteration_prompts_wrap_around_with_a_logged_notice(caplog):
    pool = _prompts(25)
    with caplog.at_level(logging.WARNING, logger="metajudge.prompt_sources"):
        first_pass = [iteration_prompts(pool, t, 10) for t in (1, 2)]
        assert not caplog.records
        third = iteration_prompts(pool, 3, 10)
    assert len(third) == 10 and len(set(_ids(third))) == 10
    assert set(_ids(third)) & (set(_ids(first_pass[0])) | set(_ids(first_pass[1])))
    assert len(caplog.records) == 1 and "re-using prompts" in caplog.records[0].getMessage()


def test_iteration_prompts_count_duplicate_texts_once():
    pool = _prompts(20) + [{"id": "zz-dup", "prompt": "P prompt number 0"}]
    batches = [iteration_prompts(pool, t, 10) for t in (1, 2)]
    texts = [normalise_prompt(p["prompt"]) for b in batches for p in b]
    assert len(texts) == len(set(texts)) == 20
    assert "zz-dup" not in {i for b in batches for i in _ids(b)}  # the smallest id represents a text


def test_iteration_prompts_reject_bad_arguments():
    pool = _prompts(5)
    with pytest.raises(ValueError, match="1-based"):
        iteration_prompts(pool, 0, 2)
    with pytest.raises(ValueError, match="only 5"):
        iteration_prompts(pool, 1, 6)
    with pytest.raises(ValueError):
        iteration_prompts(pool, 1, 0)


def test_heldout_prompts_never_reach_any_iteration():
    train, heldout = split_prompts(load_seed_prompts(), heldout_fraction=0.2, seed=4)
    used = {i for t in range(1, 12) for i in _ids(iteration_prompts(train, t, 90, seed=4))}
    assert used and not used & set(_ids(heldout))


def test_alpaca_eval_json_list_reads_every_instruction_with_its_dataset(tmp_path):
    # AlpacaEval's evaluation set: one JSON list; records carry instruction, output, generator, dataset.
    records = [{"instruction": f"Question {i}?", "output": "x", "generator": "gpt4_1106_preview",
                "dataset": "helpful_base" if i % 2 else "koala"} for i in range(5)]
    records.append({"instruction": "", "dataset": "oasst"})  # skipped, counted
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps(records, indent=2))
    prompts = load_prompt_file(path)
    assert [p["prompt"] for p in prompts] == [f"Question {i}?" for i in range(5)]
    assert [p["dataset"] for p in prompts] == ["koala", "helpful_base", "koala", "helpful_base", "koala"]
    assert prompts[3]["source"] == f"{path}[3]" and prompts[3]["id"].startswith("sha-")


def test_jsonl_whose_first_line_is_a_list_is_still_read_line_by_line(tmp_path, caplog):
    path = _write(tmp_path, [json.dumps(["not", "a", "prompt"]), json.dumps({"prompt": "fine"})])
    with caplog.at_level(logging.WARNING, logger="metajudge.prompt_sources"):
        assert [p["prompt"] for p in load_prompt_file(path)] == ["fine"]
    assert f"{path}:1: a record must be a JSON object" in caplog.text

"""Record validation, token masks on hand-worked examples, packing, and the grain pipeline."""

import json
import logging

import numpy as np
import pytest

from metajudge.data import (
    DataError,
    build_dpo_examples,
    build_sft_examples,
    make_dataset,
    pack_examples,
    read_jsonl,
    tokenize_dpo,
    tokenize_sft,
)

BOS, EOT = 1, 2
HDR = {"system": 3, "user": 4, "assistant": 5}


class FakeTokenizer:
    """``BOS (HDR_role chars... EOT)*`` and, with a generation prompt, a trailing ``HDR_assistant``."""

    def encode(self, text):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt):
        ids = [BOS]
        for m in messages:
            ids += [HDR[m["role"]], *self.encode(m["content"]), EOT]
        return ids + ([HDR["assistant"]] if add_generation_prompt else [])


class UnstableTokenizer(FakeTokenizer):
    """The generation prompt differs from how a finished assistant turn is rendered."""

    def apply_chat_template(self, messages, add_generation_prompt):
        ids = super().apply_chat_template(messages, False)
        return ids + ([99] if add_generation_prompt else [])


def c(s):
    return [ord(ch) for ch in s]


def write_lines(tmp_path, lines, name="f.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(p)


GOOD_SFT = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


# ----------------------------------------------------------------------------- read_jsonl


def test_read_jsonl_sft_reports_each_bad_record_with_file_and_line(tmp_path, caplog):
    lines = [
        GOOD_SFT,
        '{"messages": [',
        "",
        json.dumps({"msgs": []}),
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}),
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}),
        json.dumps([1, 2]),
        GOOD_SFT,
    ]
    path = write_lines(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="metajudge.data"):
        records, report = read_jsonl(path, kind="sft")
    assert len(records) == 2 and report.n_ok == 2
    assert [b.line for b in report.bad] == [2, 4, 5, 6, 7, 8]
    problems = [b.problem for b in report.bad]
    wanted = ["invalid JSON", "missing field", "last message", "empty response", "must be a string", "JSON object"]
    for want, got in zip(wanted, problems):
        assert want in got
    assert str(report.bad[0]).startswith(f"{path}:2: invalid JSON")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "6 bad sft record" in warnings[0].getMessage() and f"{path}:2" in warnings[0].getMessage()


def test_read_jsonl_raise_names_file_line_and_problem(tmp_path):
    path = write_lines(tmp_path, [GOOD_SFT, GOOD_SFT, "not json"])
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        read_jsonl(path, kind="sft", on_error="raise")
    assert issubclass(DataError, ValueError)


def test_read_jsonl_reports_invalid_utf8(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_bytes(GOOD_SFT.encode() + b"\n\xff\xfe{}\n")
    records, report = read_jsonl(str(p), kind="sft")
    assert len(records) == 1 and report.bad[0].line == 2 and "UTF-8" in report.bad[0].problem


def test_read_jsonl_dpo_validation_and_metadata_kept(tmp_path):
    ok = {"prompt": "p", "chosen": "a", "rejected": "b", "ref_chosen_logp": -3.5, "ref_rejected_logp": -4, "judge": "x"}
    msgs_prompt = {"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"}
    bad = [
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "p", "chosen": 1, "rejected": "b"}, "'chosen' must be a string"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "empty response: 'chosen'"),
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, "empty prompt"),
        ({**msgs_prompt, "prompt": [{"role": "assistant", "content": "p"}]}, "must not end with an assistant"),
        ({**msgs_prompt, "prompt": 5}, "'prompt' must be a non-empty list"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "ref_chosen_logp": -1.0}, "without its pair"),
        ({**ok, "ref_rejected_logp": "x"}, "finite number"),
        ({**ok, "ref_rejected_logp": True}, "finite number"),
    ]
    path = write_lines(tmp_path, [json.dumps(ok), json.dumps(msgs_prompt)] + [json.dumps(r) for r, _ in bad])
    records, report = read_jsonl(path, kind="dpo")
    assert records == [ok, msgs_prompt]
    assert [b.line for b in report.bad] == list(range(3, 3 + len(bad)))
    for b, (_, want) in zip(report.bad, bad):
        assert want in b.problem, (b, want)


def test_read_jsonl_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        read_jsonl(write_lines(tmp_path, [GOOD_SFT]), kind="rm")


# ----------------------------------------------------------------------------- tokenization


def test_sft_mask_covers_only_assistant_tokens_hand_example():
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ex = tokenize_sft(rec, FakeTokenizer(), max_len=10)
    # full: BOS U h i EOT A y o EOT ; the model must predict y, o, EOT only.
    assert ex["inputs"].tolist() == [BOS, 4, *c("hi"), EOT, 5, *c("yo"), 0, 0]
    assert ex["targets"].tolist() == [4, *c("hi"), EOT, 5, *c("yo"), EOT, 0, 0]
    assert ex["loss_mask"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    assert ex["positions"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 0]
    assert ex["segment_ids"].tolist() == [1] * 8 + [0, 0]


def test_sft_mask_multi_turn_trains_every_assistant_turn():
    rec = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    ex = tokenize_sft(rec, FakeTokenizer(), max_len=16)
    # targets: S s EOT U a EOT A [b EOT] U c EOT A [d EOT]
    want = [3, *c("s"), EOT, 4, *c("a"), EOT, 5, *c("b"), EOT, 4, *c("c"), EOT, 5, *c("d"), EOT]
    assert ex["targets"][:15].tolist() == want
    assert ex["loss_mask"].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0]


def test_sft_truncates_to_max_len():
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ex = tokenize_sft(rec, FakeTokenizer(), max_len=6)
    assert ex["targets"].tolist() == [4, *c("hi"), EOT, 5, *c("y")]
    assert ex["loss_mask"].tolist() == [0, 0, 0, 0, 0, 1]


def test_prefix_unstable_template_raises():
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(DataError, match="prefix-stable"):
        tokenize_sft(rec, UnstableTokenizer(), max_len=10)


DPO_REC = {"prompt": "ab", "chosen": "xyz", "rejected": "w", "ref_chosen_logp": -1.5, "ref_rejected_logp": -2.5}


def test_dpo_tokens_and_response_masks_hand_example():
    ex = tokenize_dpo(DPO_REC, FakeTokenizer(), max_len=12)
    prompt = [BOS, 4, *c("ab"), EOT, 5]
    assert ex["chosen_inputs"].tolist() == prompt + c("xyz") + [0] * 3
    assert ex["chosen_targets"].tolist() == prompt[1:] + c("xyz") + [EOT] + [0] * 3
    assert ex["chosen_loss_mask"].tolist() == [0] * 5 + [1] * 4 + [0] * 3
    assert ex["rejected_inputs"].tolist() == prompt + c("w") + [0] * 5
    assert ex["rejected_targets"].tolist() == prompt[1:] + c("w") + [EOT] + [0] * 5
    assert ex["rejected_loss_mask"].tolist() == [0] * 5 + [1] * 2 + [0] * 5
    assert ex["rejected_segment_ids"].tolist() == [1] * 7 + [0] * 5
    assert ex["ref_chosen_logp"] == np.float32(-1.5) and ex["ref_rejected_logp"] == np.float32(-2.5)


def test_dpo_left_truncates_prompt_and_keeps_response_start():
    tok = FakeTokenizer()
    # 8 token slots; chosen response is 4 tokens, so the prompt keeps its last 4: a b EOT A.
    ex = tokenize_dpo(DPO_REC, tok, max_len=7)
    assert ex["chosen_inputs"].tolist() == [*c("ab"), EOT, 5, *c("xyz")]
    assert ex["chosen_targets"].tolist() == [*c("b"), EOT, 5, *c("xyz"), EOT]
    assert ex["chosen_loss_mask"].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert ex["rejected_inputs"].tolist() == [*c("ab"), EOT, 5, *c("w"), 0, 0]
    assert ex["rejected_loss_mask"].tolist() == [0, 0, 0, 1, 1, 0, 0]
    # A prompt floor of 5 tokens wins over the response: the response loses its tail instead.
    ex = tokenize_dpo(DPO_REC, tok, max_len=7, max_prompt_len=5)
    assert ex["chosen_inputs"].tolist() == [4, *c("ab"), EOT, 5, *c("xy")]
    assert ex["chosen_targets"].tolist() == [*c("ab"), EOT, 5, *c("xyz")]
    assert ex["chosen_loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_dpo_messages_prompt_equals_string_prompt():
    tok = FakeTokenizer()
    as_msgs = {**DPO_REC, "prompt": [{"role": "user", "content": "ab"}]}
    a, b = tokenize_dpo(DPO_REC, tok, max_len=12), tokenize_dpo(as_msgs, tok, max_len=12)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_dpo_reference_logps_all_or_none():
    no_ref = {k: v for k, v in DPO_REC.items() if not k.startswith("ref_")}
    with pytest.raises(DataError, match="all or none"):
        build_dpo_examples([DPO_REC, no_ref], FakeTokenizer(), max_len=12)


# ----------------------------------------------------------------------------- packing


def test_pack_segment_ids_and_positions_hand_example():
    a = ([10, 11, 12], [11, 12, 13], [0, 1, 1])
    b = ([20, 21, 22, 23], [21, 22, 23, 24], [0, 0, 1, 1])
    d = ([30, 31], [31, 32], [1, 1])
    rows = pack_examples([a, b, d], max_len=8, pad_id=0)
    assert len(rows) == 2
    assert rows[0]["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 0]
    assert rows[0]["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert rows[0]["inputs"].tolist() == [10, 11, 12, 20, 21, 22, 23, 0]
    assert rows[0]["targets"].tolist() == [11, 12, 13, 21, 22, 23, 24, 0]
    assert rows[0]["loss_mask"].tolist() == [0, 1, 1, 0, 0, 1, 1, 0]
    assert rows[1]["segment_ids"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert rows[1]["positions"].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]


def test_packed_sft_rows_hold_the_unpacked_examples():
    tok = FakeTokenizer()
    recs = [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": v}]}
        for u, v in [("a", "b"), ("c", "de"), ("f", "g")]
    ]  # shifted lengths 6, 7, 6
    packed = build_sft_examples(recs, tok, max_len=16, pack=True)
    single = build_sft_examples(recs, tok, max_len=16)
    assert len(packed) == 2 and len(single) == 3
    assert packed[0]["segment_ids"].tolist() == [1] * 6 + [2] * 7 + [0] * 3
    assert packed[0]["positions"].tolist() == list(range(6)) + list(range(7)) + [0] * 3
    for key in ("inputs", "targets", "loss_mask"):
        np.testing.assert_array_equal(packed[0][key][:13], np.concatenate([single[0][key][:6], single[1][key][:7]]))
        np.testing.assert_array_equal(packed[1][key], single[2][key])


# ----------------------------------------------------------------------------- grain pipeline


EXAMPLES = [{"x": np.array([i], np.int32)} for i in range(40)]


def take(it, n):
    return [next(it)["x"][:, 0].tolist() for _ in range(n)]


def test_same_seed_same_order_different_seed_different():
    a = take(make_dataset(EXAMPLES, batch_size=4, seed=7), 10)
    b = take(make_dataset(EXAMPLES, batch_size=4, seed=7), 10)
    d = take(make_dataset(EXAMPLES, batch_size=4, seed=8), 10)
    assert a == b and a != d
    assert sorted(sum(a, [])) == list(range(40))
    unshuffled = take(make_dataset(EXAMPLES, batch_size=4, seed=7, shuffle=False), 10)
    assert sum(unshuffled, []) == list(range(40))


def test_each_epoch_sees_every_example_once_in_a_new_order():
    it = make_dataset(EXAMPLES, batch_size=4, seed=0, num_epochs=2)
    e1, e2 = sum(take(it, 10), []), sum(take(it, 10), [])
    assert sorted(e1) == sorted(e2) == list(range(40)) and e1 != e2
    with pytest.raises(StopIteration):
        next(it)


def test_restored_state_continues_with_the_same_batches():
    it = make_dataset(EXAMPLES, batch_size=4, seed=3, num_epochs=3)
    take(it, 13)  # cross an epoch boundary
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 6)
    fresh = make_dataset(EXAMPLES, batch_size=4, seed=3, num_epochs=3)
    fresh.set_state(state)
    assert take(fresh, 6) == expected


def shard_values(examples, i, count=2):
    it = make_dataset(examples, batch_size=4, seed=1, shard_index=i, shard_count=count, drop_remainder=False)
    return [v for b in it for v in b["x"][:, 0].tolist()]


def test_two_shards_partition_the_data():
    a, b = shard_values(EXAMPLES, 0), shard_values(EXAMPLES, 1)
    assert len(a) == len(b) == 20 and sorted(a + b) == list(range(40))


def test_uneven_shards_are_trimmed_to_equal_size():
    examples = EXAMPLES + [{"x": np.array([40], np.int32)}]
    a, b = shard_values(examples, 0), shard_values(examples, 1)
    assert len(a) == len(b) == 20 and not set(a) & set(b) and set(a + b) <= set(range(41))


def test_dpo_batches_stack_fields_and_transform_applies():
    exs = build_dpo_examples([DPO_REC] * 6, FakeTokenizer(), max_len=12)
    it = make_dataset(exs, batch_size=3, seed=0, transform=lambda e: {**e, "w": np.float32(1.0)})
    batch = next(it)
    assert batch["chosen_inputs"].shape == (3, 12) and batch["chosen_inputs"].dtype == np.int32
    assert batch["ref_chosen_logp"].shape == (3,) and batch["w"].tolist() == [1.0] * 3

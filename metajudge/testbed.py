"""A verifiable testbed: digit-list instructions whose right answer, and right judgment, are known.

The world
---------
An instruction asks for one transformation of a list of five digits::

    Sort the list: 3 8 1 4 4            -> 1 3 4 4 8
    Reverse the list: 3 8 1 4 4         -> 4 4 1 8 3
    Add one to each digit: 3 8 1 4 9    -> 4 9 2 5 0      (9 wraps to 0)
    Move the first digit to the end: 3 8 1 4 4 -> 8 1 4 4 3

A response is the answer's digits, possibly wrapped in *filler* sentences that contain no digit
("Sure.", "I hope this helps.", ...). The three properties the testbed is built for:

(a) graded quality: :func:`grade` gives 0..5, the number of positions whose digit is right minus
    one per digit beyond the fifth (floored at 0), so a response can be partly right;
(b) length without quality: filler lengthens a response and never changes its grade, so a judge
    that rewards length can drive lengths up while quality stays put;
(c) judging is learnable but not trivial: a judgment works the answer out and checks each position
    (a short chain of thought the tiny model can imitate) before its ``Score:`` line; the seed is
    trained on judgments with controlled noise (:class:`JudgeNoise`).

Judgment and meta-judgment formats (the assistant's side of the judge and meta-judge prompts of
:mod:`metajudge.prompts`, which the testbed uses unchanged)::

    Got: 1 4 4 3 8                              (a judgment)
    Expected: 1 3 4 4 8
    Check: 1 1 + 4 3 - 4 4 + 3 4 - 8 8 +
    Score: 3

    Got: 1 4 4 3 8                              (a meta-judgment)
    Expected: 1 3 4 4 8
    Check: 1 1 + 4 3 - 4 4 + 3 4 - 8 8 +
    Score: 3
    Distance: A 3 3 0, B 4 3 1. So 0 < 1.
    Winner: Judgment A

``Got`` restates the response's digits, ``Expected`` works the answer out, ``Check`` gives per
position the response's digit, the expected digit and a mark (``+`` right, ``-`` wrong or
missing, ``_`` standing for a missing digit) and one ``x`` per extra digit, so each mark
follows the two digits it compares; a faithful judgment's score is the count of ``+`` minus the
count of ``x``. A meta-judgment first judges the response itself (the same format, taught from
gold judgments), then states how far each judgment's score is from its own and names the closer
one: every step is a copy or a small lookup the tiny model can execute. ``Distance`` is written
like ``Check``: per judgment its score, the meta-judge's own score and their distance, so each
distance follows the two digits it is computed from. The gold winner is the
judgment whose score is closer to the gold grade.

Everything random here is drawn from :func:`rng_for`, a ``random.Random`` seeded by a SHA-256 of
its labels, so every generator is deterministic across runs, machines and Python versions.

The tokenizer (:func:`metajudge.testbed_tokenizer.build_tokenizer`) is a byte-level BPE learnt on the testbed's own text, with
each fixed stretch of the judge and meta-judge templates as one added token: the templates keep
their full wording while a judge prompt costs a few dozen tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from typing import Iterable, Optional, Sequence

from metajudge.prompts import DEFAULT_TEMPLATES, PromptTemplates, judge_prompt, meta_judge_prompt

LIST_LEN = 5
MAX_SCORE = 5
EVAL_MAX_WRONG = 3  # evaluation responses have 0..3 wrong digits: grades 5..2, like the actor's

#: op name -> the instruction's lead phrase.
OPS: dict[str, str] = {
    "sort": "Sort the list:",
    "reverse": "Reverse the list:",
    "increment": "Add one to each digit:",
    "rotate": "Move the first digit to the end:",
}

PREFIXES = ("Sure.", "Here is the answer:", "Of course, happy to help.", "Let me work through this carefully.")
SUFFIXES = ("Done.", "I hope this helps.", "Let me know if you need anything else.", "I checked every position twice.")

_INSTRUCTION = re.compile(r"^\s*(?P<lead>.+?:)\s*(?P<digits>(?:\d\s*)+)$")
_DIGIT = re.compile(r"\d")


# ------------------------------------------------------------------------------- randomness


def rng_for(*labels: object) -> random.Random:
    """A ``random.Random`` determined by ``labels`` alone (SHA-256 of their text)."""
    digest = hashlib.sha256("\x1f".join(str(x) for x in labels).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ---------------------------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class Problem:
    """One instruction: ``op`` applied to ``digits`` (``LIST_LEN`` digits 0..9)."""

    op: str
    digits: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; known: {', '.join(OPS)}")
        if len(self.digits) != LIST_LEN or not all(0 <= d <= 9 for d in self.digits):
            raise ValueError(f"digits must be {LIST_LEN} values in 0..9, got {self.digits}")

    @property
    def instruction(self) -> str:
        """``"Sort the list: 3 8 1 4 4"``."""
        return f"{OPS[self.op]} {_digits_text(self.digits)}"

    @property
    def answer(self) -> tuple[int, ...]:
        """The right answer's digits."""
        d = list(self.digits)
        if self.op == "sort":
            return tuple(sorted(d))
        if self.op == "reverse":
            return tuple(reversed(d))
        if self.op == "increment":
            return tuple((x + 1) % 10 for x in d)
        return tuple(d[1:] + d[:1])  # rotate


def _digits_text(digits: Iterable[int]) -> str:
    return " ".join(str(d) for d in digits)


def parse_instruction(text: str) -> Optional[Problem]:
    """The :class:`Problem` an instruction states, or None if it is not a testbed instruction."""
    m = _INSTRUCTION.match(text)
    if m is None:
        return None
    op = next((name for name, lead in OPS.items() if lead == m.group("lead")), None)
    digits = tuple(int(c) for c in _DIGIT.findall(m.group("digits")))
    if op is None or len(digits) != LIST_LEN:
        return None
    return Problem(op, digits)


def make_problems(n: int, *labels: object) -> list[Problem]:
    """``n`` distinct problems, ops in turn, digits drawn by :func:`rng_for(*labels)`."""
    rng = rng_for("problems", *labels)
    ops = list(OPS)
    seen: set[Problem] = set()
    out: list[Problem] = []
    if n > len(ops) * 10**LIST_LEN:
        raise ValueError(f"at most {len(ops) * 10 ** LIST_LEN} distinct problems exist, asked for {n}")
    while len(out) < n:
        p = Problem(ops[len(out) % len(ops)], tuple(rng.randrange(10) for _ in range(LIST_LEN)))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def problem_split(sizes: Sequence[int], seed: int) -> list[list[Problem]]:
    """Disjoint lists of distinct problems of the given sizes for one seed (e.g. SFT, loop prompts,
    evaluation: an evaluation problem is never trained on)."""
    pool = make_problems(sum(sizes), "split", seed)
    rng_for("split-order", seed).shuffle(pool)
    out, at = [], 0
    for n in sizes:
        out.append(pool[at:at + n])
        at += n
    return out


# ----------------------------------------------------------------------------------- grading


@dataclasses.dataclass(frozen=True)
class Grade:
    """The gold verdict on one response.

    ``marks``: one of ``+``/``-`` per position, then one ``x`` per extra digit; ``quality`` =
    ``count(+) - count(x)`` floored at 0 (0..5); ``exact``: the digits are exactly the answer;
    ``filler``: the response has text besides its digits.
    """

    quality: int
    marks: tuple[str, ...]
    exact: bool
    filler: bool


def extract_digits(response: str) -> tuple[int, ...]:
    """The response's digits in order (filler never contains one)."""
    return tuple(int(c) for c in _DIGIT.findall(response))


def check_marks(expected: Sequence[int], got: Sequence[int]) -> tuple[str, ...]:
    """Position marks of ``got`` against ``expected``: ``+``, ``-`` per position, ``x`` per extra."""
    marks = ["+" if i < len(got) and got[i] == e else "-" for i, e in enumerate(expected)]
    return tuple(marks + ["x"] * max(0, len(got) - len(expected)))


def marks_score(marks: Sequence[str]) -> int:
    """``count(+) - count(x)``, floored at 0."""
    return max(0, sum(m == "+" for m in marks) - sum(m == "x" for m in marks))


def has_filler(response: str) -> bool:
    """Whether the response holds anything besides digits and whitespace."""
    return bool(re.sub(r"[\d\s]", "", response))


def grade_problem(problem: Problem, response: str) -> Grade:
    """Gold grade of ``response`` to ``problem``."""
    got = extract_digits(response)
    marks = check_marks(problem.answer, got)
    return Grade(marks_score(marks), marks, got == problem.answer, has_filler(response))


def grade(instruction: str, response: str) -> Grade:
    """Gold grade of ``response`` to a testbed ``instruction`` (ValueError for any other text)."""
    problem = parse_instruction(instruction)
    if problem is None:
        raise ValueError(f"not a testbed instruction: {instruction!r}")
    return grade_problem(problem, response)


# --------------------------------------------------------------------------------- responses


def corrupt(digits: Sequence[int], n_wrong: int, rng: random.Random) -> tuple[int, ...]:
    """``digits`` with ``n_wrong`` distinct positions replaced by a different digit."""
    out = list(digits)
    for i in rng.sample(range(len(out)), min(n_wrong, len(out))):
        out[i] = (out[i] + rng.randrange(1, 10)) % 10
    return tuple(out)


def render_response(digits: Sequence[int], prefixes: Sequence[str] = (), suffixes: Sequence[str] = ()) -> str:
    """``"Sure. 1 3 4 4 8 Done."``: filler sentences around the space-separated digits."""
    return " ".join([*prefixes, _digits_text(digits), *suffixes])


def sample_response(problem: Problem, rng: random.Random, *, error_rate: float, filler_weights: Sequence[float]) -> str:
    """One response: each digit wrong with probability ``error_rate``; ``filler_weights[k]`` is the
    probability of ``k`` prefix sentences (and, drawn independently, of ``k`` suffix sentences)."""
    n_wrong = sum(rng.random() < error_rate for _ in range(LIST_LEN))
    digits = corrupt(problem.answer, n_wrong, rng)
    n_pre = rng.choices(range(len(filler_weights)), weights=filler_weights)[0]
    n_suf = rng.choices(range(len(filler_weights)), weights=filler_weights)[0]
    pre = rng.sample(PREFIXES, min(n_pre, len(PREFIXES)))
    suf = rng.sample(SUFFIXES, min(n_suf, len(SUFFIXES)))
    return render_response(digits, pre, suf)


# --------------------------------------------------------------------------------- judgments


@dataclasses.dataclass(frozen=True)
class JudgeNoise:
    """How the seed's judge-training judgments depart from the gold judgment.

    ``expected_error``: probability that the ``Expected`` line has one wrong digit (marks and
    score follow it: a consistent but wrong judgment). ``score_error``: probability that the final
    score is moved by 1 or 2 points away from what the marks give (an inconsistent judgment).
    ``length_bias``: probability that a response with filler gets one point more (the judge
    rewards length). The meta-judge's training verdicts are flipped with probability ``meta_flip``.
    """

    expected_error: float = 0.4
    score_error: float = 0.5
    length_bias: float = 1.0
    meta_flip: float = 0.02

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"JudgeNoise.{f.name} must be in [0, 1], got {v}")


@dataclasses.dataclass(frozen=True)
class Judgment:
    """A judgment's text and what it says: its expected answer, marks and final score."""

    text: str
    expected: tuple[int, ...]
    marks: tuple[str, ...]
    score: int


def check_text(got: Sequence[int], expected: Sequence[int], marks: Sequence[str]) -> str:
    """``"1 1 + 4 3 - ..."``: per position the response's digit, the expected one (``_`` where
    there is none) and the mark, so every mark sits right after the two digits it compares."""
    parts = []
    for i, mark in enumerate(marks):
        g = str(got[i]) if i < len(got) else "_"
        e = str(expected[i]) if i < len(expected) else "_"
        parts.append(f"{g} {e} {mark}")
    return " ".join(parts)


def render_judgment(got: Sequence[int], expected: Sequence[int], marks: Sequence[str], score: int) -> str:
    """``"Got: ...\\nExpected: ...\\nCheck: ...\\nScore: k"`` (``Got: none`` for no digit)."""
    got_text = _digits_text(got) if got else "none"
    return (f"Got: {got_text}\nExpected: {_digits_text(expected)}\nCheck: {check_text(got, expected, marks)}\n"
            f"Score: {score}")


def gold_judgment(problem: Problem, response: str) -> Judgment:
    """The noiseless judgment; its score is the gold grade."""
    got = extract_digits(response)
    marks = check_marks(problem.answer, got)
    score = marks_score(marks)
    return Judgment(render_judgment(got, problem.answer, marks, score), problem.answer, marks, score)


def noisy_judgment(problem: Problem, response: str, noise: JudgeNoise, rng: random.Random) -> Judgment:
    """A judgment as the seed judge is taught to write them (see :class:`JudgeNoise`)."""
    expected = problem.answer
    if rng.random() < noise.expected_error:
        expected = corrupt(expected, 1, rng)
    got = extract_digits(response)
    marks = check_marks(expected, got)
    score = marks_score(marks)
    if rng.random() < noise.score_error:
        moves = [d for d in (-2, -1, 1, 2) if 0 <= score + d <= MAX_SCORE]
        score += rng.choice(moves)
    if has_filler(response) and score < MAX_SCORE and rng.random() < noise.length_bias:
        score += 1
    return Judgment(render_judgment(got, expected, marks, score), expected, marks, score)


def judgment_summary(text: str) -> Optional[tuple[int, int]]:
    """``(count(+) - count(x) of its Check line, its Score)`` for a testbed judgment, else None."""
    check = re.search(r"^Check:(?P<m>[ +\-x_\d]*)$", text, re.MULTILINE)
    score = re.search(r"^Score: (?P<k>\d)\s*$", text, re.MULTILINE)
    if check is None or score is None:
        return None
    return marks_score([m for m in check.group("m").split() if m in ("+", "-", "x")]), int(score.group("k"))


def render_meta_judgment(own: Judgment, a: Judgment, b: Judgment, winner: str) -> str:
    """The meta-judge's own judgment of the response, then how far each judgment's score is from
    its own, then the winner::

        Got: 1 4 4 3 8
        Expected: 1 3 4 4 8
        Check: 1 1 + 4 3 - 4 4 + 3 4 - 8 8 +
        Score: 3
        Distance: A 3 3 0, B 4 3 1. So 0 < 1.
        Winner: Judgment A

    Each step reads tokens just written: a distance is that of the two digits right before it (the
    judgment's score, then its own), as a ``Check`` mark follows the two digits it compares; the
    comparison copies the two distances side by side, the winner follows the sign.
    """
    off_a, off_b = abs(a.score - own.score), abs(b.score - own.score)
    cmp = "<" if off_a < off_b else (">" if off_a > off_b else "=")
    return (f"{own.text}\nDistance: A {a.score} {own.score} {off_a}, B {b.score} {own.score} {off_b}. "
            f"So {off_a} {cmp} {off_b}.\nWinner: Judgment {winner}")


def gold_winner(gold_score: int, score_a: float, score_b: float) -> Optional[str]:
    """``"A"`` or ``"B"``: the judgment whose score is closer to gold; None for a tie."""
    da, db = abs(score_a - gold_score), abs(score_b - gold_score)
    return None if da == db else ("A" if da < db else "B")


# ------------------------------------------------------------------------------- the data set


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Sizes and mixtures of the seed's SFT data and of the evaluation sets.

    ``ift_error_rates``: each IFT answer draws one of these per-digit error rates (answers of
    mixed quality); ``filler_weights``: probabilities of 0, 1, 2 filler sentences before (and,
    independently, after) the digits. EFT responses use ``eft_error_rates`` so every grade
    appears.
    """

    n_train_problems: int = 3000  # the SFT data's instructions
    n_loop_problems: int = 1000  # the loop's prompts (never in the SFT data)
    n_eval_problems: int = 48  # gold evaluation only
    n_ift: int = 3000
    n_eft: int = 4000
    n_meta: int = 4000
    ift_error_rates: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5)
    eft_error_rates: tuple[float, ...] = (0.0, 0.15, 0.3, 0.5, 0.8)
    filler_weights: tuple[float, ...] = (0.5, 0.3, 0.2)
    noise: JudgeNoise = JudgeNoise()
    eval_judge_problems: int = 48  # the first ones of the evaluation problems
    eval_responses_per_problem: int = 4
    eval_meta_pairs: int = 96

    def problems(self, seed: int) -> tuple[list[Problem], list[Problem], list[Problem]]:
        """``(sft, loop, eval)`` problems of one seed, pairwise disjoint."""
        sft, loop, ev = problem_split((self.n_train_problems, self.n_loop_problems, self.n_eval_problems), seed)
        return sft, loop, ev


def sft_records(cfg: DataConfig, seed: int, problems: Sequence[Problem], templates: PromptTemplates = DEFAULT_TEMPLATES) -> list[dict]:
    """IFT, EFT and meta-judge SFT records ``{"messages": [...], "kind": ...}``, shuffled."""
    rng = rng_for("sft", seed)
    recs: list[dict] = []

    def chat(user: str, assistant: str, kind: str) -> dict:
        return {"kind": kind, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}

    for i in range(cfg.n_ift):
        p = problems[i % len(problems)]
        resp = sample_response(p, rng, error_rate=rng.choice(cfg.ift_error_rates), filler_weights=cfg.filler_weights)
        recs.append(chat(p.instruction, resp, "ift"))
    for i in range(cfg.n_eft):
        p = problems[rng.randrange(len(problems))]
        resp = sample_response(p, rng, error_rate=rng.choice(cfg.eft_error_rates), filler_weights=cfg.filler_weights)
        recs.append(chat(judge_prompt(p.instruction, resp, templates), noisy_judgment(p, resp, cfg.noise, rng).text, "eft"))
    for item in meta_items(cfg, rng, problems, cfg.n_meta):
        winner = item["winner"]
        if rng.random() < cfg.noise.meta_flip:
            winner = "B" if winner == "A" else "A"
        text = render_meta_judgment(item["own"], item["a"], item["b"], winner)
        recs.append(chat(meta_judge_prompt(item["instruction"], item["response"], item["a"].text, item["b"].text, templates),
                         text, "meta"))
    rng.shuffle(recs)
    return recs


def meta_items(cfg: DataConfig, rng: random.Random, problems: Sequence[Problem], n: int) -> list[dict]:
    """``n`` (instruction, response, judgment A, judgment B, gold winner, the gold judgment ``own``)
    with no tie.

    Both judgments are noisy judgments of the same response (noise doubled so they differ often)."""
    noise = dataclasses.replace(cfg.noise, expected_error=min(1.0, 2 * cfg.noise.expected_error),
                                score_error=min(1.0, 2 * cfg.noise.score_error))
    out: list[dict] = []
    while len(out) < n:
        p = problems[rng.randrange(len(problems))]
        resp = sample_response(p, rng, error_rate=rng.choice(cfg.eft_error_rates), filler_weights=cfg.filler_weights)
        a, b = noisy_judgment(p, resp, noise, rng), noisy_judgment(p, resp, noise, rng)
        gold = grade_problem(p, resp).quality
        winner = gold_winner(gold, a.score, b.score)
        if winner is not None:
            out.append({"instruction": p.instruction, "response": resp, "a": a, "b": b, "winner": winner, "gold": gold,
                        "own": gold_judgment(p, resp)})
    return out


def eval_sets(cfg: DataConfig, seed: int, problems: Sequence[Problem]) -> dict[str, list[dict]]:
    """The fixed gold evaluation sets of one seed (on evaluation problems only).

    ``judge``: ``eval_responses_per_problem`` responses per problem with distinct numbers (0 to
    ``EVAL_MAX_WRONG``) of wrong digits, so neighbouring grades, the pairs a judge finds hard, abound; each ``{"group", "instruction", "response", "gold", "filler"}``; ``meta``: judgment
    pairs ``{"instruction", "response", "a", "b", "winner"}`` (judgment texts).
    """
    rng = rng_for("eval", seed)
    judge_items: list[dict] = []
    for g, p in enumerate(problems[: cfg.eval_judge_problems]):
        wrong = rng.sample(range(EVAL_MAX_WRONG + 1), min(cfg.eval_responses_per_problem, EVAL_MAX_WRONG + 1))
        for n_wrong in wrong:
            digits = corrupt(p.answer, n_wrong, rng)
            k = rng.choices(range(len(cfg.filler_weights)), weights=cfg.filler_weights)[0]
            resp = render_response(digits, rng.sample(PREFIXES, k), rng.sample(SUFFIXES, rng.randrange(k + 1)))
            gr = grade_problem(p, resp)
            judge_items.append({"group": g, "instruction": p.instruction, "response": resp, "gold": gr.quality,
                                "filler": gr.filler})
    meta = [{"instruction": m["instruction"], "response": m["response"], "a": m["a"].text, "b": m["b"].text,
             "winner": m["winner"], "gold": m["gold"]}
            for m in meta_items(cfg, rng, problems, cfg.eval_meta_pairs)]
    return {"judge": judge_items, "meta": meta}


def prompt_records(problems: Sequence[Problem]) -> list[dict]:
    """The loop's prompt records (``metajudge.prompt_sources`` format)."""
    return [{"id": f"{p.op}-{''.join(map(str, p.digits))}", "prompt": p.instruction, "category": p.op} for p in problems]

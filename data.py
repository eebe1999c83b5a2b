"""data.py -- problems, prompts and answer grading.

Implements, for "Why Does Self-Distillation (Sometimes) Degrade the Reasoning Capability of LLMs?"
(arXiv 2603.24472):
  - the paper's prompt (Sec. 3 "Prompts", App. D): `{question}\\nPlease reason step by step, and put
    your final answer within \\boxed{}.` -> `format_prompt`
  - DAPO-Math-17k's "Answer: $Answer" prompt rewritten into that boxed prompt (App. D), keeping the ~100 copies of
    every prompt as the released pipeline does (`dedup=True` drops them) -> `load_problems("dapo.parquet")`
  - Sec. 3's selection rule (1 to 4 correct of 8 rollouts) is applied where the rollouts are drawn: `evaluate.select`
  - the task-coverage subsets |D| in {1, 8, 64, 128, 512} of Sec. 6.2 -> `coverage_subset`
  - the reward (App. D): last \\boxed{} of the response, exact match, then math-verify, 5 s bound
    -> `grade`
  - offline problem sources for machines with no hub: `"synthetic"` (a seeded generator with worked
    solutions, 10 training types + 5 held-out OOD types, a difficulty knob) and `"champ"` (the 270
    problems of the champ-dataset wheel).
  - the paper's models are R1-Distill models, distilled from a reasoning model's traces. `synthetic:style=think`
    writes such traces at CPU scale (`think_trace`): `<think>` reasoning `</think>` then a boxed answer sentence,
    with hesitation, optional checks and corrected slips in the paper's markers; `sft.py` on them turns the
    embedded model into a small thinking model (README, "A reasoning model in miniature").

Where this departs from the paper's released reward (beanie00/self-distillation-analysis,
`verl/utils/reward_score/feedback/math.py`; lasgroup/SDPO's later version also normalises, deleting every comma)
and why:
  1. The released reward looks for `\\boxed{` only in the last 100 characters of the response: the trainers do the
     same (`grade(..., window=100)`, --reward-window); evaluation and the Sec. 3 analyses search the whole response.
  2. The released exact match compares the raw boxed string with the answer (no comma is removed), then math-verify
     parses both; we normalise both first (spaces, $, \\left/\\right, \\dfrac, \\text{}, a trailing period,
     thousands separators "1,000" -> "1000"), which finds most equal answers without sympy, and also read
     `\\boxed 7` and `\\fbox{7}`, which the released reward scores 0.
  3. The reference's 5 s bound is SIGALRM, which only works in the main thread. Ours runs
     math-verify in a child process and kills it past the bound, so it holds in worker threads,
     under torchrun and in notebooks alike.
  4. Two plain numbers (ints, decimals, a/b, \\frac{a}{b}) are compared as exact fractions in-process
     before math-verify is asked: the same verdict, 20-50x faster.
  5. math-verify is called with its LaTeX extractor only. Its plain-expression extractor ends in
     sympy's `parse_expr`, which is `eval`; the LaTeX path is an ANTLR parser and executes nothing.

Run it:
    python data.py synthetic:difficulty=1 --limit 5          # print a few problems
    python data.py synthetic:style=think --limit 3           # reasoning traces as solutions
    python data.py benchmarks/aime24.parquet --limit 3
    python data.py --list-types
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import random
import re
import select
import subprocess
import sys
import threading
import zlib
import dataclasses
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
GRADE_TIMEOUT_S = 5.0  # App. D / reference: 5 s for the math-verify comparison


# The ranges a flag's value may take: `check(args, names, *POSITIVE)` in each Args class's __post_init__
POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
FRACTION = (lambda v: 0 < v <= 1, "in (0, 1]")
THINKING = ("on", "off", "auto")
BACKENDS = ("hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class Args:
    source: str = field(
        default="synthetic",
        metadata={"help": "path (.parquet/.jsonl/.json) or embedded name: synthetic[:key=value,...] or champ"},
    )
    limit: int = field(default=5, metadata={"help": "how many problems to print"})
    seed: int = field(default=0, metadata={"help": "seed for generation and shuffling"})
    list_types: bool = field(
        default=False, metadata={"help": "print the synthetic problem types (training and held-out OOD) and exit"}
    )

    def __post_init__(self):
        check(self, "limit", *NON_NEGATIVE)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
def format_prompt(question: str) -> str:
    """The paper's user prompt. Never appends the instruction twice."""
    q = question.rstrip()
    if q.endswith(PROMPT_SUFFIX):
        return q
    return f"{q}\n{PROMPT_SUFFIX}"


def strip_prompt_suffix(text: str) -> str:
    q = text.rstrip()
    if q.endswith(PROMPT_SUFFIX):
        q = q[: -len(PROMPT_SUFFIX)].rstrip()
    return q


_DAPO_HEAD = re.compile(
    r"^Solve the following math problem step by step\.\s*The last line of your response should be of the form "
    r"Answer: \$Answer \(without quotes\) where \$Answer is the answer to the problem\.\s*"
)
_DAPO_TAIL = re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")


def rewrite_dapo_prompt(text: str) -> tuple[str, bool]:
    """Strip DAPO-Math-17k's 'Answer: $Answer' instruction (App. D). Returns (question, was_dapo)."""
    head = _DAPO_HEAD.match(text)
    if not head:
        return text, False
    return _DAPO_TAIL.sub("", text[head.end() :]).strip(), True


# --------------------------------------------------------------------------------------------
# Synthetic problems: seeded, with worked solutions. Each generator takes (rng, difficulty) and
# returns (question, answer, solution). Difficulty d >= 1 sets operand sizes: at d = 1 every
# operand is a single digit (the embedded SmolLM2-135M solves single-digit addition ~29% of the
# time at temperature 1.0); each level adds a digit.
# --------------------------------------------------------------------------------------------
def _num(rng: random.Random, d: int, low: int = 1) -> int:
    return rng.randint(low, 10**d - 1)


def _boxed(steps: list[str], answer) -> str:
    return " ".join(steps) + f" The answer is \\boxed{{{answer}}}."


# Each generator returns (question, answer, solution, steps). `steps` is what a reasoning trace computes, in order:
# (plan, "a op b", value) with op in + - * / (plan: a sentence said before the step, or ""), or a plain sentence.
def _gen_add(rng, d):
    a, b = _num(rng, d), _num(rng, d)
    return (
        f"What is {a} + {b}?",
        a + b,
        _boxed([f"We add {a} and {b}: {a} + {b} = {a + b}."], a + b),
        [(f"I need to add {a} and {b}.", f"{a} + {b}", a + b)],
    )


def _gen_sub(rng, d):
    a, b = _num(rng, d), _num(rng, d)
    a, b = max(a, b), min(a, b)
    return (
        f"What is {a} - {b}?",
        a - b,
        _boxed([f"We subtract {b} from {a}: {a} - {b} = {a - b}."], a - b),
        [(f"I need to subtract {b} from {a}.", f"{a} - {b}", a - b)],
    )


def _gen_mul(rng, d):
    a, b = _num(rng, d), _num(rng, max(1, d - 1), low=2)
    return (
        f"What is {a} * {b}?",
        a * b,
        _boxed([f"We multiply {a} by {b}: {a} * {b} = {a * b}."], a * b),
        [(f"I need to multiply {a} by {b}.", f"{a} * {b}", a * b)],
    )


def _gen_div(rng, d):
    b, q = _num(rng, max(1, d - 1), low=2), _num(rng, d)
    a = b * q
    return (
        f"What is {a} divided by {b}?",
        q,
        _boxed([f"We need q with {b} * q = {a}.", f"Since {b} * {q} = {a}, q = {q}."], q),
        [(f"I need the number that gives {a} when multiplied by {b}.", f"{a} / {b}", q)],
    )


def _gen_mod(rng, d):
    a, b = _num(rng, d + 1), _num(rng, d, low=2)
    r = a % b
    return (
        f"What is the remainder when {a} is divided by {b}?",
        r,
        _boxed([f"{a} = {b} * {a // b} + {r}, and 0 <= {r} < {b}."], r),
        [
            (f"I need the largest multiple of {b} that is at most {a}.", f"{a // b} * {b}", a // b * b),
            ("Then I subtract it.", f"{a} - {a // b * b}", r),
        ],
    )


def _gen_linear(rng, d):
    a, x, b = _num(rng, max(1, d - 1), low=2), _num(rng, d), _num(rng, d)
    c = a * x + b
    return (
        f"Solve for x: {a}x + {b} = {c}.",
        x,
        _boxed([f"Subtract {b} from both sides: {a}x = {c - b}.", f"Divide by {a}: x = {x}."], x),
        [
            (f"First I subtract {b} from both sides.", f"{c} - {b}", c - b),
            (f"Then I divide by {a}.", f"{c - b} / {a}", x),
        ],
    )


def _gen_sequence(rng, d):
    start, step = _num(rng, d), _num(rng, d)
    terms = [start + i * step for i in range(4)]
    nxt = start + 4 * step
    return (
        f"What is the next term of the arithmetic sequence {', '.join(map(str, terms))}, ...?",
        nxt,
        _boxed([f"Each term adds {step}.", f"The next term is {terms[-1]} + {step} = {nxt}."], nxt),
        [
            ("The terms go up by the same amount.", f"{terms[1]} - {terms[0]}", step),
            ("The next term adds it to the last one.", f"{terms[-1]} + {step}", nxt),
        ],
    )


def _gen_percent(rng, d):
    p = rng.choice([10, 20, 25, 50, 75]) if d == 1 else rng.randint(1, 99)
    n = (20 if d == 1 else 100) * _num(rng, d)  # p * n / 100 is a whole number
    ans = p * n // 100
    return (
        f"What is {p}% of {n}?",
        ans,
        _boxed([f"{p}% of {n} is {p}/100 * {n} = {ans}."], ans),
        [(f"The percent means {p} out of 100.", f"{p} * {n}", p * n), ("", f"{p * n} / 100", ans)],
    )


def _gen_gcd(rng, d):
    g = _num(rng, max(1, d - 1), low=2)
    a, b = g * _num(rng, d), g * _num(rng, d)
    ans = math.gcd(a, b)
    return (
        f"What is the greatest common divisor of {a} and {b}?",
        ans,
        _boxed(
            [f"Both {a} and {b} are divisible by {ans}, and {a // ans} and {b // ans} share no common factor."], ans
        ),
        [
            (
                f"I need the largest number dividing both {a} and {b}. Both are divisible by {ans}.",
                f"{a} / {ans}",
                a // ans,
            ),
            ("", f"{b} / {ans}", b // ans),
            f"{a // ans} and {b // ans} share no common factor, so the greatest common divisor is {ans}.",
        ],
    )


def _gen_word(rng, d):
    name = rng.choice(["Tom", "Ana", "Li", "Sam", "Mia", "Omar"])
    item = rng.choice(["apples", "pencils", "stamps", "marbles", "books"])
    a, b = _num(rng, d), _num(rng, d)
    return (
        f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
        a + b,
        _boxed([f"{name} starts with {a} and gains {b}: {a} + {b} = {a + b}."], a + b),
        [(f"{name} starts with {a} {item} and gains {b}.", f"{a} + {b}", a + b)],
    )


# Held out for OOD evaluation: never used for training by default (Sec. 6: evaluation is on
# problem types unseen in training). Each asks a training type's skill in a form never trained: word_sub is the
# word problems' framing with subtraction, product multiplication named in words. A type the organism never solves
# ("a + b * c": 0 of 40) measures no cost; one it transfers to on every warm start (product: 0.66-0.83 of its 29 over
# three warm starts and two samplings; lcm 0.00-0.20, word_sub 0.17-0.47) keeps the held-out score off the floor.
def _gen_lcm(rng, d):
    a, b = _num(rng, d, low=2), _num(rng, d, low=2)
    g = math.gcd(a, b)
    ans = a * b // g
    return (
        f"What is the least common multiple of {a} and {b}?",
        ans,
        _boxed([f"gcd({a}, {b}) = {g}, so lcm = {a} * {b} / {g} = {ans}."], ans),
        [
            (
                f"The least common multiple is the product divided by the greatest common divisor, which is {g}.",
                f"{a} * {b}",
                a * b,
            ),
            ("", f"{a * b} / {g}", ans),
        ],
    )


def _gen_mean(rng, d):
    k = 3
    xs = [_num(rng, d) for _ in range(k - 1)]
    last = k * _num(rng, d) - sum(xs)
    while last <= 0:
        xs = [_num(rng, d) for _ in range(k - 1)]
        last = k * _num(rng, d) - sum(xs)
    xs.append(last)
    ans = sum(xs) // k
    return (
        f"What is the average of {', '.join(map(str, xs))}?",
        ans,
        _boxed([f"The sum is {sum(xs)}.", f"Dividing by {k} gives {ans}."], ans),
        [
            ("The average is the sum divided by 3.", f"{xs[0]} + {xs[1]}", xs[0] + xs[1]),
            ("", f"{xs[0] + xs[1]} + {xs[2]}", sum(xs)),
            ("Then I divide by 3.", f"{sum(xs)} / 3", ans),
        ],
    )


def _gen_product(rng, d):
    a, b = _num(rng, d, low=2), _num(rng, d, low=2)
    return (
        f"What is the product of {a} and {b}?",
        a * b,
        _boxed([f"The product is {a} * {b} = {a * b}."], a * b),
        [(f"The product of {a} and {b} is {a} times {b}.", f"{a} * {b}", a * b)],
    )


def _gen_word_sub(rng, d):
    name = rng.choice(["Tom", "Ana", "Li", "Sam", "Mia", "Omar"])
    item = rng.choice(["apples", "pencils", "stamps", "marbles", "books"])
    a, b = _num(rng, d), _num(rng, d)
    a, b = max(a, b), min(a, b)
    return (
        f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have now?",
        a - b,
        _boxed([f"{name} starts with {a} and gives away {b}: {a} - {b} = {a - b}."], a - b),
        [(f"{name} starts with {a} {item} and gives away {b}.", f"{a} - {b}", a - b)],
    )


def _gen_square(rng, d):
    a = _num(rng, d)
    return (
        f"What is {a} squared?",
        a * a,
        _boxed([f"{a} squared is {a} * {a} = {a * a}."], a * a),
        [(f"{a} squared is {a} times itself.", f"{a} * {a}", a * a)],
    )


# --------------------------------------------------------------------------------------------
# Reasoning traces (`synthetic:style=think`): the same problems, each solution written as R1-Distill writes,
# <think> reasoning </think> then a short answer sentence, with the paper's epistemic markers (epistemic.MARKERS)
# where R1 puts them: hesitation while planning ("Hmm, ..."), a verification after a result ("Wait, let me check:
# 7 - 4 = 3. Yes."), which a trace may make or skip, and a slip that the check catches and corrects.
# --------------------------------------------------------------------------------------------
def _inverse(expr: str, value: int) -> tuple[str, int, int]:
    """The check of "a op b = value": (the inverse equation, its result, what that result must equal: a)."""
    a, op, b = expr.split()
    a, b = int(a), int(b)
    undo = {"+": "-", "-": "+", "*": "/", "/": "*"}[op]
    result = {"-": value - b, "+": value + b, "/": value // b if b else None, "*": value * b}[undo]
    return f"{value} {undo} {b}", result, a


def _slip(rng: random.Random, expr: str, value: int) -> int:
    """A wrong result for "a op b" whose check still divides evenly: off by 1, 2 or 10 (+, -), by b (*), by 1 (/)."""
    op, b = expr.split()[1], int(expr.split()[2])
    delta = {"*": b, "/": 1}.get(op) or rng.choice([1, 2, 10])
    return value + delta if value - delta < 0 or rng.random() < 0.5 else value - delta


def think_trace(
    steps: list, answer, rng: random.Random, slip: bool, check: float, hesitate: float, plan: float = 1.0
) -> str:
    """One trace: each step says its plan with probability `plan` (a plain sentence counts as a plan); the trace
    opens with "Hmm," with probability `hesitate`; with `slip` the first computation is wrong, and its check catches
    and corrects it; every other result is checked with probability `check`."""
    parts, slipped = [], False
    last = None
    for step in steps:
        if isinstance(step, str):
            parts += [step] if plan >= 1 or rng.random() < plan else []
            continue
        say, expr, value = step
        say = "" if plan < 1 and rng.random() >= plan else say  # plan = 1 draws nothing: the traces of before
        if not parts and (say or plan < 1) and rng.random() < hesitate:
            say = (
                "Hmm, " + (say[0].lower() + say[1:] if say.split()[0] in ("The", "First") else say) if say else "Hmm,"
            )
        parts += [say] if say else []
        if slip and not slipped:
            slipped, wrong = True, _slip(rng, expr, value)
            inverse, result, want = _inverse(expr, wrong)
            parts.append(
                f"{expr} = {wrong}. Wait, let me check: {inverse} = {result}, not {want}. "
                f"I made a mistake: {expr} = {value}."
            )
        else:
            parts.append(f"{expr} = {value}.")
            if rng.random() < check:
                inverse, result, _ = _inverse(expr, value)
                parts.append(f"Wait, let me check: {inverse} = {result}. Yes.")
        last = (expr, value)
    head = f"Since {last[0]} = {answer}, the" if last and last[1] == answer else "The"
    return f"<think>\n{' '.join(parts)} So the answer is {answer}.\n</think>\n\n{head} answer is \\boxed{{{answer}}}."


TRAIN_TYPES = {
    "add": _gen_add,
    "sub": _gen_sub,
    "mul": _gen_mul,
    "div": _gen_div,
    "mod": _gen_mod,
    "linear": _gen_linear,
    "sequence": _gen_sequence,
    "percent": _gen_percent,
    "gcd": _gen_gcd,
    "word": _gen_word,
}
OOD_TYPES = dict(lcm=_gen_lcm, mean=_gen_mean, word_sub=_gen_word_sub, square=_gen_square, product=_gen_product)
ALL_TYPES = {**TRAIN_TYPES, **OOD_TYPES}


def synthetic_problems(
    n: int = 1000,
    seed: int = 0,
    difficulty: int | str = 1,
    types=None,
    split: str = "train",
    style: str = "plain",
    slip: float = 0.25,
    check: float = 0.6,
    hesitate: float = 0.5,
    plan: float = 1.0,
    part: str = "all",
) -> list[dict]:
    """n distinct generated problems, round-robin over the chosen types, deterministic by seed.

    split: "train" (the 10 training types), "ood" (the 5 held-out types), "all". `types` (a list
    or a '+'-joined string) overrides split. difficulty >= 1: number of digits per operand; '1+2': each level in turn
    (a block of every type at 1, then at 2, ...)
    style: "plain" (a worked solution) or "think" (the same problems with a reasoning trace as the solution,
    `think_trace`): problem i's first computation slips when floor((i + 1) * slip) > floor(i * slip), an exact share
    of every prefix; `check`, `hesitate` and `plan` are probabilities, drawn from a stream of the trace's own.
    part: "all", or "train" / "test", disjoint parts of every type's problems (a question is in "test" when the
    CRC-32 of its text is divisible by 4): train on one, evaluate on unseen problems of the same types on the other.
    """
    if types is None:
        types = {"train": list(TRAIN_TYPES), "ood": list(OOD_TYPES), "all": list(ALL_TYPES)}.get(split)
        if types is None:
            raise ValueError(f"synthetic: unknown split {split!r}; choose train, ood or all")
    elif isinstance(types, str):
        types = [t for t in types.split("+") if t]
    unknown = [t for t in types if t not in ALL_TYPES]
    if unknown or not types:
        raise ValueError(f"synthetic: unknown problem type(s) {unknown or types}; known: {', '.join(ALL_TYPES)}")
    try:
        levels, n = [int(d) for d in str(difficulty).split("+")], int(n)
    except ValueError:
        raise ValueError(
            f"synthetic: difficulty={difficulty!r} and n={n!r} must be whole numbers (levels: 1+2)"
        ) from None
    if min(levels) < 1 or n < 1:
        raise ValueError(f"synthetic: difficulty and n must be >= 1 (got difficulty={difficulty}, n={n})")
    difficulty = "+".join(map(str, levels))
    if part not in ("all", "train", "test"):
        raise ValueError(f"synthetic: unknown part {part!r}; choose all, train or test")
    if style not in ("plain", "think"):
        raise ValueError(f"synthetic: unknown style {style!r}; choose plain or think")
    slip, check, hesitate, plan = float(slip), float(check), float(hesitate), float(plan)
    for name, v in (("slip", slip), ("check", check), ("hesitate", hesitate), ("plan", plan)):
        if not 0 <= v <= 1:
            raise ValueError(f"synthetic: {name}={v} must be in [0, 1]")
    rng = random.Random(f"synthetic/{seed}/{difficulty}/{'+'.join(types)}")
    live = [(kind, level) for level in levels for kind in types]  # in turn: every type at a level, then the next
    seen, out, misses = set(), [], dict.fromkeys(live, 0)
    while len(out) < n:
        if not live:
            raise ValueError(
                f"synthetic: only {len(out)} distinct problems exist for types={types} difficulty={difficulty}"
                f"{'' if part == 'all' else ' part=' + part}; ask for fewer or raise the difficulty"
            )
        kind, level = slot = live[len(out) % len(live)]
        question, answer, solution, steps = ALL_TYPES[kind](rng, level)
        if question in seen or part != "all" and (zlib.crc32(question.encode()) % 4 == 0) != (part == "test"):
            misses[slot] += 1
            if misses[slot] > 200:  # this type's problem space is used up at this level
                live.remove(slot)
            continue
        misses[slot] = 0
        seen.add(question)
        if style == "think":
            i = len(out)
            solution = think_trace(
                steps,
                answer,
                random.Random(f"think/{seed}/{difficulty}/{i}/{question}"),
                slip=math.floor((i + 1) * slip) > math.floor(i * slip),
                check=check,
                hesitate=hesitate,
                plan=plan,
            )
        out.append(
            dict(
                id=f"synthetic-{kind}-{len(out)}",
                question=question,
                answer=str(answer),
                solution=solution,
                source="synthetic",
                type=kind,
                difficulty=level,
                split="ood" if kind in OOD_TYPES else "train",
            )
        )
    return out


def champ_problems() -> list[dict]:
    """The 270 CHAMP problems (champ-dataset wheel), with step-by-step solutions and categories."""
    import importlib.util

    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("source 'champ' needs the champ-dataset package: pip install champ-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_files" / "v0.json"
    raw = json.loads(path.read_text())["problems"]
    out = []
    for key in sorted(raw, key=lambda k: (raw[k]["category"], int(k.rsplit("_", 1)[1]))):
        p = raw[key]
        steps = [s["_text"] for s in p["solution"]["steps"]]
        out.append(
            dict(
                id=p["identifier"],
                question=p["_text"],
                answer=p["_answer"],
                solution=" ".join(steps) + f" The answer is \\boxed{{{p['_answer']}}}.",
                source="champ",
                type=p["category"],
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Files in the paper's verl/SDPO layout, plain rows, and raw DAPO-Math-17k
# --------------------------------------------------------------------------------------------
def _decode(value, where: str):
    """A cell may be a nested object, a JSON string, or a Python-literal string (single quotes)."""
    if not isinstance(value, str):
        return value
    s = value.strip()
    if not s or s[0] not in "[{":
        return value
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(s)  # literals only: never evaluates code
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"{where}: cannot decode {s[:60]!r} as JSON or a Python literal ({e})") from None


def read_jsonl(path) -> list[dict]:
    """The rows of a .jsonl file, blank lines skipped; a line that is not JSON is refused, naming the file and row."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: row {i}: not valid JSON ({e})") from None
    return rows


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(obj, dict):
            obj = obj.get("data", obj.get("problems", [obj]))
        if not isinstance(obj, list):
            raise ValueError(f"{path}: expected a list of rows")
        return obj
    raise ValueError(f"{path}: unknown file type {suffix!r}; use .parquet, .jsonl or .json")


def _row_to_problem(row, i: int, path: Path) -> dict:
    where = f"{path}: row {i}"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    extra = _decode(row.get("extra_info"), f"{where}, field 'extra_info'") or {}
    if not isinstance(extra, dict):
        extra = {}
    if "prompt" in row:  # verl / SDPO layout
        prompt = _decode(row["prompt"], f"{where}, field 'prompt'")
        if isinstance(prompt, list):
            users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
            if not users or not isinstance(users[-1].get("content"), str):
                raise ValueError(f"{where}, field 'prompt': no user message with text content")
            text = users[-1]["content"]
        elif isinstance(prompt, str):
            text = prompt
        else:
            raise ValueError(f"{where}, field 'prompt': expected a list of chat messages or a string")
        reward = _decode(row.get("reward_model"), f"{where}, field 'reward_model'")
        answer = reward.get("ground_truth") if isinstance(reward, dict) else None
        if answer is None:
            answer = row.get("answer")
        if answer is None:
            raise ValueError(f"{where}: missing answer (field 'reward_model.ground_truth' or 'answer')")
        question, _ = rewrite_dapo_prompt(text)
        question = strip_prompt_suffix(question)
        solution = extra.get("solution") or row.get("solution")
        pid = row.get("problem_id") or extra.get("index")
    else:  # plain rows
        question = row.get("question", row.get("problem"))
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: missing question (field 'question' or 'problem')")
        answer = row.get("answer")
        if answer is None:
            raise ValueError(f"{where}: missing answer (field 'answer')")
        question = strip_prompt_suffix(question)
        solution, pid = row.get("solution"), row.get("id")
    answer = str(answer).strip()
    if not answer:
        raise ValueError(f"{where}: empty answer")
    return dict(
        id=f"{path.stem}-{i}",
        question=question,
        answer=answer,
        solution=solution if isinstance(solution, str) and solution.strip() else None,
        source=str(path),
        problem_id=None if pid is None else str(pid),
        data_source=row.get("data_source"),
    )


def load_file(path, dedup: bool = False) -> list[dict]:
    """Problems from a .parquet/.jsonl/.json file, every row (raw DAPO-Math-17k prompts rewritten); dedup: the
    first row of each question only."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: the file holds no rows")
    problems = [_row_to_problem(row, i, path) for i, row in enumerate(rows)]
    if not dedup:
        return problems
    first = {}
    for p in problems:
        first.setdefault(p["question"], p)
    return list(first.values())


def _parse_source(source: str) -> tuple[str, dict]:
    """'synthetic:difficulty=2,types=add+mul,n=64' -> ('synthetic', {...})."""
    name, _, spec = source.partition(":")
    options = {}
    for part in filter(None, spec.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"source {source!r}: expected key=value, got {part!r}")
        options[key.strip().replace("-", "_")] = value.strip()
    return name, options


def load_problems(source: str, limit: int | None = None, seed: int = 0, dedup: bool = False, **options) -> list[dict]:
    """Problems as dicts with id, question (without the instruction), answer, solution (or None), source.

    source: a .parquet/.jsonl/.json path (verl/SDPO layout, plain {question|problem, answer, solution?}
    rows, or raw DAPO-Math-17k), or an embedded name with options after a colon:
      synthetic[:n=1000,difficulty=1,split=train|ood|all,types=add+sub+...,style=plain|think,
                 slip=0.25,check=0.6,hesitate=0.5,plan=1,part=all|train|test,seed=K]  (difficulty=1+2: in turn)
      champ[:category=Combinatorics]
    limit: keep the first `limit` problems (files and champ keep their order; synthetic is generated
    in order). seed: synthetic generation seed. dedup: a file's first row of each question only (DAPO-Math-17k
    repeats each ~100 times; the released pipeline keeps them).
    """
    if os.path.splitext(source)[1].lower() in (".parquet", ".jsonl", ".json"):
        problems = load_file(source, dedup)
    else:
        name, spec_options = _parse_source(source)
        spec_options.update(options)
        if name == "synthetic":
            allowed = set(inspect.signature(synthetic_problems).parameters)
            if set(spec_options) - allowed:
                raise ValueError(
                    f"source {source!r}: unknown option(s) {sorted(set(spec_options) - allowed)}; "
                    f"synthetic takes {sorted(allowed)}"
                )
            if limit is not None and "n" not in spec_options:
                spec_options["n"] = limit
            seed = int(spec_options.pop("seed", seed))  # seed=K in the source: the same problems under any --seed
            problems = synthetic_problems(seed=seed, **spec_options)
        elif name == "champ":
            problems = champ_problems()
            if "category" in spec_options:
                problems = [p for p in problems if p["type"] == spec_options["category"]]
        else:
            raise ValueError(
                f"unknown source {source!r}: give a .parquet/.jsonl/.json path, 'synthetic[:options]' or 'champ'"
            )
    return problems if limit is None else problems[:limit]


# --------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------
def coverage_subset(problems: list[dict], size: int, seed: int = 0) -> list[dict]:
    """Sec. 6.2: `size` distinct questions (|D| in {1, 8, 64, 128, 512}), chosen by seed."""
    unique = list({p["question"]: p for p in problems}.values())
    if size > len(unique):
        raise ValueError(f"coverage subset of {size} asked from {len(unique)} distinct problems")
    return random.Random(seed).sample(unique, size)


# --------------------------------------------------------------------------------------------
# Grading (App. D): last \boxed{}, exact match, then math-verify under a hard time bound
# --------------------------------------------------------------------------------------------
_BOX = re.compile(r"\\(?:boxed|fbox)\b")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (nested braces), or of `\\boxed 5`; None if none."""
    for m in reversed(list(_BOX.finditer(text))):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1 : j]
            continue  # unbalanced: try an earlier box
        if i > m.end():  # "\boxed 5": up to the next space or $
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group(0)
    return None


def normalize_answer(ans: str) -> str:
    s = ans.strip().strip("$").strip()
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+", "", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d*)?", s):  # a number with thousands separators, not a tuple
        s = s.replace(",", "")
    return s.rstrip(".")


_NUMBER = re.compile(r"(-?)(?:(\d+(?:\.\d*)?|\.\d+)|\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(-?\d+))")


def as_number(ans: str) -> Fraction | None:
    """A normalized answer that is plainly a number (int, decimal, a/b, \\frac{a}{b}) as an exact Fraction."""
    m = _NUMBER.fullmatch(ans)
    if not m:
        return None
    sign, dec, fn, fd, sn, sd = m.groups()
    num, den = (fn, fd) if fn is not None else (sn, sd) if sn is not None else (dec, "1")
    if int(den) == 0:
        return None
    value = Fraction(num) / Fraction(den)
    return -value if sign else value


_WORKER_CODE = r"""
import json, logging, sys
logging.disable(logging.WARNING)
from math_verify import parse, verify, LatexExtractionConfig
cfg = [LatexExtractionConfig(boxed_match_priority=0)]
for line in sys.stdin:
    req = json.loads(line)
    try:
        gold = parse("\\boxed{" + req["gold"] + "}", extraction_config=cfg, parsing_timeout=None)
        pred = parse("\\boxed{" + req["pred"] + "}", extraction_config=cfg, parsing_timeout=None)
        ok = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
    except Exception:
        ok = False
    sys.stdout.write("1\n" if ok else "0\n")
    sys.stdout.flush()
"""


class _VerifyWorker:
    """A math-verify child process, started on first use; killed and restarted when it overruns."""

    def __init__(self):
        self.proc = None
        self.lock = threading.Lock()

    def _ask(self, pred: str, gold: str, timeout: float) -> bool | None:
        """Send one comparison; None when the child overran `timeout` or died (it is then killed)."""
        self.proc.stdin.write(json.dumps({"pred": pred, "gold": gold}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return None
        return line.strip() == "1"

    def equivalent(self, pred: str, gold: str, timeout: float) -> bool:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                env = dict(os.environ, OMP_NUM_THREADS="1")
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", _WORKER_CODE],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    env=env,
                    text=True,
                    bufsize=1,
                )
                # start-up (importing sympy) is not counted against the bound of the real question
                if self._ask("1", "1", 60.0) is None:
                    return False
            return bool(self._ask(pred, gold, timeout))


_worker = _VerifyWorker()


def last_number(text: str) -> str | None:
    m = re.findall(r"-?\d+(?:\.\d+)?(?:/\d+)?", text.replace(",", ""))
    return m[-1] if m else None


def answer_part(response: str) -> str:
    """What is graded: with a <think>...</think> pair in the response, the text after the first one (stripped);
    otherwise all of it. As the reference's eval/eval.py, which does so with --enable_thinking; R1-Distill's
    responses, whose template opens the tag, carry no pair and are graded whole there and here."""
    pair = re.search(r"<think>(.*?)</think>", response, flags=re.S)
    return response[pair.end() :].strip() if pair else response


def grade(
    response: str, answer: str, timeout: float = GRADE_TIMEOUT_S, lenient: bool = False, window: int = 0
) -> float:
    """1.0 if the last \\boxed{} of `response` equals `answer` (exact, then math-verify), else 0.0.

    Never raises; never waits much longer than `timeout` seconds for math-verify; never executes
    anything from the response (the comparison runs in a child process on an ANTLR LaTeX parser).
    lenient: a response with no \\boxed{} is graded on its last number instead. NOT the paper's
    reward: an opt-in for the embedded 135M model, which rarely boxes (see README).
    window > 0: only the last `window` characters are searched, as the released training reward does with 100
    (verl/utils/reward_score/feedback/math.py): a box that starts earlier is not seen; 0: the whole response."""
    try:
        if window > 0:
            response = response[-window:]
        pred = last_boxed(response)
        if pred is None and lenient:
            pred = last_number(response)
        if pred is None or not pred.strip():
            return 0.0
        pred_n, gold_n = normalize_answer(pred), normalize_answer(str(answer))
        if pred_n == gold_n:
            return 1.0
        pred_v, gold_v = as_number(pred_n), as_number(gold_n)
        if pred_v is not None and gold_v is not None:  # both plain numbers: exact, no need for sympy
            return 1.0 if pred_v == gold_v else 0.0
        if len(pred) > 1000:  # no real answer is this long; spare math-verify
            return 0.0
        return 1.0 if _worker.equivalent(pred, str(answer), timeout) else 0.0
    except Exception:
        return 0.0


# --------------------------------------------------------------------------------------------
def main(args: Args):
    if args.list_types:
        print("training types:", ", ".join(TRAIN_TYPES))
        print("held-out OOD types:", ", ".join(OOD_TYPES))
        return
    problems = load_problems(args.source, seed=args.seed)
    print(f"{len(problems)} problems from {args.source}")
    for p in problems[: args.limit]:
        print(json.dumps({k: p[k] for k in ("id", "question", "answer", "solution") if k in p}, ensure_ascii=False))


# --------------------------------------------------------------------------------------------
# Command line: a dataclass's fields as flags (transformers.HfArgumentParser), checked in its __post_init__
# --------------------------------------------------------------------------------------------
def benchmark_name(source: str) -> str:
    """A benchmark's name in metrics and reports: a file's stem, or the embedded source as written."""
    return Path(source).stem if os.path.splitext(source)[1] else source


def check(args, names: str, ok, what: str) -> None:
    """Refuse each field of `names` (space-separated) whose value fails `ok` (a list: any of its items) with a
    ValueError that names its flag. An optional field left None passes."""
    for name in names.split():
        value = getattr(args, name)
        if value is not None and not all(ok(v) for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"--{name.replace('_', '-')} {value!r}: must be {what}")


def choose(args, name: str, choices: tuple) -> None:
    """Refuse a value of field `name` outside `choices`, naming its flag."""
    if getattr(args, name) not in choices:
        raise ValueError(
            f"--{name.replace('_', '-')} {getattr(args, name)!r}: choose one of {', '.join(map(str, choices))}"
        )


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: each flag's default, and the module's docstring as written."""


def parse_args(cls, argv=None, positional: str | None = None):
    """The flags of a dataclass, by transformers.HfArgumentParser: --a-field (or --a_field) per field, its help the
    field's metadata, --no-X for a boolean that defaults on. The class's __post_init__ checks the values; a bad one
    exits 2 with the usage line. `positional`: a field that may also be given without its flag."""
    from transformers import HfArgumentParser

    doc = (sys.modules[cls.__module__].__doc__ or "").split("\n")
    parser = HfArgumentParser(cls, description=doc[0], epilog="\n".join(doc[1:]), formatter_class=_Help)
    if positional:
        parser.add_argument("given", nargs="?", metavar=positional.upper(), help=f"the same as --{positional}")
    try:
        args, *given = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
        if given and given[0].given is not None:
            args = dataclasses.replace(args, **{positional: given[0].given})
    except ValueError as e:
        parser.error(str(e))  # exit 2
    return args


if __name__ == "__main__":
    main(parse_args(Args, positional="source"))

"""Tests for the whole project: `python -m pytest -q test_all.py`.

Unit tests pin the math against values computed independently (by hand, by brute force, by a
second formula); smoke tests run the scripts as a user would. The paper's benchmark files ship in
benchmarks/.
"""

import copy
import dataclasses
import functools
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import zlib
import threading
import time
from pathlib import Path

import pytest

import data
import epistemic
import fast

ROOT = Path(__file__).resolve().parent
BENCHMARKS = ROOT / "benchmarks"


def run(*cmd, timeout=600, env=None):
    """Run a command from the repo root; fail with its output if it fails."""
    p = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert p.returncode == 0, (
        f"{cmd} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}"
    )
    return p.stdout


def _jsonl(path) -> list[dict]:
    """The rows of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# The tests' sampler, for the digit model's runs: each draw is one of the tokens holding at least 1e-3 of the
# probability (the digit model's "1", " Wait" and EOS, ~0.3 each against ~1e-7 for the rest), chosen uniformly by the
# row's own random.Random stream (Python's Mersenne Twister, the same on every machine). No float rounding moves a
# token across that threshold, so every CPU samples the same responses, and the groups, rewards and contexts the
# tests build on are theirs by construction. The recorded log-prob is still the model's (`sampling_logprobs`).
# Only for the digit model: a random tiny model has no such token, and its runs sample as the model does.
FORCED_DRAW = """
def forced_draw(logp, gen):
    picks = []
    for row, g in zip(logp, gen):
        candidates = (row > math.log(1e-3)).nonzero()[:, 0].tolist()
        picks.append(candidates[int(g.random() * len(candidates))])
    return torch.tensor(picks, device=logp.device)
"""
_namespace = {"math": math, "torch": __import__("torch")}
exec(FORCED_DRAW, _namespace)
forced_draw = _namespace["forced_draw"]


# ============================================================================================
# data.py: grading
# ============================================================================================
GRADE_CASES = [
    # equivalent forms
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0),
    ("\\boxed{\\tfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{-5}", "-5.0", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{10\\%}", "10", 1.0),
    ("\\boxed{2\\pi}", "2 \\pi", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{a+b}", "b+a", 1.0),
    ("\\boxed{x=3}", "3", 1.0),
    ("\\boxed{ 42 }", "42", 1.0),
    ("$\\boxed{42}$.", "42", 1.0),
    # text and units
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("\\boxed{5\\text{cm}}", "5", 1.0),
    ("\\boxed{50^\\circ}", "50", 1.0),
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    ("\\boxed{\\text{Monday}}", "\\text{Monday}", 1.0),
    # intervals, tuples, sets
    ("\\boxed{[0,1)}", "[0,1)", 1.0),
    ("\\boxed{(0,1]}", "[0,1)", 0.0),
    ("\\boxed{(-\\infty, 2]}", "(-\\infty,2]", 1.0),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{(162, 163)}", "(162,163)", 1.0),
    ("\\boxed{(162,163)}", "162163", 0.0),
    ("\\boxed{12,345,678}", "12345678", 1.0),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),
    # wrong answers
    ("\\boxed{2}", "3", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("\\boxed{12}", "1,2", 0.0),
    ("\\boxed{\\pi}", "3.14159", 0.0),
    ("\\boxed{-3}", "3", 0.0),
    # no box, several boxes, box spellings
    ("The answer is 5.", "5", 0.0),
    ("", "5", 0.0),
    ("\\boxed{}", "5", 0.0),
    ("first \\boxed{1}, finally \\boxed{2}", "2", 1.0),
    ("first \\boxed{1}, finally \\boxed{2}", "1", 0.0),
    ("\\boxed 5", "5", 1.0),
    ("so $\\boxed 7$", "7", 1.0),
    ("\\fbox{7}", "7", 1.0),
    ("\\boxed{\\frac{1}{\\sqrt{4}}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{3} and a broken \\boxed{4", "3", 1.0),
    ("\\boxed{", "1", 0.0),
    ("\\boxedx{5}", "5", 0.0),
]


@pytest.mark.parametrize("response,answer,expected", GRADE_CASES)
def test_grade_cases(response, answer, expected):
    assert data.grade(response, answer) == expected


@pytest.mark.parametrize(
    "response,answer,strict,lenient",
    [
        ("The answer is 5.", "5", 0.0, 1.0),  # no box: the last number
        ("I get 3, then 4", "4", 0.0, 1.0),
        ("I get 3, then 4", "3", 0.0, 0.0),  # only the last number counts
        ("\\boxed{3} and later 4", "3", 1.0, 1.0),  # a box wins over a later number
        ("\\boxed{3} and later 4", "4", 0.0, 0.0),
        ("it is -2.5 then", "-2.5", 0.0, 1.0),
        ("1,234 apples", "1234", 0.0, 1.0),
        ("no number here", "4", 0.0, 0.0),
    ],
)
def test_lenient_grading(response, answer, strict, lenient):
    assert data.grade(response, answer) == strict and data.grade(response, answer, lenient=True) == lenient


def test_reward_window_reads_only_the_last_characters():
    """The released training reward searches the last 100 characters for `\\boxed{`: a box that starts before them
    is not seen (window=0: the whole response, as evaluation grades)."""
    early = "\\boxed{12}" + " so." * 24  # 10 + 96 characters: the box starts 6 before the last 100
    late = "\\boxed{12}" + " so." * 22  # 10 + 88: inside them
    assert data.grade(early, "12") == 1.0 and data.grade(early, "12", window=100) == 0.0
    assert data.grade(late, "12", window=100) == 1.0 and data.grade("x" * 500 + late, "12", window=100) == 1.0
    assert data.grade(early, "12", window=len(early)) == 1.0 and data.grade(early, "12", window=len(early) - 1) == 0.0
    sample = rollout.Sample(0, [1], [2, 3], early, "stop", [-1.0, -1.0])
    problem = [dict(answer="12")]
    assert [r["reward"] for r in rollout.score_rollouts([sample], problem, False)] == [1.0]
    assert [r["reward"] for r in rollout.score_rollouts([sample], problem, False, window=100)] == [0.0]


def test_last_boxed_extraction():
    assert data.last_boxed("a \\boxed{\\frac{a}{b^{2}}} b") == "\\frac{a}{b^{2}}"
    assert data.last_boxed("\\boxed{1} \\fbox{2}") == "2"
    assert data.last_boxed("\\boxed 17.") == "17."
    assert data.last_boxed("none") is None


def test_grade_never_executes_response(tmp_path):
    target = tmp_path / "pwned"
    hostile = [
        f"\\boxed{{__import__('os').system('touch {target}')}}",
        f"\\boxed{{eval(\"open('{target}','w')\")}}",
        f"\\boxed{{exec(\"import os; os.system('touch {target}')\")}}",
        f"\\boxed{{(lambda: __import__('os').system('touch {target}'))()}}",
        "\\boxed{\\input{/etc/passwd}}",
    ]
    for h in hostile:
        assert data.grade(h, "0") == 0.0
    # the same payloads through math-verify's comparison path directly
    for h in hostile:
        assert data._worker.equivalent(data.last_boxed(h), "0", 5.0) is False
    assert not target.exists()


def _overrun_kills_the_worker(response, answer) -> tuple[float, bool]:
    """Grade a comparison that sympy would run for minutes, with a 1 s bound: (the score, whether the math-verify
    child that took it was killed, not waited for)."""
    data.grade("\\boxed{x+1}", "1+x")  # the child is running
    child, t = data._worker.proc, time.time()
    score = data.grade(response, answer, timeout=1.0)
    bounded = time.time() - t < 60  # 1 s, far inside 60 even on a busy machine; sympy alone takes minutes
    return score, bounded and child.poll() is not None and data._worker.proc is not child


def test_grade_hostile_and_huge_inputs_are_bounded():
    score, killed = _overrun_kills_the_worker("\\boxed{9^{9^{9^{9}}}}", "5")
    assert score == 0.0 and killed
    # the worker is restarted after the kill and still answers
    assert data.grade("\\boxed{0.5}", "\\frac{1}{2}") == 1.0
    long_text = "x" * 2_000_000 + " \\boxed{12}"
    assert data.grade(long_text, "12") == 1.0
    assert data.grade("\\boxed{" + "1+" * 5000 + "1}", "5001") == 0.0  # oversized boxed answer: rejected
    assert data.grade("{" * 100_000 + "\\boxed{" + "{" * 100_000, "1") == 0.0
    assert data.grade(None, "1") == 0.0  # never raises
    assert data.grade("\\boxed{1}", None) == 0.0


def test_grade_time_bound_holds_in_worker_threads():
    """SIGALRM (the reference's bound) works in the main thread only: the child-process bound holds in a thread."""
    out = {}

    def work():
        out["score"], out["killed"] = _overrun_kills_the_worker("\\boxed{9^{9^{9^{9}}}}", "7")
        out["ok"] = data.grade("\\boxed{\\frac{2}{4}}", "0.5")

    th = threading.Thread(target=work)
    th.start()
    th.join(120)
    assert out == dict(score=0.0, killed=True, ok=1.0)


def test_answer_part_is_what_follows_the_think_pair():
    assert data.answer_part("<think>\\boxed{3}</think>\n\n So \\boxed{4}. ") == "So \\boxed{4}."
    assert data.answer_part("<think>a</think> b <think>c</think> d") == "b <think>c</think> d"  # the first pair
    assert data.answer_part("R1: reasoning \\boxed{4}</think> so 4") == "R1: reasoning \\boxed{4}</think> so 4"
    assert data.grade(data.answer_part("<think>\\boxed{4}</think> I say \\boxed{3}"), "4") == 0.0


# ============================================================================================
# data.py: prompts and sources
# ============================================================================================
def test_format_prompt_never_twice():
    p = data.format_prompt("What is 2 + 2?")
    assert p == "What is 2 + 2?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert data.format_prompt(p) == p
    assert data.format_prompt(p + "\n") == p
    assert data.strip_prompt_suffix(p) == "What is 2 + 2?"


DAPO_TEXT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{q}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def test_dapo_rewrite_and_dedup(tmp_path):
    questions = ["What is $1+1$?", "Find $x$ if $2x=6$."]
    rows = []
    for rep in range(3):  # the raw DAPO parquet holds many copies of each prompt
        for i, q in enumerate(questions):
            rows.append(
                dict(
                    data_source="math_dapo",
                    prompt=[dict(role="user", content=DAPO_TEXT.format(q=q))],
                    ability="MATH",
                    reward_model=dict(ground_truth=str(2 + i), style="rule"),
                    extra_info=dict(index=f"id{i}-{rep}"),
                )
            )
    path = tmp_path / "dapo-math-17k.parquet"
    _write_parquet(path, rows)
    problems = data.load_problems(str(path))  # every row, as the released pipeline samples them
    assert [p["question"] for p in problems] == questions * 3 and len({p["id"] for p in problems}) == 6
    unique = data.load_problems(str(path), dedup=True)  # --dedup: the first row of each question
    assert [p["question"] for p in unique] == questions and [p["id"] for p in unique] == [
        problems[0]["id"],
        problems[1]["id"],
    ]
    assert [p["answer"] for p in unique] == ["2", "3"]
    assert (
        data.format_prompt(problems[0]["question"])
        == "What is $1+1$?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


def test_verl_layout_three_encodings_agree(tmp_path):
    msg = [
        {
            "role": "user",
            "content": "What is 3*4?\nPlease reason step by step, and put your final answer within \\boxed{}.",
        }
    ]
    rm = {"ground_truth": "12", "style": "rule"}
    extra = {"index": 7, "solution": "3*4 = 12"}
    _write_parquet(tmp_path / "nested.parquet", [dict(data_source="x", prompt=msg, reward_model=rm, extra_info=extra)])
    with open(tmp_path / "json.jsonl", "w") as f:
        f.write(
            json.dumps(
                dict(
                    data_source="x", prompt=json.dumps(msg), reward_model=json.dumps(rm), extra_info=json.dumps(extra)
                )
            )
            + "\n"
        )
    with open(tmp_path / "pylit.jsonl", "w") as f:
        f.write(
            json.dumps(dict(data_source="x", prompt=repr(msg), reward_model=repr(rm), extra_info=repr(extra))) + "\n"
        )
    loaded = [data.load_problems(str(tmp_path / n)) for n in ("nested.parquet", "json.jsonl", "pylit.jsonl")]
    for problems in loaded:
        assert len(problems) == 1
        p = problems[0]
        assert (p["question"], p["answer"], p["solution"]) == ("What is 3*4?", "12", "3*4 = 12")


def test_plain_rows(tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(
        json.dumps(
            [
                {"problem": "What is 1+2?", "answer": 3, "solution": "1+2=3"},
                {"question": "What is 2+2?", "answer": "4"},
            ]
        )
    )
    ps = data.load_problems(str(path))
    assert [(p["question"], p["answer"], p["solution"]) for p in ps] == [
        ("What is 1+2?", "3", "1+2=3"),
        ("What is 2+2?", "4", None),
    ]
    assert data.load_problems(str(path), limit=1)[0]["answer"] == "3"


def test_bad_input_errors_name_file_row_and_field(tmp_path):
    p = tmp_path / "noanswer.jsonl"
    p.write_text(json.dumps({"question": "q1", "answer": "1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(ValueError, match=r"noanswer\.jsonl: row 1: missing answer \(field 'answer'\)"):
        data.load_problems(str(p))
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl: row 1: not valid JSON"):
        data.load_problems(str(p))
    p = tmp_path / "verl.jsonl"
    p.write_text(json.dumps({"prompt": "[{'role': 'user', 'content': 'q'}]", "reward_model": "{'style': 'x'}"}) + "\n")
    with pytest.raises(ValueError, match=r"verl\.jsonl: row 0: missing answer \(field 'reward_model.ground_truth'"):
        data.load_problems(str(p))
    p = tmp_path / "badcell.jsonl"
    p.write_text(json.dumps({"prompt": "[{'role': 'user'", "reward_model": "{}"}) + "\n")
    with pytest.raises(ValueError, match=r"badcell\.jsonl: row 0, field 'prompt': cannot decode"):
        data.load_problems(str(p))
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file holds no rows"):
        data.load_problems(str(p))
    with pytest.raises(ValueError, match=r"unknown source 'gsm8k'"):
        data.load_problems("gsm8k")
    with pytest.raises(ValueError, match=r"nothere\.parquet: no such file"):
        data.load_problems(str(tmp_path / "nothere.parquet"))
    with pytest.raises(ValueError, match=r"unknown problem type"):
        data.load_problems("synthetic:types=add+calculus")
    with pytest.raises(ValueError, match=r"unknown option"):
        data.load_problems("synthetic:level=3")


EXPECTED_SHARED = {
    "aime24": (30, "540"),
    "aime25": (30, "70"),
    "amc23": (40, "27"),
    "math500": (500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    "seen_64": (64, "52"),
    "seen_8x8": (64, "640"),
    "seen_1x64": (64, "640"),
    "seen_128": (128, "6"),
    "seen_512": (512, "1"),
}


def test_sft_answers_help(capsys):
    with pytest.raises(SystemExit) as e:
        sft.main(["--help"])
    out = capsys.readouterr().out
    assert (
        e.value.code == 0 and "--data DATA" in out and "--batch_size BATCH_SIZE" in out and "evaluate.py build" in out
    )


def test_the_benchmark_files_ship():
    assert sorted(p.stem for p in BENCHMARKS.glob("*.parquet")) == sorted(EXPECTED_SHARED)
    assert all(name in (BENCHMARKS / "README.md").read_text() for name in EXPECTED_SHARED)


@pytest.mark.parametrize("name", sorted(EXPECTED_SHARED))
def test_shared_benchmark_files(name):
    rows, first_answer = EXPECTED_SHARED[name]
    ps = data.load_problems(str(BENCHMARKS / f"{name}.parquet"))
    assert len(ps) == rows
    assert ps[0]["answer"] == first_answer
    assert all(p["answer"] and p["question"] and not p["question"].endswith("\\boxed{}.") for p in ps)
    if name.startswith("aime"):  # AIME answers are integers 0..999
        assert all(re.fullmatch(r"\d{1,3}", p["answer"]) for p in ps)
    if name == "seen_8x8":  # 8 problems x 8 copies, kept as they are (only raw DAPO is deduplicated)
        assert len({p["question"] for p in ps}) == 8
    if name in ("seen_64", "seen_128"):
        assert len({p["question"] for p in ps}) == rows
    if name == "seen_1x64":  # |D| = 1: one problem, 64 copies
        assert len({p["question"] for p in ps}) == 1


def _solve_independently(p):
    """Recompute a synthetic problem's answer from its question text alone."""
    nums = [int(x) for x in re.findall(r"\d+", p["question"])]
    t = p["type"]
    if t in ("add", "word"):
        return nums[0] + nums[1]
    if t == "sub":
        return nums[0] - nums[1]
    if t == "mul":
        return nums[0] * nums[1]
    if t == "div":
        assert nums[0] % nums[1] == 0
        return nums[0] // nums[1]
    if t == "mod":
        return nums[0] % nums[1]
    if t == "linear":
        a, b, c = nums
        assert (c - b) % a == 0
        return (c - b) // a
    if t == "sequence":
        assert len({nums[i + 1] - nums[i] for i in range(3)}) == 1
        return 2 * nums[3] - nums[2]
    if t == "percent":
        assert nums[0] * nums[1] % 100 == 0
        return nums[0] * nums[1] // 100
    if t == "gcd":
        return math.gcd(nums[0], nums[1])
    if t == "lcm":
        return math.lcm(nums[0], nums[1])
    if t == "mean":
        assert sum(nums) % len(nums) == 0
        return sum(nums) // len(nums)
    if t == "word_sub":
        assert nums[0] >= nums[1]
        return nums[0] - nums[1]
    if t == "square":
        return nums[0] ** 2
    if t == "product":
        return nums[0] * nums[1]
    raise AssertionError(f"no independent solver for {t}")


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_synthetic_answers_and_solutions_are_right(difficulty):
    ps = data.load_problems(f"synthetic:difficulty={difficulty},split=all,n=280", seed=3)
    assert len(ps) == 280 and len({p["question"] for p in ps}) == 280
    assert {p["type"] for p in ps} == set(data.ALL_TYPES)
    for p in ps:
        assert int(p["answer"]) == _solve_independently(p), p
        assert data.grade(p["solution"], p["answer"]) == 1.0
        if difficulty == 1 and p["type"] in ("add", "sub", "word"):  # single-digit operands
            assert all(int(x) < 10 for x in re.findall(r"\d+", p["question"]))


def test_mixed_difficulty_and_traces_without_plans():
    ps = data.load_problems("synthetic:difficulty=1+2,n=60,seed=4")
    # blocks of the ten training types, at difficulty 1, then 2, then 1 ...
    assert [p["difficulty"] for p in ps] == [1] * 10 + [2] * 10 + [1] * 10 + [2] * 10 + [1] * 10 + [2] * 10
    assert all(int(p["answer"]) == _solve_independently(p) for p in ps)
    for p in ps:  # the first operand has as many digits as the level (sub, mod: the larger, or d + 1)
        if p["type"] in ("add", "word", "mul"):
            assert len(re.findall(r"\d+", p["question"])[0]) <= p["difficulty"]
    assert max(int(re.findall(r"\d+", p["question"])[0]) for p in ps if p["difficulty"] == 2) >= 10
    plain = data.load_problems("synthetic:style=think,n=40,plan=0,slip=0.25")
    planned = data.load_problems("synthetic:style=think,n=40,plan=1,slip=0.25")
    assert [p["question"] for p in plain] == [p["question"] for p in planned]
    for p in plain:
        think = p["solution"].split("</think>")[0].removeprefix("<think>\n")
        # without plans a trace is its equations, checks and corrections only: no sentence but these
        rest = re.sub(r"Wait, let me check: [^.]*?(\. Yes\.|, not \d+\. I made a mistake: [^.]*\.)", "", think)
        rest = re.sub(r"\d+ [-+*/] \d+ = \d+\.", "", rest.removeprefix("Hmm,"))
        assert rest.split() == ["So", "the", "answer", "is", f"{p['answer']}."], p["solution"]
        assert data.grade(p["solution"], p["answer"]) == 1.0
    bare = "slip=0,check=0,hesitate=0"  # no random draws but the plans': the same equations, with or without plans
    for p, q in zip(*(data.load_problems(f"synthetic:style=think,n=40,{bare},plan={x}") for x in (0, 1))):
        assert len(p["solution"]) < len(q["solution"]) and _EQUATION.findall(p["solution"]) == _EQUATION.findall(
            q["solution"]
        )
    # train and test parts: disjoint, every type in both, the test part exactly the questions whose CRC-32 is 0 mod 4
    train = data.load_problems("synthetic:difficulty=1+2,n=400,part=train")
    test = data.load_problems("synthetic:difficulty=1+2,n=100,seed=1,part=test")
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert {p["type"] for p in test} == {p["type"] for p in train} == set(data.TRAIN_TYPES)
    assert all(zlib.crc32(p["question"].encode()) % 4 == 0 for p in test)
    assert all(zlib.crc32(p["question"].encode()) % 4 for p in train)
    sums = [f"What is {a} + {b}?" for a in range(1, 10) for b in range(1, 10)]  # every single-digit sum
    k = sum(zlib.crc32(q.encode()) % 4 == 0 for q in sums)
    assert {p["question"] for p in data.load_problems(f"synthetic:types=add,n={k},part=test")} < set(sums)
    with pytest.raises(ValueError, match=f"only {k} distinct problems exist"):
        data.load_problems(f"synthetic:types=add,n={k + 1},part=test")
    for bad, match in (
        ("difficulty=0+1", "difficulty and n must be >= 1"),
        ("plan=2", "plan=2.0 must be in"),
        ("part=dev", "unknown part"),
    ):
        with pytest.raises(ValueError, match=match):
            data.load_problems(f"synthetic:{bad}")


def test_synthetic_types_splits_and_seed():
    assert len(data.TRAIN_TYPES) >= 8 and len(data.OOD_TYPES) >= 1
    assert not set(data.TRAIN_TYPES) & set(data.OOD_TYPES)
    a = data.load_problems("synthetic:n=50", seed=0)
    assert a == data.load_problems("synthetic:n=50", seed=0)
    assert a != data.load_problems("synthetic:n=50", seed=1)
    assert {p["type"] for p in a} == set(data.TRAIN_TYPES)
    ood = data.load_problems("synthetic:split=ood,n=40")
    assert {p["type"] for p in ood} == set(data.OOD_TYPES) and all(p["split"] == "ood" for p in ood)
    only = data.load_problems("synthetic", limit=9, types="mul+gcd")
    assert len(only) == 9 and {p["type"] for p in only} == {"mul", "gcd"}
    with pytest.raises(ValueError, match="distinct problems exist"):
        data.load_problems("synthetic:types=add,n=82")  # single-digit addition has 81 problems
    assert len(data.load_problems("synthetic:types=add,n=81")) == 81


_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _equation_holds(a, op, b, v) -> bool:
    a, b, v = int(a), int(b), int(v)
    return {"+": a + b == v, "-": a - b == v, "*": a * b == v, "/": b != 0 and a == v * b}[op]


@pytest.mark.parametrize("slip", [0.25, 0.0, 1.0])
def test_think_traces_are_right_and_slips_are_corrected(slip):
    import rollout

    n = 140
    ps = data.load_problems(f"synthetic:style=think,split=all,n={n},slip={slip}", seed=2)
    plain = data.load_problems(f"synthetic:split=all,n={n}", seed=2)
    assert [(p["question"], p["answer"]) for p in ps] == [(p["question"], p["answer"]) for p in plain]
    slipped, checked_first, unchecked_first, markers = 0, 0, 0, []
    for p in ps:
        trace, answer = p["solution"], _solve_independently(p)
        assert int(p["answer"]) == answer
        assert trace.startswith("<think>\n") and trace.count("<think>") == trace.count("</think>") == 1, trace
        think, after = trace[len("<think>") :].split("</think>")
        assert data.grade(trace, p["answer"]) == 1.0 and data.grade(after, p["answer"]) == 1.0
        assert rollout.strip_think(trace) == after.strip() == data.answer_part(trace)
        assert after.strip().endswith(f"\\boxed{{{answer}}}.") and after.count(".") <= 2
        assert think.strip().endswith(f"So the answer is {answer}.")
        equations = list(_EQUATION.finditer(think))
        wrong = [m for m in equations if not _equation_holds(*m.groups())]
        if wrong:  # a slip: the first computation only, caught by a check, then corrected before the answer
            slipped += 1
            assert len(wrong) == 1 and wrong[0] is equations[0], trace
            rest = think[wrong[0].end() :]
            lhs = " ".join(wrong[0].groups()[:3])
            fix = rest.index(f"{lhs} = ")
            assert "Wait, let me check" in rest[:fix] and "mistake" in rest[:fix]
            assert _equation_holds(*_EQUATION.match(rest[fix:]).groups())
        else:
            first_end = think.index(".", equations[0].end() - 1) + 1
            checks = think[first_end:].lstrip().startswith("Wait, let me check")
            checked_first, unchecked_first = checked_first + checks, unchecked_first + (not checks)
        # the markers are where the trace verbalizes them: "Hmm," per hesitation, "Wait" + "check" per check
        e = epistemic.epistemic_count(trace)
        assert e == trace.count("Hmm,") + 2 * trace.count("Wait, let me check"), trace
        assert set(m for m, c in epistemic.count_markers(trace).items() if c) <= {"hmm", "wait", "check"}
        markers.append(e)
    assert slipped == math.floor(n * slip)  # a fixed share, exact
    if slip < 1:  # checking is a choice: some correct first steps are checked, some are not
        assert checked_first > 0 and unchecked_first > 0
    assert sum(markers) / n >= 2
    assert ps == data.load_problems(f"synthetic:style=think,split=all,n={n},slip={slip}", seed=2)
    assert ps != data.load_problems(f"synthetic:style=think,split=all,n={n},slip={slip}", seed=3)


def test_think_trace_shares_and_their_checks():
    ps = data.load_problems("synthetic:style=think,n=64")  # the defaults, as the warm start uses them
    assert all(
        data.grade(p["solution"], p["answer"]) == 1.0 and "<think>" in p["solution"] and "</think>" in p["solution"]
        for p in ps
    )
    assert sum(epistemic.epistemic_count(p["solution"]) for p in ps) / 64 >= 2
    quiet = data.load_problems("synthetic:style=think,n=64,slip=0,check=0,hesitate=0")
    assert all(epistemic.epistemic_count(p["solution"]) == 0 for p in quiet)
    loud = data.load_problems("synthetic:style=think,n=64,slip=0,check=1,hesitate=1")
    for p, q in zip(loud, quiet):
        steps = len(_EQUATION.findall(q["solution"].split("</think>")[0]))
        assert p["solution"].count("Wait, let me check") == steps and p["solution"].count("Hmm,") == 1
    assert data.load_problems("synthetic:style=think,n=64")[:8] == data.load_problems("synthetic:style=think,n=8")
    assert data.load_problems("synthetic:n=5,seed=3", seed=0) == data.load_problems("synthetic:n=5", seed=3)
    for bad, match in (
        ("style=r1", "unknown style"),
        ("style=think,slip=1.5", "slip=1.5 must be in"),
        ("check=-1", "check=-1.0 must be in"),
        ("hmm=1", "unknown option"),
    ):
        with pytest.raises(ValueError, match=match):
            data.load_problems(f"synthetic:{bad}")


def test_think_lengths_of_a_rollout_and_the_warm_start_rows(embedded_tokenizer):
    import rollout
    import sft
    from types import SimpleNamespace

    tok = embedded_tokenizer
    p = data.load_problems("synthetic:style=think,n=3")[2]
    texts = [p["solution"], "no think block \\boxed{8}", "<think>open only, never closed"]
    samples = [
        SimpleNamespace(
            prompt_index=0, prompt_ids=[1], response_ids=tok(t)["input_ids"], logprobs=[], text=t, finish_reason="stop"
        )
        for t in texts
    ]
    rows = rollout.score_rollouts(samples, [p], lenient=False, tokenizer=tok)
    assert [r["reward"] for r in rows] == [1.0, float(p["answer"] == "8"), 0.0]
    answer = data.answer_part(p["solution"])  # a second route to the text after </think>
    assert rows[0]["answer_length"] == len(tok(answer)["input_ids"]) < rows[0]["length"]
    assert [r["answer_length"] for r in rows[1:]] == [r["length"] for r in rows[1:]]  # no </think>: all answer
    assert sft.read_sft_rows("synthetic:style=think,n=4") == [
        dict(question=q["question"], response=q["solution"]) for q in data.load_problems("synthetic:style=think,n=4")
    ]


def test_coverage_subsets():
    ps = data.load_problems("synthetic:difficulty=2,n=600")
    for size in (1, 8, 64, 128, 512):
        sub = data.coverage_subset(ps, size, seed=0)
        assert len(sub) == size == len({p["question"] for p in sub})
        assert sub == data.coverage_subset(ps, size, seed=0)
    with pytest.raises(ValueError):
        data.coverage_subset(ps[:5], 8)


def test_champ_source():
    ps = data.load_problems("champ")
    assert len(ps) == 270
    from collections import Counter

    assert Counter(p["type"] for p in ps) == {
        "Number-Theory": 80,
        "Inequality": 50,
        "Polynomial": 50,
        "Sequence": 50,
        "Combinatorics": 40,
    }
    assert all(p["answer"] and p["solution"] for p in ps)
    assert ps[0]["id"] == "P_Combinatorics_1" and ps[0]["answer"] == "239"
    assert len(data.load_problems("champ:category=Sequence")) == 50


def test_data_cli():
    out = run(sys.executable, "data.py", "synthetic:difficulty=1,n=20", "--limit", "2")
    assert out.startswith("20 problems from synthetic")
    assert len(out.strip().splitlines()) == 3
    for argv in (["--limit", "2", "x.jsonl"], ["x.jsonl", "--limit", "2"], ["--source", "x.jsonl", "--limit", "2"]):
        assert data.parse_args(data.Args, argv, positional="source") == data.Args(source="x.jsonl", limit=2), argv
    assert data.parse_args(data.Args, [], positional="source") == data.Args()


# ============================================================================================
# epistemic.py
# ============================================================================================
TEXT = (
    "Wait, hmm... Hmmm, maybe I should check. Checking again: perhaps it seems likely, not unlikely. "
    "Actually, alternatively, it might be awaiting us. Wait."
)


def test_markers_in_paper_order():
    assert epistemic.MARKERS == (
        "wait",
        "hmm",
        "perhaps",
        "maybe",
        "actually",
        "alternatively",
        "seems",
        "might",
        "likely",
        "check",
    )


def test_count_markers_by_hand():
    # substrings, lower-cased (released code): "Hmmm" holds hmm once, "Checking" holds check,
    # "unlikely" holds likely, "awaiting" holds wait
    sub = epistemic.count_markers(TEXT)
    assert sub == dict(
        wait=3, hmm=2, perhaps=1, maybe=1, actually=1, alternatively=1, seems=1, might=1, likely=2, check=2
    )
    assert epistemic.epistemic_count(TEXT) == 15
    whole = epistemic.count_markers(TEXT, whole_words=True)
    assert whole == dict(
        wait=2, hmm=1, perhaps=1, maybe=1, actually=1, alternatively=1, seems=1, might=1, likely=1, check=1
    )
    assert epistemic.epistemic_count(TEXT, whole_words=True) == 11
    assert epistemic.epistemic_count("") == 0


def test_split_think():
    assert epistemic.split_think("so 2+2=4. wait.</think>\n\nThe answer is 4.") == (
        "so 2+2=4. wait.",
        "The answer is 4.",
    )
    assert epistemic.split_think("<think>\nhmm\n</think>\n\n\\boxed{1}") == ("hmm", "\\boxed{1}")
    assert epistemic.split_think("no tags here") == ("", "no tags here")


def test_breakdown_and_frequency_shift_by_hand():
    br = epistemic.marker_breakdown(["wait wait", "maybe", ""])
    assert br["wait"] == pytest.approx(2 / 3) and br["maybe"] == pytest.approx(1 / 3)
    assert br["total"] == pytest.approx(1.0)
    shift = epistemic.word_frequency_shift(["wait wait the cat", "the dog"], ["the the cat"])
    # mu_base: wait 1, the 1, cat .5, dog .5 ; mu_model: the 2, cat 1
    assert shift["delta"] == {"wait": -1.0, "the": 1.0, "cat": 0.5, "dog": -0.5}
    assert shift["mean_marker_delta"] == -1.0
    assert shift["mean_rest_delta"] == pytest.approx(1 / 3)
    assert shift["mean_abs_rest_delta"] == pytest.approx(2 / 3)


def test_epistemic_cli(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps({"response": r}) for r in ["Wait, maybe.", "hmm wait"]) + "\n")
    b.write_text(json.dumps({"generated_responses": ["ok then", "wait"]}) + "\n")
    out = run(sys.executable, "epistemic.py", str(a))
    assert re.search(r"\| wait\s+\| 1\.00\s+\|", out) and re.search(r"\| total\s+\| 2\.00\s+\|", out)
    epistemic.main([str(a), "--base", str(b)])  # the other calls in this process
    assert "App. B.4" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="a.jsonl: row 0: no field 'text'"):
        epistemic.main([str(a), "--key", "text"])


# ============================================================================================
# rollout.py
# ============================================================================================
import itertools

import torch

import rollout
import evaluate

NATIVE_BF16 = rollout.native_bf16


@pytest.fixture(autouse=True, scope="session")
def fp32_by_default():
    """--dtype auto resolves to fp32 in every test and fixture, on every CPU: where bf16 is native it would resolve
    to bf16 and the values would depend on the machine. The precision tests ask for bf16 by flag."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollout, "native_bf16", lambda device: False)
        yield


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_conversion):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(rollout.embedded_model_dir())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer):
    """A randomly initialised 2-layer Llama with the embedded tokenizer, saved as a HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(embedded_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=embedded_tokenizer.eos_token_id,
        pad_token_id=embedded_tokenizer.pad_token_id,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    return rollout.load_model(tiny_model_dir)


def test_context_prompt_strings_exact():
    q = "What is 2 + 3?"
    base = "What is 2 + 3?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert rollout.unguided_prompt(q) == base
    assert rollout.reprompt(q, "2 + 3 = 5, so \\boxed{5}.") == (
        base + "\nCorrect solution:\n\n2 + 3 = 5, so \\boxed{5}.\n\nCorrectly solve the original question."
    )
    assert rollout.reprompt(q, "S", feedback="F") == (
        base + "\nCorrect solution:\n\nS\nThe following is feedback from your unsuccessful earlier attempt:\n\nF"
        "\n\nCorrectly solve the original question."
    )
    assert rollout.reprompt(q, "S", template="uncertainty") == (
        base + "\nCorrect solution:\n\nS\n\nSolve the original question from scratch with a full, detailed reasoning "
        "trace, without skipping any steps, and include as much uncertainty or ambiguity in the explanation."
    )
    assert rollout.reprompt(base, "S") == rollout.reprompt(q, "S")  # the instruction is never doubled


def test_strip_think():
    assert rollout.strip_think("<think>\nhmm, 2+3=5\n</think>\n\nSo \\boxed{5}.") == "So \\boxed{5}."  # Qwen3
    assert (
        rollout.strip_think("Okay, wait... 5.\n</think>\n\nThe answer is \\boxed{5}.") == "The answer is \\boxed{5}."
    )  # R1-Distill: the template opened <think>, the response only closes it
    assert rollout.strip_think("<think>a</think>x<think>b</think>y") == "xy"
    assert rollout.strip_think(" no thinking here\n") == " no thinking here\n"  # nothing else stripped
    assert rollout.strip_think("plan</think>\n draft </think> final") == "draft </think> final"  # the FIRST one
    assert rollout.strip_think("<think>a</think>\n\nb</think>c") == "c"  # the pair, then up to the next


# The tail of Qwen3's and DeepSeek-R1-Distill's chat templates, written the way the real ones are
# (string literals inside {{- }}), since their tokenizers cannot be downloaded here.
QWEN3_LIKE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
R1_LIKE = (
    "{{- '<｜begin▁of▁sentence｜>' }}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{{- '<｜User｜>' + m.content }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)


def test_chat_templates(embedded_tokenizer):
    tok = embedded_tokenizer
    user = "What is 1 + 1?"
    assert rollout.chat_prompt(tok, user) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rollout.chat_prompt(tok, user, system="SYS") == (  # OLMo-3 style: our system prompt replaces the default
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    )
    qwen = copy.copy(tok)
    qwen.chat_template = QWEN3_LIKE
    assert (
        rollout.chat_prompt(qwen, user, thinking="on")
        == "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rollout.chat_prompt(qwen, user, thinking="auto") == rollout.chat_prompt(qwen, user, thinking="on")
    assert rollout.chat_prompt(qwen, user, thinking="off").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    r1 = copy.copy(tok)
    r1.chat_template = R1_LIKE
    assert rollout.chat_prompt(r1, user) == "<｜begin▁of▁sentence｜><｜User｜>What is 1 + 1?<｜Assistant｜><think>\n"


def test_sampling_logprobs_filters_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    lp = rollout.sampling_logprobs(logits, 1.0, 1.0, 2)  # top-2: renormalised over {0, 1}
    z = math.log(math.e**2 + math.e)
    assert torch.allclose(lp[0, :2], torch.tensor([2 - z, 1 - z])) and torch.isinf(lp[0, 2:]).all()
    p = torch.softmax(logits / 0.5, -1)[0]  # T = 0.5: p = [0.867, 0.117, 0.016, 0.002]
    lp = rollout.sampling_logprobs(logits, 0.5, 0.9, 0)  # top-p 0.9 keeps the smallest prefix reaching 0.9: {0, 1}
    keep = torch.log(p[:2] / p[:2].sum())
    assert torch.allclose(lp[0, :2], keep, atol=1e-6) and torch.isinf(lp[0, 2:]).all()


def test_sample_tokens_matches_distribution():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    lp = torch.log(probs).expand(20000, 4)
    counts = torch.bincount(rollout.sample_tokens(lp, gen), minlength=4).float() / 20000
    assert counts[1] == 0 and torch.allclose(counts, probs, atol=0.015)


@pytest.mark.parametrize(
    "temperature,top_p,top_k", [(1.0, 1.0, 0), (0.5, 0.9, 0), (0.8, 1.0, 3), (0.8, 0.7, 3), (0.0, 1.0, 0)]
)
def test_sample_next_matches_full_vocabulary_definition(temperature, top_p, top_k):
    # rollout.sample_next draws from sampling_logprobs over the whole vocabulary; fast.sample_next, its twin, over
    # the top-k candidates only. Both: 40,000 draws over a 6-token vocabulary match exp(sampling_logprobs), each
    # draw's log-prob is its entry, and from the same uniforms the two draw the same tokens.
    logits = torch.tensor([[1.5, -0.5, 2.0, 0.3, -2.0, 1.0]]).expand(40000, 6)
    ref = rollout.sampling_logprobs(logits[:1], temperature, top_p, top_k)[0]
    tok, lp = rollout.sample_next(logits, temperature, top_p, top_k, torch.Generator().manual_seed(0))
    tok_f, lp_f = fast.sample_next(
        logits, temperature, top_p, top_k, torch.Generator().manual_seed(0), rollout.sample_tokens
    )
    assert torch.equal(tok, tok_f) and torch.allclose(lp, lp_f, atol=1e-6)
    assert torch.allclose(lp, ref[tok], atol=1e-6)
    freq = torch.bincount(tok, minlength=6).float() / len(tok)
    if temperature <= 0:  # greedy: the argmax, with its plain log-softmax
        assert (tok == 2).all()
        return
    assert torch.allclose(freq, ref.exp(), atol=0.01)
    assert (freq[torch.isinf(ref)] == 0).all()  # a filtered token is never drawn
    if top_k:
        assert int(torch.isfinite(ref).sum()) <= top_k


@pytest.mark.parametrize("top_p,top_k", [(1.0, 20), (0.95, 20), (0.9, 0), (1.0, 3)])
def test_sample_next_twins_draw_the_same_tokens_on_tied_logits(top_p, top_k):
    """bf16-rounded logits tie often: the twins must order tied candidates alike (by vocabulary id) to draw the same
    tokens from the same uniforms; a hand-made tie at the top-k boundary too."""
    logits = torch.randn(3000, 500, generator=torch.Generator().manual_seed(0)).mul(3).to(torch.bfloat16).float()
    logits[:, 7] = logits[:, 11] = logits[:, 3] = logits.max() + 1  # three tied at the top
    tok, lp = rollout.sample_next(logits, 0.7, top_p, top_k, torch.Generator().manual_seed(1))
    tok_f, lp_f = fast.sample_next(logits, 0.7, top_p, top_k, torch.Generator().manual_seed(1), rollout.sample_tokens)
    assert torch.equal(tok, tok_f) and torch.allclose(lp, lp_f, atol=1e-6)
    assert float((logits.sort(-1).values.diff(dim=-1) == 0).float().mean()) > 0.1  # ties are common


def _forward_logprobs(model, sample, params):
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(sample.prompt_ids) - 1 : -1]
    lp = rollout.sampling_logprobs(logits, params.temperature, params.top_p, params.top_k)
    return lp.gather(-1, torch.tensor(sample.response_ids)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 20)])
def test_hf_backend_logprobs_match_forward_and_seed_is_deterministic(tiny, temperature, top_p, top_k):
    model, tok = tiny
    prompts = [rollout.chat_prompt(tok, data.format_prompt(q)) for q in ("What is 2 + 3?", "Solve x + 1 = 2.", "Hi")]
    params = rollout.SamplingParams(n=3, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=24, seed=5)
    a = rollout.generate_hf(model, tok, prompts, params, batch_size=4, progress=False)
    b = rollout.generate_hf(model, tok, prompts, params, batch_size=4, progress=False)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    c = rollout.generate_hf(
        model, tok, prompts, rollout.SamplingParams(**{**params.__dict__, "seed": 6}), batch_size=4, progress=False
    )
    assert [s.response_ids for s in a] != [s.response_ids for s in c]
    assert [s.prompt_index for s in a] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for s in a:
        assert len(s.logprobs) == len(s.response_ids) >= 1
        assert s.prompt_ids == tok(prompts[s.prompt_index], add_special_tokens=False)["input_ids"]
        assert (s.finish_reason == "stop") == (s.response_ids[-1] in rollout.eos_ids(tok, model))
        assert s.finish_reason == "stop" or len(s.response_ids) == 24
        assert torch.allclose(torch.tensor(s.logprobs), _forward_logprobs(model, s, params), atol=1e-4)


def test_hf_backend_stops_at_eos_and_drops_finished_rows(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    prompts = [rollout.chat_prompt(tok, f"{i}") for i in range(6)]
    params = rollout.SamplingParams(n=2, temperature=1.0, max_new_tokens=40, seed=1)
    orig = model.lm_head.forward  # make EOS likely (an instance-level override) so rows finish at different steps
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 9.0  # p(EOS) ~ 0.14 a step against 49k near-uniform logits
    model.lm_head.forward = lambda x: orig(x) + bias
    try:
        out = rollout.generate_hf(model, tok, prompts, params, batch_size=12, progress=False)
    finally:
        del model.lm_head.forward
    lengths = [len(s.response_ids) for s in out]
    assert any(s.finish_reason == "stop" for s in out) and len(set(lengths)) > 1
    for s in out:
        assert (eos in s.response_ids) == (s.finish_reason == "stop")
        assert eos not in s.response_ids[:-1]  # nothing after EOS
    # the same rows decoded one at a time give the same log-probs (row dropping keeps the cache right)
    for s in out[:4]:
        ref = _forward_logprobs_biased(model, s, bias)
        assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-4)


@pytest.mark.parametrize("lean", [True, False])
def test_decoding_attention_gets_contiguous_queries(tiny, monkeypatch, lean):
    """skinny_linear's (W @ x.T).T is a transposed view; handed on as is, the query's last dimension has
    stride `rows` and CPU sdpa silently takes its math kernel (which copies the grouped KV cache per head)
    instead of flash. Every decoding call must see stride 1 (LeanDecoder's and the model's own forward),
    and the linears must still equal nn.Linear."""
    model, tok = tiny
    assert fast.lean_decoding(model)
    if not lean:
        monkeypatch.setattr(fast, "lean_decoding", lambda m: False)
    strides = []
    stock = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        strides.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return stock(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    prompts = [rollout.chat_prompt(tok, q) for q in ("What is 2 + 3?", "Hi")]
    rollout.generate_hf(model, tok, prompts, rollout.SamplingParams(n=2, max_new_tokens=6, seed=0), progress=False)
    assert len(strides) >= 6 * model.config.num_hidden_layers  # the prefill and at least 5 decoding steps
    assert all(s == (1, 1, 1) for s in strides), strides[:3]
    x = torch.randn(4, 1, model.config.hidden_size)
    lin = model.model.layers[0].self_attn.q_proj
    ref = torch.nn.functional.linear(x, lin.weight)
    with fast.skinny_linear(model):
        y = lin(x)
    assert y.is_contiguous() and y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-6)


def _tiny_decoder(kind: str):
    """Tiny random Llama-style models of each family LeanDecoder writes out (fp32, sdpa)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(3)
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    if kind == "llama":  # Llama 3 rope scaling and an attention bias: both handled by the model's own modules
        cfg = LlamaConfig(
            **common,
            attention_bias=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=4.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        )
        return LlamaForCausalLM(cfg).eval()
    if kind == "qwen2":  # q/k/v biases, untied head
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()
    return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16)).eval()  # q/k RMSNorms, head_dim != H / heads


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_lean_decoder_equals_model_forward(kind):
    """LeanDecoder's logits, step by step from a left-padded prefill (rows leaving, buffers doubling), against
    a plain unpadded forward of each row's whole sequence."""
    model = _tiny_decoder(kind)
    for name, p in model.named_parameters():  # random biases and norm weights, so that a dropped term shows
        if p.dim() == 1:
            torch.nn.init.normal_(p, 1.0 if "norm" in name else 0.0, 0.3)
    assert fast.lean_decoding(model)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    W = max(map(len, prompts))
    ids = torch.tensor([[0] * (W - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (W - len(p)) + [1] * len(p) for p in prompts])
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    seqs, rows, pos = [list(p) for p in prompts], torch.arange(3), position[:, -1]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
        lean = fast.LeanDecoder(model, res.past_key_values, mask, room=2)  # room 2: the buffers double twice
        for t in range(6):
            if t == 3:  # the middle row finishes
                keep = torch.tensor([0, 2])
                lean.select(keep)
                rows, pos = rows[keep], pos[keep]
            nxt = torch.randint(1, 64, (len(rows),), generator=gen)
            pos = pos + 1
            got = lean.step(nxt, pos)
            for i, r in enumerate(rows.tolist()):
                seqs[r].append(int(nxt[i]))
                want = model(input_ids=torch.tensor([seqs[r]])).logits[0, -1]
                assert torch.allclose(got[i], want, atol=1e-5, rtol=0), (
                    kind,
                    t,
                    r,
                    float((got[i] - want).abs().max()),
                )
    assert lean.seen.shape[1] >= W + 6 and len(seqs[1]) == 2 + 3


def test_generate_hf_same_with_lean_decoding(tiny, monkeypatch):
    """Greedy rollouts are the same tokens, with log-probs within 1e-5, through LeanDecoder and through the
    model's own forward; LeanDecoder is what ran."""
    model, tok = tiny
    prompts = [rollout.chat_prompt(tok, data.format_prompt(q)) for q in ("What is 2 + 3?", "Hi", "Solve x + 1 = 2.")]
    params = rollout.SamplingParams(n=2, temperature=0.0, max_new_tokens=12, seed=0)
    steps = []
    real = fast.LeanDecoder.step
    monkeypatch.setattr(fast.LeanDecoder, "step", lambda self, *a: steps.append(1) or real(self, *a))
    lean = rollout.generate_hf(model, tok, prompts, params, batch_size=4, progress=False)
    n_lean = len(steps)
    assert n_lean >= 11
    monkeypatch.setattr(fast, "lean_decoding", lambda m: False)
    plain = rollout.generate_hf(model, tok, prompts, params, batch_size=4, progress=False)
    assert len(steps) == n_lean  # the model's own forward decoded this time
    for a, b in zip(lean, plain):
        assert a.response_ids == b.response_ids and a.finish_reason == b.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def test_lean_decoding_past_its_first_256_positions(tiny, monkeypatch):
    """LeanDecoder preallocates 256 positions: a 300-token greedy rollout (no EOS can end it) grows them and gives
    the model's own forward's tokens."""
    model, tok = tiny
    monkeypatch.setattr(rollout, "eos_ids", lambda *a: {-1})  # never sampled: every row decodes 300 tokens
    prompts = [rollout.chat_prompt(tok, "Count.")]
    params = rollout.SamplingParams(n=1, temperature=0.0, max_new_tokens=300, seed=0)
    lean = rollout.generate_hf(model, tok, prompts, params, progress=False)
    monkeypatch.setattr(fast, "lean_decoding", lambda m: False)
    plain = rollout.generate_hf(model, tok, prompts, params, progress=False)
    assert len(lean[0].response_ids) == 300 and lean[0].response_ids == plain[0].response_ids
    assert max(abs(x - y) for x, y in zip(lean[0].logprobs, plain[0].logprobs)) < 1e-4


def test_bfloat16_model_generates_in_bfloat16(tiny_model_dir):
    """--dtype bfloat16 (evaluate.py, rollout.py, evaluate.py build): the model's weights in bf16, rollouts with finite
    log-probs through the fast path and the plain one."""
    model, tok = rollout.load_model(tiny_model_dir, "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    params = rollout.SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=6, seed=0)
    for quick in (True, False):
        out = rollout.generate_hf(model, tok, [rollout.chat_prompt(tok, "Hi")], params, progress=False, fast=quick)
        assert len(out) == 2 and all(s.response_ids and all(math.isfinite(x) for x in s.logprobs) for s in out)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 5)])
def test_generate_hf_plain_twin_draws_the_same_rollouts(tiny, temperature, top_p, top_k):
    """--no-fast decoding (the model's forward on its KV cache, rollout.sample_next over the whole vocabulary) and
    fast.py's (LeanDecoder, skinny_linear, sampling over the top-k) draw the same tokens from the same seeds, with
    log-probs within 1e-5, and the plain loop never enters fast.py."""
    model, tok = tiny
    prompts = [rollout.chat_prompt(tok, data.format_prompt(q)) for q in ("What is 2 + 3?", "Hi", "Solve x + 1 = 2.")]
    params = rollout.SamplingParams(n=3, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=12, seed=4)
    quick = rollout.generate_hf(model, tok, prompts, params, batch_size=4, progress=False)
    real = sys.modules.pop("fast")
    sys.modules["fast"] = None  # an import of fast.py fails, as if the file were deleted
    try:
        plain = rollout.generate_hf(model, tok, prompts, params, batch_size=4, progress=False, fast=False)
    finally:
        sys.modules["fast"] = real
    assert len(quick) == len(plain) == 9
    for a, b in zip(quick, plain):
        assert a.response_ids == b.response_ids and a.finish_reason == b.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def _forward_logprobs_biased(model, s, bias):
    ids = torch.tensor([s.prompt_ids + s.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(s.prompt_ids) - 1 : -1] + bias
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)


def test_max_new_tokens_must_be_positive(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="max_new_tokens must be > 0"):
        rollout.generate_hf(model, tok, ["x"], rollout.SamplingParams(max_new_tokens=0))


def test_load_model_errors_and_embedded_model():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rollout.load_model("./no/such/model")
    model, tok = rollout.load_model()  # the embedded model, from the converted cache
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    cfg = json.loads((rollout.embedded_model_dir() / "config.json").read_text())
    assert "quantization_config" not in cfg  # the saved checkpoint is a plain fp32 model


FLOCK_SYSCALL = {"x86_64": "73", "aarch64": "32"}.get(os.uname().machine)


CAN_READ_FLOCK = FLOCK_SYSCALL is not None and Path("/proc/self/syscall").exists()


def _convert_killed_then_under_lock(cache: Path) -> None:
    """A conversion killed midway leaves no cache in place. While the lock is held, a second process blocks in
    flock (read from /proc, no sleeps); once it is released, it removes the killed run's temporary directory and
    converts."""
    import fcntl

    code = "import sys, rollout; print(rollout.embedded_model_dir(sys.argv[1]))"
    cache.mkdir(parents=True, exist_ok=True)

    def start():
        return subprocess.Popen(
            [sys.executable, "-c", code, str(cache)],
            cwd=ROOT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def wait_for(condition, what, timeout=120):
        end = time.time() + timeout
        while not condition():
            assert time.time() < end, f"timed out waiting for {what}"
            time.sleep(0.02)

    target = cache / "smollm2-135m-instruct"
    first = start()
    wait_for(lambda: list(cache.glob(".convert-*")) or first.poll() is not None, "the conversion to begin")
    first.kill()
    first.wait()
    assert not target.exists() and list(cache.glob(".convert-*"))  # killed before the rename: nothing in place
    with open(cache / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        second = start()

        def in_flock():
            return Path(f"/proc/{second.pid}/syscall").read_text().split()[0] == FLOCK_SYSCALL

        wait_for(lambda: second.poll() is not None or in_flock(), "the second process to block on the lock")
        assert second.poll() is None and not target.exists()  # it waits for the lock instead of converting
        fcntl.flock(lock, fcntl.LOCK_UN)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0 and out.strip() == str(target)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == 30
    assert not list(cache.glob(".convert-*"))  # the killed run's temporary directory was cleaned up


@pytest.fixture(scope="session")
def embedded_conversion() -> bool:
    """Fills an empty model cache (CI's) through `_convert_killed_then_under_lock`, so the conversion the suite needs
    is the one its test checks; True when it did. A warm cache is left alone (the test then converts elsewhere)."""
    cache = Path(os.environ.get("SDPO_CACHE", Path.home() / ".cache" / "sdpo-reference"))
    if not CAN_READ_FLOCK or (cache / "smollm2-135m-instruct" / "config.json").exists():
        return False
    _convert_killed_then_under_lock(cache)
    return True


@pytest.mark.skipif(not CAN_READ_FLOCK, reason="reads /proc/PID/syscall (Linux x86_64 or aarch64)")
def test_embedded_conversion_is_atomic_and_waits_for_the_lock(embedded_conversion, tmp_path):
    if not embedded_conversion:  # the cache was warm: the same checks in an empty one
        _convert_killed_then_under_lock(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is a GPU-only extra, not installed here")
def test_vllm_backend_matches_contract(tiny_model_dir):
    import vllm  # noqa: F401

    backend = rollout.make_backend(
        "vllm", tiny_model_dir, "cuda", gpu_memory_utilization=0.2, max_model_len=512, enable_sleep_mode=True
    )
    backend.sleep_level = 2
    prompts = [rollout.chat_prompt(backend.tokenizer, "What is 1 + 1?")]
    params = rollout.SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=0)
    out = rollout.generate(backend, prompts, params)
    assert len(out) == 2 and all(len(s.logprobs) == len(s.response_ids) for s in out)
    rollout.sleep_engine(backend)
    rollout.push_weights_to_vllm(backend, rollout.load_model(tiny_model_dir, "auto", "cuda")[0])
    assert len(rollout.generate(backend, prompts, params)) == 2


RUN_MAIN_WORKER = """
import atexit, sys, torch, torch.distributed as dist
import rollout

def job():
    rank, _, world, _ = rollout.init_distributed()
    total = torch.ones(1)
    dist.all_reduce(total)
    atexit.register(lambda: open(f"{sys.argv[1]}.atexit{rank}", "w").close())
    sys.stdout.write(f"rank {rank} of {world}: {total.item():.0f}\\n")  # to a pipe: buffered, lost unless flushed
    if sys.argv[2] == "bad":
        raise ValueError("--lr must be positive")

rollout.run_script(lambda: rollout.run_main(job))
"""


@pytest.mark.parametrize("case", ["good", "bad"])
def test_a_distributed_script_ends_without_the_interpreters_shutdown(tmp_path, case):
    """Under 2 ranks a script's entry point (run_script over run_main) destroys the group and ends the process with
    os._exit: the interpreter's shutdown, where a gloo worker still freeing a collective's tensors aborts the
    process, never runs (an atexit handler is skipped), yet the job's output arrives. A bad input ends in
    "error: ..." and status 1 all the same. (In-process tests call main() alone, and pytest lives on.)"""
    (tmp_path / "w.py").write_text(RUN_MAIN_WORKER)
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout as a user's run has it
    p = subprocess.run(
        [*LAUNCH2, str(tmp_path / "w.py"), str(tmp_path / "mark"), case],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**buffered, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert p.returncode == (1 if case == "bad" else 0), p.stderr[-2000:]
    assert sorted(p.stdout.splitlines()) == ["rank 0 of 2: 2", "rank 1 of 2: 2"]
    assert p.stderr.count("error: --lr must be positive") == (2 if case == "bad" else 0)
    assert not list(tmp_path.glob("mark.atexit*"))


# ============================================================================================
# evaluate.py: the benchmarks, Sec. 3's selection, Table 1 and Table 2's sets
# ============================================================================================
def test_evaluation_grades_the_answer_part(embedded_tokenizer, monkeypatch):
    """score_problems (evaluate.py and the trainers' evaluation) grades what follows the think pair."""
    texts = ["<think>\\boxed{4}</think> so it is four", "<think>\\boxed{3}</think> so \\boxed{4}", "just \\boxed{4}"]
    monkeypatch.setattr(
        rollout,
        "generate",
        lambda backend, prompts, params, progress=True, indices=None: [
            rollout.Sample(0, [], [1], t, "stop", [0.0]) for t in texts
        ],
    )
    (record,) = evaluate.score_problems(
        rollout.Backend("hf", embedded_tokenizer),
        [dict(id="p", question="q", answer="4")],
        rollout.SamplingParams(n=3),
        {},
        progress=False,
    )
    assert record["scores"] == [0.0, 1.0, 1.0] and record["responses"] == texts


def test_pass_at_k_against_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert evaluate.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert evaluate.pass_at_k(16, 3, 1) == pytest.approx(3 / 16)
    with pytest.raises(ValueError):
        evaluate.pass_at_k(4, 1, 5)


def test_summarize_by_hand():
    recs = [
        dict(
            scores=[1.0, 0.0, 0.0, 0.0],
            lengths=[10, 20, 30, 40],
            epistemic=[0, 1, 2, 3],
            finish_reasons=["stop", "stop", "length", "stop"],
        ),
        dict(scores=[1.0, 1.0, 0.0, 1.0], lengths=[5, 5, 5, 5], epistemic=[0, 0, 0, 0], finish_reasons=["stop"] * 4),
    ]
    s = evaluate.summarize(recs, [1, 2, 4])
    assert s["acc"] == 4 / 8 and s["length"] == 120 / 8 and s["epistemic"] == 6 / 8 and s["truncated"] == 1 / 8
    # pass@2: problem 1: 1 - C(3,2)/C(4,2) = 1/2; problem 2: 1 - 0 = 1
    assert s["pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2) and s["pass@2"] == pytest.approx(0.75)
    assert s["pass@4"] == 1.0


def _fails(capsys, script, *argv, **kw) -> str:
    """The message `script argv` exits with (run in this process, `_main_in_process(**kw)`), and its stderr."""
    with pytest.raises(SystemExit) as e:
        _main_in_process(script, *argv, **kw)
    assert e.value.code not in (0, None)
    return f"{e.value.code}\n{capsys.readouterr().err}"


def test_evaluate_cli_bad_input(tmp_path, capsys):
    def fails(*flags):
        return _fails(capsys, "evaluate.py", "--out", str(tmp_path / "x"), *flags)

    assert "pass@k needs 1 <= k <= n" in fails("--n-samples", "2", "--k", "1", "4")
    assert "--max-new-tokens 0: must be > 0" in fails("--max-new-tokens", "0")
    assert "does not exist" in fails("--model", str(tmp_path / "missing-model"))
    bad = tmp_path / "noanswers.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    assert "noanswers.jsonl: row 0: missing answer" in fails("--data", str(bad))


def test_evaluate_resumes_after_kill(tiny_model_dir, tmp_path, capsys):
    probs = tmp_path / "probs.jsonl"
    probs.write_text(
        "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(6))
    )
    out = tmp_path / "ev"
    flags = [
        "--model",
        tiny_model_dir,
        "--data",
        str(probs),
        "--n-samples",
        "2",
        "--k",
        "1",
        "2",
        "--chunk",
        "2",
        "--max-new-tokens",
        "300",
        "--temperature",
        "1.0",
        "--top-k",
        "0",
        "--top-p",
        "1.0",
        "--out",
        str(out),
    ]
    p = subprocess.Popen(
        [sys.executable, "evaluate.py", *flags], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and (
        not (out / "samples.jsonl").exists() or len((out / "samples.jsonl").read_text().splitlines()) < 2
    ):
        time.sleep(0.2)
    p.kill()
    p.wait()
    before = (out / "samples.jsonl").read_text().splitlines()
    assert 2 <= len(before) < 6, "the run should have been killed midway"
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"benchmark": "probs", "id": "torn')  # a write cut by the kill
    capsys.readouterr()
    _main_in_process("evaluate.py", *flags, forced=False)
    assert f"{len(before)} already done" in capsys.readouterr().out
    after = _jsonl(out / "samples.jsonl")
    assert len(after) == 6 and len({r["id"] for r in after}) == 6
    assert [json.loads(line) for line in before] == after[: len(before)]  # finished problems were kept, not redone
    summary = json.loads((out / "summary.json").read_text())["probs"]
    assert summary["problems"] == 6 and summary["samples"] == 12
    assert summary["acc"] == pytest.approx(sum(sum(r["scores"]) for r in after) / 12)


def test_evaluate_torchrun_two_ranks(tiny_model_dir, tmp_path):
    flags = [
        "--model",
        tiny_model_dir,
        "--data",
        "synthetic:types=add,n=5",
        "--n-samples",
        "2",
        "--k",
        "1",
        "2",
        "--max-new-tokens",
        "8",
        "--chunk",
        "2",
        "--out",
        str(tmp_path),
    ]
    run(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "evaluate.py",
        *flags,
        env={"OMP_NUM_THREADS": "1"},
    )
    rows = _jsonl(tmp_path / "samples.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(p["id"] for p in data.load_problems("synthetic:types=add,n=5"))
    assert all(len(r["scores"]) == 2 for r in rows)


def test_evaluate_cli_embedded_model(tmp_path, capsys):
    _main_in_process(
        "evaluate.py",
        "--data",
        "synthetic:split=ood,n=2",
        "--n-samples",
        "2",
        "--k",
        "1",
        "2",
        "--max-new-tokens",
        "8",
        "--out",
        str(tmp_path),
        forced=False,
    )
    out = capsys.readouterr().out
    assert re.search(r"\| synthetic:split=ood,n=2 \| 2\s+\|", out)
    assert json.loads((tmp_path / "summary.json").read_text())["synthetic:split=ood,n=2"]["samples"] == 4


def test_select_and_table1_by_hand(digit_model_dir, tmp_path, capsys):
    """`evaluate.py select` reads the problems in file order, two at a time, and keeps those with 1 to 3 correct of
    3 samples, each with its first correct sample as s: the first 3 of them, or on two ranks the first 1 (stopping
    after the chunk that fills the quota). Table 1 on a file of all four problems with s given: settings (2)-(4)
    carry the released hint, y_r is the first correct response under c = s or else the first, and each row is
    the mean of its samples."""
    sel = [
        "--model",
        digit_model_dir,
        "--data",
        _digit_problems(tmp_path),
        "--n-samples",
        "3",
        "--min-correct",
        "1",
        "--max-correct",
        "3",
        "--chunk",
        "2",
        "--max-new-tokens",
        "6",
        "--lenient",
    ]
    _main_in_process("evaluate.py", "select", *sel, "--keep", "3", "--out", str(tmp_path / "sel"))
    run(
        *_worker_command(
            tmp_path, LAUNCH2, "evaluate.py", "select", *sel, "--keep", "1", "--out", str(tmp_path / "sel2")
        ),
        env={"OMP_NUM_THREADS": "1"},
    )
    samples = _jsonl(tmp_path / "sel" / "samples.jsonl")
    correct = {}
    for r in samples:
        assert r["score"] == _correct_by_hand(r["response"], DIGIT_PROBLEMS[r["index"]]["answer"])
        correct.setdefault(r["index"], []).extend([r["response"]] if r["score"] else [])
    assert [len([r for r in samples if r["index"] == i]) for i in sorted(correct)] == [3] * 4
    want = [i for i in sorted(correct) if 1 <= len(correct[i]) <= 3][:3]
    assert len(want) == 3 and want != [0, 1, 2]  # the band left a problem out
    selected = _jsonl(tmp_path / "sel" / "selected.jsonl")
    assert [s["question"] for s in selected] == [DIGIT_PROBLEMS[i]["question"] for i in want]
    assert [s["solution"] for s in selected] == [correct[i][0] for i in want]
    assert (tmp_path / "sel2" / "selected.jsonl").read_text().splitlines() == (
        tmp_path / "sel" / "selected.jsonl"
    ).read_text().splitlines()[:1]  # two ranks, the same first pick
    assert {r["index"] for r in _jsonl(tmp_path / "sel2" / "samples.jsonl")} < {0, 1, 2, 3}  # stopped early

    given = tmp_path / "given.jsonl"  # every problem, s = a think block, then its answer: s\think is the answer
    given.write_text(
        "".join(
            json.dumps(
                dict(
                    question=p["question"],
                    answer=p["answer"],
                    solution=f"<think>Wait, {p['answer']}?</think>\n {p['answer']}",
                )
            )
            + "\n"
            for p in DIGIT_PROBLEMS
        )
    )
    selected = _jsonl(given)
    _main_in_process(
        "evaluate.py",
        "table1",
        "--model",
        digit_model_dir,
        "--setting",
        "all",
        "--data",
        str(given),
        "--n-samples",
        "3",
        "--max-new-tokens",
        "6",
        "--lenient",
        "--out",
        str(tmp_path / "t1"),
    )
    out = capsys.readouterr().out
    rows = _jsonl(tmp_path / "t1" / "samples.jsonl")
    table, md = json.loads((tmp_path / "t1" / "table.json").read_text()), (tmp_path / "t1" / "table.md").read_text()
    ids = {f"given-{k}": s for k, s in enumerate(selected)}
    by = {s: [r for r in rows if r["setting"] == s] for s in evaluate.SETTINGS}
    for r in rows:
        assert r["score"] == _correct_by_hand(r["response"], r["answer"])
    first = {}  # y_r: the first correct response under c = s, else the first
    for r in by["solution"]:
        first.setdefault(r["id"], r["response"])
    y_r = {i: next((r["response"] for r in by["solution"] if r["id"] == i and r["score"]), first[i]) for i in first}
    assert any(not any(r["score"] for r in by["solution"] if r["id"] == i) for i in first)  # a y_r fell back

    def hint(q, c):
        return f"{data.format_prompt(q)}\n\nCorrect solution: {c}\n\nCorrectly solve the original question."

    s_of = {i: s["solution"] for i, s in ids.items()}
    no_think = {i: s["answer"] for i, s in ids.items()}  # the pair and the whitespace after it removed
    for setting, given, context in (
        ("unguided", {i: None for i in ids}, lambda q, c: data.format_prompt(q)),
        ("solution", s_of, hint),
        ("solution-no-think", no_think, hint),
        ("regenerated", y_r, hint),
        ("uncertainty", s_of, lambda q, c: rollout.reprompt(q, c, template="uncertainty")),
    ):
        assert sorted({r["id"] for r in by[setting]}) == sorted(ids) and len(by[setting]) == 3 * len(ids)
        assert all(r["context"] == context(ids[r["id"]]["question"], given[r["id"]]) for r in by[setting])
        n = len(by[setting])
        assert table[setting] == pytest.approx(
            dict(
                samples=n,
                score=sum(r["score"] for r in by[setting]) / n,
                length=sum(r["length"] for r in by[setting]) / n,
                epistemic=sum(r["response"].count("Wait") for r in by[setting]) / n,
            )
        )
        cells = next(
            c
            for c in ([x.strip() for x in line.split("|")[1:-1]] for line in md.splitlines())
            if c[0] == evaluate.SETTING_NAMES[setting]
        )
        assert cells[1:3] == [f"{len(ids)}/{len(ids)}", f"{table[setting]['score']:.2f}"]
        assert evaluate.SETTING_NAMES[setting] in out


def _selected(path, problems):
    """An `evaluate.py select` output: question, answer, solution (s) per problem."""
    path.write_text(
        "".join(
            json.dumps(dict(id=f"p{i}", question=q, answer=a, solution=s)) + "\n"
            for i, (q, a, s) in enumerate(problems)
        )
    )
    return str(path)


def test_build_sets_as_released(tmp_path, monkeypatch, embedded_tokenizer):
    """Table 2's sets as make_sft_dataset.py builds them, by construction (the samples are given): D_ug is each
    selected problem's s; D_sg each problem's FIRST correct response under c = s (Table 1's hint prompt), none for a
    problem without one; a problem without s is in neither."""
    selected = _selected(
        tmp_path / "selected.jsonl",
        [
            ("What is 1 + 1?", "2", "s0 \\boxed{2}"),
            ("What is 2 + 2?", "4", "s1 \\boxed{4}"),
            ("What is 3 + 3?", "6", None),
            ("What is 4 + 4?", "8", "s3"),
        ],
    )
    drawn = {0: ["\\boxed{3}", "A \\boxed{2}", "B \\boxed{2}"], 1: ["\\boxed{5}"] * 3, 2: ["x", "y", "C \\boxed{8}"]}
    seen = {}

    def generate(backend, prompts, params, **kw):
        seen.update(prompts=prompts, params=params, indices=list(kw["indices"]))
        return [
            rollout.Sample(i, [1], [2] * (k + 1), t, "stop")
            for i in range(len(prompts))
            for k, t in enumerate(drawn[i])
        ]

    monkeypatch.setattr(rollout, "make_backend", lambda *a, **kw: rollout.Backend("hf", embedded_tokenizer))
    monkeypatch.setattr(rollout, "generate", generate)
    monkeypatch.setattr(rollout, "load_tokenizer", lambda *a: embedded_tokenizer)
    for setting in ("unguided", "solution"):
        evaluate.build(
            evaluate.BuildArgs(setting=setting, data=selected, n_samples=3, out=str(tmp_path / f"{setting}.jsonl"))
        )
    ug = _jsonl(tmp_path / "unguided.jsonl")
    sg = _jsonl(tmp_path / "solution.jsonl")
    assert [(r["id"], r["response"]) for r in ug] == [
        ("selected-0", "s0 \\boxed{2}"),
        ("selected-1", "s1 \\boxed{4}"),
        ("selected-3", "s3"),
    ]
    assert [(r["id"], r["response"], r["length"]) for r in sg] == [
        ("selected-0", "A \\boxed{2}", 2),
        ("selected-3", "C \\boxed{8}", 3),
    ]
    hint = (
        "What is 1 + 1?\nPlease reason step by step, and put your final answer within \\boxed{}.\n\nCorrect solution: "
        "s0 \\boxed{2}\n\nCorrectly solve the original question."
    )
    assert sg[0]["context"] == hint and seen["prompts"][0] == rollout.chat_prompt(embedded_tokenizer, hint)
    assert ug[0]["context"] == data.format_prompt("What is 1 + 1?") and ug[0]["setting"] == "unguided"
    p = seen["params"]
    assert (p.n, p.temperature, p.top_p, p.top_k, seen["indices"]) == (3, 0.6, 0.95, 20, [0, 1, 2])
    with pytest.raises(ValueError, match="no problem has a `solution`"):
        evaluate.build(
            evaluate.BuildArgs(data=_selected(tmp_path / "none.jsonl", [("q", "1", None)]), out=str(tmp_path / "x"))
        )


def test_build_runs_on_the_digit_model(digit_model_dir, tmp_path):
    """`evaluate.py build` end to end under the tests' sampler (the same draws on every CPU): D_sg holds at most one
    response per problem, each correct, with its marker count, and it is valid SFT input."""
    selected = _selected(
        tmp_path / "selected.jsonl",
        [(p["question"], p["answer"], p.get("solution", p["answer"])) for p in DIGIT_PROBLEMS],
    )
    out = tmp_path / "d_sg.jsonl"
    _main_in_process(
        "evaluate.py",
        "build",
        "--model",
        digit_model_dir,
        "--data",
        selected,
        "--n-samples",
        "4",
        "--lenient",
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
    )
    rows = _jsonl(out)
    assert 0 < len(rows) == len({r["id"] for r in rows}) <= 4  # at most one per problem
    for r in rows:
        assert _correct_by_hand(r["response"], r["answer"]) == 1.0 and r["setting"] == "solution"
        assert r["epistemic"] == epistemic.epistemic_count(r["response"])
    assert len(sft.read_sft_rows(out)) == len(rows)  # and it is valid SFT input


EVALUATE_WORKER = (
    """import json, math, sys
import torch
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
import data, evaluate, rollout
"""
    + FORCED_DRAW
    + """
rollout.sample_tokens = forced_draw  # the same samples on every CPU
rollout.native_bf16 = lambda device: False  # --dtype auto: fp32 on every CPU, as in the tests' process
rank, _, world, _ = rollout.init_distributed()
model, tok = rollout.load_model(sys.argv[2])
problems = data.load_problems(sys.argv[3])
benches = {"all": problems, "three": problems[:3]}
params = rollout.SamplingParams(n=3, max_new_tokens=5, seed=7)
backend = rollout.Backend("hf", tok, model=model, batch_size=4)
summary = evaluate.evaluate(backend, benches, params, ks=(1, 2), lenient=True)
records = evaluate.score_problems(rollout.Backend("hf", tok, model=model), problems, params, {}, False, True)
three = evaluate.score_problems(rollout.Backend("hf", tok, model=model), problems[:3], params, {}, False, True,
                                indices=[4, 5, 6])  # numbered after "all"'s four: seeded by place across benchmarks
if rank == 0:
    open(sys.argv[4], "w").write(json.dumps(dict(summary=summary, records=records, three=three)))
if dist.is_initialized():
    dist.barrier()  # every rank done before any closes the group
    dist.destroy_process_group()
    rollout.end_process(0)
"""
)


# ============================================================================================
# sft.py
# ============================================================================================
import sft


def _sft_file(path, n=6):
    rows = [
        {"question": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}. The answer is \\boxed{{{2 * i}}}."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_rows_bad_input(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question": "q", "response": "r"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 1: missing field 'response'"):
        sft.read_sft_rows(p)
    p.write_text(json.dumps({"question": "q", "response": "  "}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 0: empty 'response'"):
        sft.read_sft_rows(p)
    data_file, out = str(_sft_file(tmp_path / "d.jsonl")), str(tmp_path / "none")
    assert "--resume: no complete checkpoint" in _fails(
        capsys, "sft.py", "--data", data_file, "--out", out, "--resume"
    )


def test_lr_schedule_and_data_order():
    assert [sft.lr_at(s, 1e-5, 10) for s in (0, 1, 4, 9, 10, 50)] == pytest.approx([0, 1e-6, 4e-6, 9e-6, 1e-5, 1e-5])
    assert [sft.lr_at(s, 1e-5, 0) for s in (0, 3)] == [1e-5, 1e-5] and sft.lr_at(0, 1e-5, 1) == 0.0
    order = [i for s in range(3) for i in sft.rows_for_step(5, s, 5, seed=0)]
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))  # each epoch is a permutation
    assert order == [i for s in range(3) for i in sft.rows_for_step(5, s, 5, seed=0)]
    assert sft.rows_for_step(5, 1, 5, seed=0) != sft.rows_for_step(5, 1, 5, seed=1)


def test_sft_loss_masks_the_prompt(tiny):
    model, tok = tiny
    rows = [{"question": "What is 1 + 1?", "response": "2"}, {"question": "Say hi", "response": "hi there, friend"}]
    enc = [sft.tokenize_sft(tok, r, 512, {}) for r in rows]
    for r, (ids, mask) in zip(rows, enc):
        n_resp = len(tok(r["response"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
        assert sum(mask) == n_resp and mask[-n_resp:] == [1] * n_resp and ids[-1] == tok.eos_token_id
    nll, count = sft.token_nll(model, [e[0] for e in enc], [e[1] for e in enc], tok.pad_token_id, "cpu")
    # independently: one unpadded sequence at a time, summing log-probs of the response tokens
    ref, ref_count = 0.0, 0
    for ids, mask in enc:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for t in range(1, len(ids)):
            if mask[t]:
                ref -= lp[t - 1, ids[t]].item()
                ref_count += 1
    assert count == ref_count and nll.item() == pytest.approx(ref, rel=1e-5)


def test_fused_adamw_matches_the_textbook_update():
    """sft.make_optimizer (fused AdamW) against AdamW written out by hand, over 3 steps with weight decay."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    start = [p.detach().clone() for p in model.parameters()]
    opt = sft.make_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"]
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]
    for g in grads:
        for p, gi in zip(model.parameters(), g):
            p.grad = gi.clone()
        opt.step()
    for i, w in enumerate(start):  # decoupled weight decay, bias-corrected moments (Loshchilov & Hutter)
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        for t, g in enumerate(grads, start=1):
            w = w * (1 - 1e-2 * 0.1)
            m, v = 0.9 * m + 0.1 * g[i], 0.999 * v + 0.001 * g[i] ** 2
            w = w - 1e-2 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        assert torch.allclose(list(model.parameters())[i], w, atol=1e-6), i


def _train(tiny_model_dir, data_path, out, *extra, torchrun=False):
    argv = [
        "--model",
        tiny_model_dir,
        "--data",
        str(data_path),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--dtype",
        "float32",  # under torchrun too, where the tests' fp32 default is not patched in: on any CPU
        *extra,
    ]
    if torchrun:
        run(*LAUNCH2, "sft.py", *argv, env={"OMP_NUM_THREADS": "1"})
    else:
        _main_in_process("sft.py", *argv)
    return _jsonl(Path(out) / "metrics.jsonl")


def test_sft_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    d = _sft_file(tmp_path / "d.jsonl")
    straight = _train(tiny_model_dir, d, tmp_path / "a", "--steps", "6", "--save-every", "3")
    _train(tiny_model_dir, d, tmp_path / "b", "--steps", "3", "--save-every", "3")
    (tmp_path / "b" / "metrics.jsonl").write_text(  # a row the killed run logged after its last checkpoint
        (tmp_path / "b" / "metrics.jsonl").read_text() + json.dumps({"step": 4, "loss": 9.9}) + "\n"
    )
    resumed = _train(tiny_model_dir, d, tmp_path / "b", "--steps", "6", "--save-every", "3", "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    from safetensors.torch import load_file

    wa, wb = (
        load_file(tmp_path / "a" / "step_6" / "model.safetensors"),
        load_file(tmp_path / "b" / "step_6" / "model.safetensors"),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sft_one_and_two_processes_equal_the_gradient_by_hand(tiny_model_dir, tmp_path):
    """The first SFT step under SGD at lr 1, on one process and on two (two micro-batches of 2 rows, or one per
    rank): the loss, gradient norm and gradient are the token mean of the response tokens' NLL, by hand."""
    d = _sft_file(tmp_path / "d.jsonl")
    argv = [
        "--model",
        tiny_model_dir,
        "--data",
        str(d),
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--steps",
        "1",
    ]
    _main_in_process("sft.py", *argv, "--out", str(tmp_path / "one"), sgd=True)
    run(
        *_worker_command(tmp_path, LAUNCH2, "sft.py", *argv, "--out", str(tmp_path / "two"), sgd=True),
        env={"OMP_NUM_THREADS": "1"},
    )
    model, tok = rollout.load_model(tiny_model_dir)
    rows = _jsonl(d)
    batch = [sft.tokenize_sft(tok, rows[i], 2048, {}) for i in sft.rows_for_step(len(rows), 0, 4, 0)]
    n = sum(sum(mask[1:]) for _, mask in batch)

    def nll(m):
        total = 0.0
        for ids, mask in batch:
            logp = torch.log_softmax(m(torch.tensor([ids])).logits[0, :-1].double(), -1)
            total = total - (logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0] * torch.tensor(mask[1:])).sum()
        return total / n

    loss, grads = _grads_by_hand(tiny_model_dir, nll)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    for name in ("one", "two"):
        (m,) = [r for r in _jsonl(tmp_path / name / "metrics.jsonl") if "step" in r]
        assert m["tokens"] == n and m["loss"] == pytest.approx(loss, rel=1e-5)
        assert m["grad_norm"] == pytest.approx(norm, rel=1e-5)
        _assert_same_gradient(
            _gradient_from_sgd_step(tiny_model_dir, tmp_path / name), grads, weights=_weights(tiny_model_dir)
        )


def test_sft_save_every_0_writes_no_checkpoint(tiny_model_dir, tmp_path, capsys):
    """--save-every 0 means never, in sft.py as in the RL trainers (it divided by zero)."""
    rows = _train(tiny_model_dir, _sft_file(tmp_path / "d.jsonl"), tmp_path / "o", "--steps", "1", "--save-every", "0")
    assert [r["step"] for r in rows] == [1] and not list((tmp_path / "o").glob("step_*"))
    assert "checkpoint: none (--save-every 0)" in capsys.readouterr().out


def test_sft_killed_mid_run_resumes_from_last_complete(tiny_model_dir, tmp_path):
    d = _sft_file(tmp_path / "d.jsonl")
    cmd = [
        sys.executable,
        "sft.py",
        "--model",
        tiny_model_dir,
        "--data",
        str(d),
        "--out",
        str(tmp_path / "k"),
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--steps",
        "400",
        "--save-every",
        "1",
    ]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "k").glob("step_*"))) < 3:
        time.sleep(0.05)
    p.kill()  # at an arbitrary moment, quite possibly mid-save
    p.wait()
    last = sft.latest_checkpoint(tmp_path / "k")
    assert last is not None
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(last)
    step = int(last.name[5:])
    metrics = _train(tiny_model_dir, d, tmp_path / "k", "--steps", str(step + 2), "--save-every", "1", "--resume")
    assert [r["step"] for r in metrics] == list(range(1, step + 3))


def test_sft_trains_and_checkpoint_generates(tiny_model_dir, tmp_path):
    d = _sft_file(tmp_path / "d.jsonl", n=4)
    _main_in_process(
        "sft.py",
        "--model",
        tiny_model_dir,
        "--data",
        str(d),
        "--out",
        str(tmp_path / "e"),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--micro-batch",
        "4",
        "--warmup",
        "0",
        "--lr",
        "1e-3",
        "--save-every",
        "3",
    )
    losses = [r["loss"] for r in _jsonl(tmp_path / "e" / "metrics.jsonl")]
    assert losses[0] > losses[1] > losses[2]  # the same 4 rows every step: the loss must fall
    model, tok = rollout.load_model(str(tmp_path / "e" / "step_3"))
    s = rollout.generate_hf(
        model,
        tok,
        [rollout.chat_prompt(tok, "What is 1 + 1?")],
        rollout.SamplingParams(max_new_tokens=8),
        progress=False,
    )
    assert len(s[0].response_ids) >= 1


def test_sft_torchrun_trains_and_checkpoint_loads(tiny_model_dir, tmp_path):
    d = _sft_file(tmp_path / "d.jsonl", n=4)
    run(
        *TORCHRUN2,
        "sft.py",
        "--model",
        tiny_model_dir,
        "--data",
        str(d),
        "--out",
        str(tmp_path / "e"),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--warmup",
        "0",
        "--lr",
        "1e-3",
        "--save-every",
        "2",
        env={"OMP_NUM_THREADS": "1"},
    )
    losses = [r["loss"] for r in _jsonl(tmp_path / "e" / "metrics.jsonl")]
    assert losses[1] < losses[0]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "e" / "step_2")


def test_periodic_evaluate_splits_and_gathers_over_ranks(digit_model_dir, tmp_path):
    """evaluate() splits the benchmarks' problems over the ranks (rank 0: places 0, 2, 4, 6, rank 1: 1, 3, 5) and
    summarises the records gathered on rank 0: two ranks give one process's summary, which is `summarize` of every
    problem's records (each problem seeded by its place across the benchmarks)."""
    (tmp_path / "ev.py").write_text(EVALUATE_WORKER)
    args = [str(tmp_path / "ev.py"), str(ROOT), digit_model_dir, _digit_problems(tmp_path)]
    run(sys.executable, *args, str(tmp_path / "one.json"), env={"OMP_NUM_THREADS": "1"})
    run(*LAUNCH2, *args, str(tmp_path / "two.json"), env={"OMP_NUM_THREADS": "1"})
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    records = one["records"]
    assert one["summary"] == two["summary"]
    assert one["summary"]["all"] == evaluate.summarize(records, [1, 2]) and one["summary"]["all"]["samples"] == 12
    assert one["summary"]["three"] == evaluate.summarize(one["three"], [1, 2])
    # the samples differ (the tests' sampler draws them alike on every CPU): a split that lost or repeated one shows
    assert 0 < one["summary"]["all"]["acc"] < 1


# ============================================================================================
# sft.py: checkpoints
# ============================================================================================


def test_checkpoint_write_failure_keeps_previous(tiny_model_dir, tmp_path, monkeypatch):
    model, tok = rollout.load_model(tiny_model_dir)
    opt = sft.make_optimizer(model, 1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    first = sft.save_checkpoint(tmp_path, 1, model, tok, opt, {"note": "ok"})
    import safetensors.torch

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="checkpoint step 2 not written"):
        sft.save_checkpoint(tmp_path, 2, model, tok, opt, {})
    assert sft.latest_checkpoint(tmp_path) == first and not (tmp_path / "step_2").exists()
    assert not list(tmp_path.glob(".step_*"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(first)  # still loads as it is
    state = sft.load_checkpoint(first, model, sft.make_optimizer(model, 1e-3))
    assert state["step"] == 1 and state["note"] == "ok"


def test_keep_checkpoints_prunes_older_complete_ones(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    (out / ".step_9.tmp").mkdir(parents=True)  # a torn write: not complete, never removed
    (out / "step_0").mkdir()  # no trainer_state.json: not complete either
    _main_in_process(
        "grpo.py",
        "--model",
        tiny_model_dir,
        *GRPO_FLAGS[2:],
        "--steps",
        "3",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "2",
        "--out",
        str(out),
        forced=False,
    )
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == [".step_9.tmp", "step_0", "step_2", "step_3"]
    for d in ("step_5", "step_6"):
        (out / d).mkdir()
        (out / d / "trainer_state.json").write_text("{}")
    sft.prune_checkpoints(out, 1)
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == [".step_9.tmp", "step_0", "step_6"]


def test_checkpoint_optimizer_shards_resume_on_another_number_of_ranks(tiny_model_dir, tmp_path):
    """Each rank writes its own rows of the AdamW state (safetensors, no pickle); a run saved on one process resumes
    on two, and one saved on two resumes on one, with the same next step as an uninterrupted run."""
    d = _sft_file(tmp_path / "d.jsonl")
    straight = _train(tiny_model_dir, d, tmp_path / "a", "--steps", "2", "--save-every", "2")
    want = _weights(tmp_path / "a" / "step_2")
    from safetensors import safe_open

    with safe_open(tmp_path / "a" / "step_2" / "optimizer" / "shard_0.safetensors", "pt") as f:
        moments = {k for k in f.keys() if k.endswith("/exp_avg")}  # noqa: SIM118 (safe_open is not iterable)
    assert len(moments) == len(want)  # every parameter's state (the tied head is one parameter)
    for name, first, second in (("one_then_two", 1, 2), ("two_then_one", 2, 1)):
        metrics, got = _resume_across(tiny_model_dir, tmp_path, name, first, second)
        assert [r["step"] for r in metrics] == [1, 2]
        for a, b in zip(straight, metrics):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(
                a["grad_norm"], rel=1e-4
            )
        for k in want:
            assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k
    with safe_open(tmp_path / "two_then_one" / "step_1" / "optimizer" / "shard_1.safetensors", "pt") as f:
        rows = {k: f.get_slice(k).get_shape() for k in f.keys() if k.endswith("/exp_avg")}  # noqa: SIM118
    assert all(shape[0] <= -(-want[k.rpartition("/")[0]].shape[0] // 2) for k, shape in rows.items())  # half each


# ============================================================================================
# grpo.py
# ============================================================================================
import grpo


def test_group_advantages_by_hand():
    a = grpo.group_advantages([1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0], 4)
    assert a.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 0.25, 0.25, 0.25, -0.75])
    s = grpo.group_advantages([1, 0, 0, 1], 4, norm_std=True)  # unbiased std of {1,0,0,1} = sqrt(1/3)
    x = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert s.tolist() == pytest.approx([x, -x, -x, x])
    assert grpo.group_advantages([1, 1, 1, 1], 4, norm_std=True).tolist() == [0, 0, 0, 0]  # degenerate group


def test_policy_loss_every_branch_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 0.5, 4.0, 1.1, 7.0]])
    old = torch.zeros(1, 6)
    logp = torch.log(ratio)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    loss, m = grpo.policy_loss(logp, old, adv, mask)
    # +A ratio 1.5 -> clip high: -1.28 | +A ratio 0.5 -> unclipped: -0.5 | -A ratio 0.5 -> clip low: 0.8
    # -A ratio 4 -> dual clip: 3.0 | -A ratio 1.1 -> 1.1 | masked token ignored
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 3.0 + 1.1) / 5, abs=1e-6)
    assert m["clip_frac_high"] == pytest.approx(1 / 5) and m["clip_frac_low"] == pytest.approx(1 / 5)
    assert m["clip_frac_dual"] == pytest.approx(1 / 5)
    w = torch.tensor([[2.0, 1.0, 1.0, 0.5, 1.0, 1.0]])  # rollout IS weights multiply each token's term
    loss_w, _ = grpo.policy_loss(logp, old, adv, mask, is_weight=w, token_count=10)
    assert loss_w.item() == pytest.approx((-2.56 - 0.5 + 0.8 + 1.5 + 1.1) / 10, abs=1e-6)
    lossb, _ = grpo.policy_loss(logp, old, adv[:, 0] * 0 + 1, mask)  # (B,) advantages broadcast over tokens
    assert lossb.item() == pytest.approx((-1.28 - 0.5 - 0.5 - 1.28 - 1.1) / 5, abs=1e-6)


def test_loss_aggregation_by_hand():
    """Rows of 3 and 1 tokens, per-token losses 1, 2, 3 and 4 (ratio 1, A = -loss): token-mean weighs each token
    1/4; seq-mean-token-mean each row 1/2, so (2 + 4) / 2; with 4 sequences in the mini-batch (2 elsewhere), / 4."""
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    per = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])  # the 9s are padding
    lp = torch.zeros(2, 3)

    def loss(**kw):
        return grpo.policy_loss(lp, lp, -per, mask, **kw)[0].item()

    assert loss() == loss(loss_agg="token-mean") == pytest.approx(10 / 4)
    assert loss(loss_agg="seq-mean-token-mean") == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert loss(loss_agg="seq-mean-token-mean", seq_count=4) == pytest.approx((6 / 3 + 4 / 1) / 4)
    assert loss(token_count=8) == pytest.approx(10 / 8)
    assert grpo.loss_denominator(mask, "seq-mean-token-mean", seq_count=4).flatten().tolist() == [12.0, 4.0]
    with pytest.raises(ValueError, match="--loss-agg 'x'"):
        grpo.loss_denominator(mask, "x")


def test_policy_gradient_matches_analytic():
    torch.manual_seed(0)
    theta = torch.randn(5, requires_grad=True)  # a one-step softmax policy over 5 tokens
    y = torch.tensor([0, 3, 3, 1, 4, 2])
    A = torch.tensor([0.7, -0.2, -0.2, 0.5, -0.9, 0.1])
    logp = torch.log_softmax(theta, -1)[y][None]  # (1, 6)
    loss, _ = grpo.policy_loss(logp, logp.detach(), A[None], torch.ones(1, 6))  # on-policy: ratio 1, no clipping
    loss.backward()
    p = torch.softmax(theta.detach(), -1)
    analytic = -sum(A[t] * (torch.nn.functional.one_hot(y[t], 5) - p) for t in range(6)) / 6
    assert torch.allclose(theta.grad, analytic, atol=1e-6)
    # a clipped token (A > 0, ratio past 1 + 0.28) contributes no gradient
    theta.grad = None
    lp = torch.log_softmax(theta, -1)[y][None]
    old = lp.detach().clone()
    old[0, 0] -= 1.0  # ratio e > 1.28 on token 0
    grpo.policy_loss(lp, old, A[None], torch.ones(1, 6))[0].backward()
    analytic = -sum(A[t] * (torch.nn.functional.one_hot(y[t], 5) - p) for t in range(1, 6)) / 6
    assert torch.allclose(theta.grad, analytic, atol=1e-6)


def test_k3_kl_by_hand():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    assert grpo.k3_kl(lp, ref).tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, 0.0])


def test_trainer_logprobs_match_rollout_logprobs(tiny):
    model, tok = tiny
    prompts = [rollout.chat_prompt(tok, q) for q in ("a", "longer prompt here")]
    samples = rollout.generate_hf(
        model, tok, prompts, rollout.SamplingParams(n=2, temperature=0.8, max_new_tokens=12), progress=False
    )
    logp, mask, ent = grpo.token_logprobs(
        model, [(s.prompt_ids, s.response_ids) for s in samples], tok.pad_token_id, 0.8, "cpu", with_entropy=True
    )
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        assert mask[i].sum() == n and torch.allclose(logp[i, :n], torch.tensor(s.logprobs), atol=1e-4)
    assert (ent[mask.bool()] > 0).all()


def _rows(tok, n, reward_fn, adv=None):
    rows = []
    for i in range(n):
        p = tok(rollout.chat_prompt(tok, f"q{i}"), add_special_tokens=False)["input_ids"]
        r = [100 + i, 200, 300][: 1 + i % 3]
        rows.append(dict(prompt_ids=p, response_ids=r, rollout_logprobs=[-5.0] * len(r), reward=reward_fn(i)))
    a = grpo.group_advantages([r["reward"] for r in rows], 4) if adv is None else adv
    for r, x in zip(rows, a.tolist() if hasattr(a, "tolist") else a):
        r["advantage"] = x
    return rows


def test_train_on_rollouts_edge_cases(tiny_model_dir):
    model, tok = rollout.load_model(tiny_model_dir)
    args = grpo.Args(rollouts=4, micro_batch=3, lr=1e-3, warmup=1)
    opt = sft.make_optimizer(model, 1e-3)
    # degenerate groups (all right / all wrong): zero advantage, zero loss and gradient
    m = grpo.train_on_rollouts(model, opt, _rows(tok, 8, lambda i: float(i < 4)), args, 1, "cpu", tok.pad_token_id)
    assert m["loss"] == 0.0 and m["grad_norm"] == 0.0
    # an empty response and a NaN advantage: the update is skipped and the weights are kept
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = _rows(tok, 4, lambda i: float(i % 2))
    rows[0]["response_ids"], rows[0]["rollout_logprobs"] = [], []
    rows[1]["advantage"] = float("nan")
    m = grpo.train_on_rollouts(model, opt, rows, args, 1, "cpu", tok.pad_token_id)
    assert m["nonfinite_updates"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a normal step with an empty response among the rows moves the weights
    rows = _rows(tok, 4, lambda i: float(i % 2))
    rows[2]["response_ids"], rows[2]["rollout_logprobs"] = [], []
    m = grpo.train_on_rollouts(model, opt, rows, args, 1, "cpu", tok.pad_token_id)
    assert m["nonfinite_updates"] == 0 and m["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # off-policy path (two epochs): pi_old is taken before the first update
    m = grpo.train_on_rollouts(
        model,
        opt,
        _rows(tok, 4, lambda i: float(i % 2)),
        grpo.Args(rollouts=4, micro_batch=2, ppo_epochs=2),
        1,
        "cpu",
        tok.pad_token_id,
    )
    assert m["grad_norm"] > 0


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_memory_windows():
    """400 MB mapped from the kernel and touched, then unmapped (an anonymous mmap: malloc keeps what it frees,
    `rollout.keep_freed_memory`): the window that held them peaks 0.35 GB above the next."""
    import mmap

    sft.peak_memory_gb("cpu")  # a new window
    with mmap.mmap(-1, 400 << 20) as m:
        for _ in range(400):  # 1 MB at a time: no 400 MB Python object
            m.write(b"\1" * (1 << 20))
    big = sft.peak_memory_gb("cpu")
    small = sft.peak_memory_gb("cpu")  # the 400 MB are unmapped: this window's peak is the resident set now
    assert big - small > 0.35


def test_length_sorted_micro_batches_keep_the_gradient(tiny_model_dir, monkeypatch):
    # by_length reorders an update's rows; sorted micro-batches of 3 give the update of one unsorted batch of 8,
    # and so do packed micro-batches (pack_tokens: a prompt's rollouts share one copy of it in a row)
    model, tok = rollout.load_model(tiny_model_dir)
    rows = _rows(tok, 8, lambda i: float(i % 2))
    assert [len(r["response_ids"]) for r in fast.by_length(rows)] == [3, 3, 2, 2, 2, 1, 1, 1]
    for i, r in enumerate(rows):  # two groups of 4 rollouts: rows 0-3 ask q0, rows 4-7 ask q4
        r["prompt_ids"] = rows[i - i % 4]["prompt_ids"]
    w0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def update(micro, pack):  # one SGD step (lr 1) on a copy: the weight change is the clipped gradient
        m = copy.deepcopy(model)
        out = grpo.train_on_rollouts(
            m,
            torch.optim.SGD(m.parameters(), lr=1.0),
            [dict(r) for r in rows],
            grpo.Args(rollouts=4, micro_batch=micro, pack_tokens=pack),
            1,
            "cpu",
            tok.pad_token_id,
        )
        return torch.cat([p.detach().flatten() for p in m.parameters()]) - w0, out["loss"]

    d3, l3 = update(3, 0)
    d3p, l3p = update(3, 2048)  # micro-batches split the groups: rows of 3, then 1 + 2, then 2 rollouts
    monkeypatch.setattr(fast, "by_length", lambda rows, **_: rows)  # the straightforward order
    d8, l8 = update(8, 0)
    scale = float(d8.abs().max())
    for d, loss in ((d3, l3), (d3p, l3p)):
        assert scale > 0 and float((d - d8).abs().max()) < 1e-5 * scale and abs(loss - l8) < 1e-6


def test_rows_with_gradient_fills_to_the_largest_rank_by_hand(monkeypatch):
    rows = [dict(i=i) for i in range(8)]

    def live(r):
        return r["i"] in (1, 4)

    assert [r["i"] for r in fast.rows_with_gradient(rows, live, 3)] == [1, 4]  # one process: no filler
    # another rank needs 2 micro-batches of 3: 4 rows here, the 2 fillers from the end (the shortest); 3: 7 rows
    monkeypatch.setattr(fast, "all_reduce_max", lambda x: max(x, 2))
    assert [r["i"] for r in fast.rows_with_gradient(rows, live, 3)] == [1, 4, 6, 7]
    monkeypatch.setattr(fast, "all_reduce_max", lambda x: max(x, 3))
    assert [r["i"] for r in fast.rows_with_gradient(rows, live, 3)] == [1, 2, 3, 4, 5, 6, 7]
    monkeypatch.setattr(fast, "all_reduce_max", lambda x: max(x, 1))  # nothing live here, one micro-batch elsewhere
    assert [r["i"] for r in fast.rows_with_gradient(rows, lambda r: False, 3)] == [7]
    monkeypatch.setattr(fast, "all_reduce_max", lambda x: x)
    assert fast.rows_with_gradient(rows, lambda r: False, 3) == []
    # packed rows: micro-batches end where the prompt changes; rows 1 (prompt a) and 4 (b) are two micro-batches,
    # and another rank's 3 take one filler from the end (prompt c: its own micro-batch)
    for r in rows:
        r["prompt_ids"] = [r["i"] // 3]  # a = 0, 1, 2; b = 3, 4, 5; c = 6, 7
    assert [r["i"] for r in fast.rows_with_gradient(rows, live, 3, by_prompt=True)] == [1, 4]
    monkeypatch.setattr(fast, "all_reduce_max", lambda x: max(x, 3))
    assert [r["i"] for r in fast.rows_with_gradient(rows, live, 3, by_prompt=True)] == [1, 4, 7]
    # 4 elsewhere (a prompt twice in a step there): all 8 rows here make 3, and micro_batches(ranks_even) splits
    monkeypatch.setattr(fast, "all_reduce_max", lambda x: max(x, 4))
    kept = fast.rows_with_gradient(rows, live, 3, by_prompt=True)
    assert [r["i"] for r in kept] == list(range(8))
    assert [[r["i"] for r in mb] for mb in fast.micro_batches(kept, 3, True, ranks_even=True)] == [
        [0, 1],
        [2],
        [3, 4, 5],
        [6, 7],
    ]


def test_micro_batches_by_hand(monkeypatch):
    rows = [dict(i=i, prompt_ids=[p]) for i, p in enumerate([0, 0, 0, 0, 0, 1, 1, 2])]

    def ids(mbs):
        return [[r["i"] for r in mb] for mb in mbs]

    assert ids(fast.micro_batches(rows, 3)) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert ids(fast.micro_batches(rows, 3, by_prompt=True)) == [[0, 1, 2], [3, 4], [5, 6], [7]]
    # another rank has 6 micro-batches: the largest split in two (the first of equal ones), until there are 6
    monkeypatch.setattr(fast, "all_reduce_max", lambda x: max(x, 6))
    # [0, 1, 2] -> [0, 1], [2]; then [0, 1] -> [0], [1] (the first of the rows of two)
    assert ids(fast.micro_batches(rows, 3, by_prompt=True, ranks_even=True)) == [[0], [1], [2], [3, 4], [5, 6], [7]]
    assert ids(fast.micro_batches(rows, 3, by_prompt=True)) == [[0, 1, 2], [3, 4], [5, 6], [7]]  # local only


def test_skipping_zero_advantage_rows_changes_nothing(tiny_model_dir):
    # group 0 is mixed, group 1 all right (zero advantage): leaving group 1 out of the forward and backward gives
    # the same gradient, loss and clip fractions; the entropy is group 0's; the positions are group 0's
    model, tok = rollout.load_model(tiny_model_dir)
    rows = _rows(tok, 8, lambda i: float(i % 2) if i < 4 else 1.0)
    for i, r in enumerate(rows):
        r["prompt_ids"] = rows[i - i % 4]["prompt_ids"]
    assert [r["advantage"] == 0 for r in rows] == [False] * 4 + [True] * 4

    class Grab(torch.optim.SGD):  # keeps the clipped gradient the update steps on
        def step(self, closure=None):
            self.grad = torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]])

    def update(batch, skip, pack):
        m = copy.deepcopy(model)
        opt = Grab(m.parameters(), lr=1.0)
        out = grpo.train_on_rollouts(
            m,
            opt,
            [dict(r) for r in batch],
            grpo.Args(rollouts=4, micro_batch=3, pack_tokens=pack, skip_zero_rows=skip),
            1,
            "cpu",
            tok.pad_token_id,
        )
        return opt.grad, out

    for pack in (0, 2048):
        g_all, all_ = update(rows, False, pack)
        g_skip, skip = update(rows, True, pack)
        _, group0 = update(rows[:4], False, pack)
        scale = float(g_all.abs().max())
        assert scale > 0 and float((g_skip - g_all).abs().max()) < 1e-5 * scale
        assert abs(skip["loss"] - all_["loss"]) < 1e-7 and skip["clip_frac_high"] == all_["clip_frac_high"]
        assert all_["trained_frac"] == 1.0 and skip["trained_frac"] == 0.5
        assert skip["entropy"] == pytest.approx(group0["entropy"], rel=1e-6) and skip["entropy"] != all_["entropy"]
        assert skip["train_tokens"] == len(rows[0]["prompt_ids"]) + 1 + 2 + 3 + 1
        assert all_["train_tokens"] == len(rows[0]["prompt_ids"]) + len(rows[4]["prompt_ids"]) + 7 + 2 + 3 + 1 + 2


def test_partly_kept_groups_train_one_packed_row_per_micro_batch(tiny_model_dir, monkeypatch):
    # two rows of each group have a gradient (SDPO's case: a group's rollouts differ in having a teacher
    # context): a micro-batch of 4 holds one group's 2 kept rows, one packed row, not both groups' (two rows
    # padded to the longer); the gradient is the full batch's
    model, tok = rollout.load_model(tiny_model_dir)
    rows = _rows(tok, 8, lambda i: 0.0, adv=[0.5, 0.0, -0.5, 0.0, 0.0, 0.3, 0.0, -0.3])
    for i, r in enumerate(rows):
        r["prompt_ids"] = rows[i - i % 4]["prompt_ids"]
    forwards, real = [], fast.token_logprobs
    monkeypatch.setattr(
        fast,
        "token_logprobs",
        lambda m, seqs, *a, **k: (
            forwards.append(sorted({tuple(p) for p, _ in seqs}, key=len)) or real(m, seqs, *a, **k)
        ),
    )

    class Grab(torch.optim.SGD):
        def step(self, closure=None):
            self.grad = torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]])

    def update(skip):
        m = copy.deepcopy(model)
        opt = Grab(m.parameters(), lr=1.0)
        forwards.clear()
        grpo.train_on_rollouts(
            m,
            opt,
            [dict(r) for r in rows],
            grpo.Args(rollouts=4, micro_batch=4, skip_zero_rows=skip),
            1,
            "cpu",
            tok.pad_token_id,
        )
        return opt.grad, list(forwards)

    g_all, f_all = update(False)
    g_skip, f_skip = update(True)
    assert len(f_all) == 2 and all(len(f) == 1 for f in f_all)  # whole groups: one prompt per micro-batch
    assert len(f_skip) == 2 and all(len(f) == 1 for f in f_skip) and f_skip[0] != f_skip[1]
    assert float((g_skip - g_all).abs().max()) < 1e-5 * float(g_all.abs().max())


def test_skipping_zero_advantage_rows_off_policy(tiny_model_dir):
    # two epochs (pi_old from a separate forward): the skipped group gets no old-log-prob forward (its rollout
    # log-probs stand in) and both updates' gradients equal those of the full batch
    model, tok = rollout.load_model(tiny_model_dir)
    rows = _rows(tok, 8, lambda i: float(i % 2) if i < 4 else 0.0)
    calls = []

    class Grab(torch.optim.SGD):  # keeps each clipped gradient, then steps
        def step(self, closure=None):
            calls.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]))
            super().step()

    def update(skip):
        m, batch = copy.deepcopy(model), [dict(r) for r in rows]
        calls.clear()
        grpo.train_on_rollouts(
            m,
            Grab(m.parameters(), lr=1e-2),
            batch,
            grpo.Args(rollouts=4, micro_batch=3, ppo_epochs=2, skip_zero_rows=skip),
            1,
            "cpu",
            tok.pad_token_id,
        )
        return list(calls), batch

    full, full_rows = update(False)
    skip, skip_rows = update(True)
    assert len(full) == len(skip) == 2
    for g_full, g_skip in zip(full, skip):
        scale = float(g_full.abs().max())
        assert scale > 0 and float((g_skip - g_full).abs().max()) < 1e-5 * scale
    for r_full, r_skip in zip(full_rows, skip_rows):
        if r_skip["advantage"] != 0:
            assert r_skip["old_logp"] == pytest.approx(r_full["old_logp"], abs=1e-6)
        else:
            assert r_skip["old_logp"] == r_skip["rollout_logprobs"] != pytest.approx(r_full["old_logp"], abs=1e-3)


def test_all_rows_skipped_adamw_still_steps(tiny_model_dir):
    # after an update with momentum, a batch of degenerate groups (zero gradient): skipped, AdamW still decays the
    # weights and moves them on its momentum, exactly as on the zero gradient of the full forward and backward
    model, tok = rollout.load_model(tiny_model_dir)
    opt = sft.make_optimizer(model, 1e-3)
    grpo.train_on_rollouts(
        model,
        opt,
        _rows(tok, 8, lambda i: float(i % 2)),
        grpo.Args(rollouts=4, micro_batch=3),
        1,
        "cpu",
        tok.pad_token_id,
    )
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    after = {}
    for skip in (False, True):
        m = copy.deepcopy(model)
        o = sft.make_optimizer(m, 1e-3)
        o.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share the moment tensors
        out = grpo.train_on_rollouts(
            m,
            o,
            _rows(tok, 8, lambda i: float(i < 4)),
            grpo.Args(rollouts=4, micro_batch=3, skip_zero_rows=skip),
            1,
            "cpu",
            tok.pad_token_id,
        )
        assert out["loss"] == 0.0 and out["grad_norm"] == 0.0
        after[skip] = torch.cat([p.detach().flatten() for p in m.parameters()])
        assert out["trained_frac"] == (0.0 if skip else 1.0) and (out["entropy"] is None) == skip
    assert float((after[True] - before).abs().max()) > 1e-5 and torch.equal(after[True], after[False])


def test_by_prompt_order_keeps_groups_together():
    rows = [
        dict(prompt_ids=p, response_ids=[0] * n)
        for p, n in [([1], 2), ([2, 2], 1), ([1], 5), ([3], 3), ([2, 2], 4), ([3], 3), ([1], 1)]
    ]
    order = [(tuple(r["prompt_ids"]), len(r["response_ids"])) for r in fast.by_length(rows, by_prompt=True)]
    # groups by their longest row (1: 6 tokens, 2: 6, 3: 4; ties by first appearance), longest first within
    assert order == [((1,), 5), ((1,), 2), ((1,), 1), ((2, 2), 4), ((2, 2), 1), ((3,), 3), ((3,), 3)]
    assert [len(r["response_ids"]) for r in fast.by_length(rows)] == [5, 4, 3, 3, 2, 1, 1]


def test_pack_batch_layout_by_hand():
    seqs = [([1, 2], [3, 4]), ([1, 2], [5]), ([7], [8, 9, 10])]
    ids, pos, attn, window, targets, mask, segments = fast.pack_batch(seqs, 0, "cpu", limit=5)
    assert ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0]]
    assert segments == [(2, [(2, 4), (4, 5)]), (1, [(1, 4)])]  # (prompt length, [(start, end) of each response])
    assert pos.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]  # response 2 restarts after the prompt
    # flat index (row * 5 + column) of the output predicting each response token; past a response: anything valid
    assert window[0].tolist() == [1, 2, 3] and window[1, :1].tolist() == [1] and window[2].tolist() == [5, 6, 7]
    assert targets.tolist() == [[3, 4, 0], [5, 0, 0], [8, 9, 10]]
    assert mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]

    def sees(g):
        return [[k for k in range(5) if attn[g, 0, q, k]] for q in range(5)]

    assert attn.shape == (2, 1, 5, 5) and attn.dtype == torch.bool
    assert sees(0) == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 4]]  # token 5 sees the prompt and itself
    assert sees(1) == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 4]]  # padding sees the prompt: no empty row
    # a limit the second response does not fit in (2 + 2 + 1 > 4), and no limit: one padded row per sequence
    for limit in (4, 0):
        ids, pos, attn, window, _, _, segments = fast.pack_batch(seqs, 0, "cpu", limit=limit)
        assert ids.tolist() == [[1, 2, 3, 4], [1, 2, 5, 0], [7, 8, 9, 10]] and segments is None
        assert attn.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]] and pos[2].tolist() == [0, 1, 2, 3]
        assert window[:, 0].tolist() == [1, 5, 8] and window[0, 1] == 2 and window[2, 2] == 10


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("dtype,tol,grad_tol", [(torch.float64, 1e-10, 1e-6), (torch.float32, 1e-5, 1e-5)])
def test_packed_rows_equal_padded_rows(tiny_model_dir, dtype, tol, grad_tol, segments):
    """Packed rows (prompt once, its responses after it, block mask) give each response token the log-prob,
    entropy and gradient of its own padded row; hidden states too (the SDPO teacher's path). Gradients are
    compared relative to their largest entry, and in fp64 only to 1e-6: transformers' RMSNorm computes in fp32
    whatever the dtype, so the fp64 rounding of the different summation orders (the prompt's keys now collect
    the gradient of several responses in one attention backward) is rounded again there. segments=True: the
    model attends through fast.segment_attention, response by response (checked to be called with segments)."""
    model, _ = rollout.load_model(tiny_model_dir, "float32", "cpu")
    model.to(dtype)
    calls = []
    if segments:
        fast.use_segment_attention(model)
        real_attention = fast.segment_attention

        def spy(*a, segments=None, **k):
            return calls.append(segments) or real_attention(*a, segments=segments, **k)

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS.register(fast.SEGMENT_ATTENTION, spy)
    try:
        _check_packed_rows_equal_padded_rows(model, dtype, tol, grad_tol)
    finally:
        if segments:
            ALL_ATTENTION_FUNCTIONS.register(fast.SEGMENT_ATTENTION, real_attention)
    # 2 layers x forwards: 2 per pack (0, 64, 9) and a last one at 64; unpacked rows (pack 0) pass no segments
    assert (sum(c is not None for c in calls), sum(c is None for c in calls)) == (
        (2 * 5, 2 * 2) if segments else (0, 0)
    )


def _check_packed_rows_equal_padded_rows(model, dtype, tol, grad_tol):
    assert fast.packing_limit(model, 64) == 64
    p, q = [5, 6, 7, 8], [9, 10]
    seqs = [(p, [11, 12, 13]), (q, [14]), (p, [15, 16, 17, 18, 19]), (p, []), (q, [20, 21]), (p, [22])]
    coef = torch.randn(len(seqs), 5, dtype=dtype)
    got = {}
    for pack in (0, 64, 9):  # 9: p's rows split (4 + 3 + 0 + 1 tokens, then 4 + 5)
        model.zero_grad(set_to_none=True)
        logp, mask, ent = fast.token_logprobs(model, seqs, 0, 0.8, "cpu", with_entropy=True, chunk=4, pack=pack)
        (logp * mask * coef).sum().backward()
        with torch.no_grad():
            x, _, _, m = fast.response_states(model, seqs, 0, "cpu", pack)
        got[pack] = logp.detach(), ent, x * m[..., None], {n: w.grad.clone() for n, w in model.named_parameters()}
    ref = got[0]
    for pack in (64, 9):
        for a, b in zip(got[pack][:3], ref[:3]):
            assert torch.allclose(a, b, atol=tol, rtol=0)
        for n, g in ref[3].items():
            assert float((got[pack][3][n] - g).abs().max()) <= grad_tol * float(g.abs().max()), (n, pack)
    assert ref[0].abs().sum() > 0 and ref[3]["model.embed_tokens.weight"].abs().sum() > 0
    seen = []
    real = fast.pack_batch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast, "pack_batch", lambda *a, **k: seen.append(real(*a, **k)[0].shape) or real(*a, **k))
        fast.response_states(model, seqs, 0, "cpu", 64)
    assert seen == [(2, 13)]  # p and 3 + 5 + 0 + 1 tokens, q and 1 + 2: 26 positions, where padding had 6 x 9


def test_segment_attention_equals_block_mask():
    """segment_attention (one sdpa call per response, on [prompt, response]) against one sdpa call over the block
    mask of pack_batch, written as softmax(q k^T / sqrt(d) + mask) v by hand with repeated KV heads: outputs at
    every non-padding position and gradients of q, k, v, in fp64. Grouped heads (4 query, 2 KV), a row with
    padding, an empty response, a row of one response and a prompt of one token."""
    seqs = [
        ([1, 2, 3], [4, 5]),
        ([1, 2, 3], []),
        ([1, 2, 3], [6, 7, 8, 9]),
        ([1, 2, 3], [10]),
        ([11], [12, 13]),
        ([14, 15], [16]),
        ([14, 15], [17, 18]),
    ]
    ids, _, attn, _, _, _, segments = fast.pack_batch(seqs, 0, "cpu", limit=64)
    assert segments == [(3, [(3, 5), (5, 5), (5, 9), (9, 10)]), (1, [(1, 3)]), (2, [(2, 3), (3, 5)])]
    G, W = ids.shape
    torch.manual_seed(0)
    q = torch.randn(G, 4, W, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(G, 2, W, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8**0.5
    want = (scores.masked_fill(~attn, float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    got, _ = fast.segment_attention(module, q, k, v, attn, scaling=8**-0.5, segments=segments)
    real = ids != 0  # pad id 0: rows of 10, 3 and 5 tokens
    assert got.shape == want.shape == (G, W, 4, 8) and int((~real).sum()) == 0 + 7 + 5
    assert torch.allclose(got[real], want[real], atol=1e-12, rtol=0) and not got[~real].any()
    coef = torch.randn_like(want) * real[:, :, None, None]
    grads = [torch.autograd.grad((out * coef).sum(), (q, k, v)) for out in (got, want)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12, rtol=0) and b.abs().sum() > 0
    # without segments (decoding, unpacked rows) it is transformers' sdpa, the mask honoured
    plain, _ = fast.segment_attention(module, q, k, v, attn, scaling=8**-0.5)
    assert torch.allclose(plain[real], want[real], atol=1e-12, rtol=0)


def test_packing_limit_by_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    assert fast.packing_limit(model, 2048) == 2048 and fast.packing_limit(model, 0) == 0
    model.config.sliding_window = 512  # a row never outgrows the window
    assert fast.packing_limit(model, 2048) == 512
    fast.use_segment_attention(model)
    assert model.config._attn_implementation == "sdpa_segments" and fast.packing_limit(model, 2048) == 512
    assert fast.SEGMENT_ATTENTION in fast.SDPA  # LeanDecoder decodes a switched model too
    model.config._attn_implementation = "eager"  # adds the mask to the scores: not a boolean block mask
    assert fast.packing_limit(model, 2048) == 0
    assert fast.use_segment_attention(model).config._attn_implementation == "eager"  # only sdpa is switched


def test_gradient_checkpointing_changes_nothing(tiny_model_dir):
    # --grad-ckpt (sft.shard_model) recomputes activations in backward: the same update, and the same rollouts
    # with the KV cache on (generate_hf decodes in eval mode; transformers drops the cache in training mode under
    # checkpointing) -- and the model goes back to training mode
    model, tok = rollout.load_model(tiny_model_dir)
    ckpt = sft.shard_model(copy.deepcopy(model), torch.device("cpu"), grad_ckpt=True)

    def on(m):
        return (
            m.is_activation_checkpointing if hasattr(m, "is_activation_checkpointing") else m.is_gradient_checkpointing
        )  # transformers' current name, where it has one

    assert on(ckpt) and not on(model)
    prompts = [rollout.chat_prompt(tok, f"q{i}") for i in range(3)]
    params = rollout.SamplingParams(n=2, max_new_tokens=6, seed=0)
    for m in (model, ckpt):
        m.train()
    a, b = (rollout.generate_hf(m, tok, prompts, params, progress=False) for m in (model, ckpt))
    assert [s.response_ids for s in a] == [s.response_ids for s in b] and ckpt.training
    rows = _rows(tok, 8, lambda i: float(i % 2))
    w0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def update(m):  # one SGD step (lr 1): the weight change is the clipped gradient
        out = grpo.train_on_rollouts(
            m,
            torch.optim.SGD(m.parameters(), lr=1.0),
            [dict(r) for r in rows],
            grpo.Args(rollouts=4, micro_batch=4),
            1,
            "cpu",
            tok.pad_token_id,
        )
        return torch.cat([p.detach().flatten() for p in m.parameters()]) - w0, out["loss"]

    calls = {id(model): 0, id(ckpt): 0}  # decoder-layer forwards: a checkpointed layer runs again in backward
    for m in (model, ckpt):  # counted in forward itself: the recomputation runs no module hooks

        def counted(*a, _forward, _key, **kw):
            calls[_key] += 1
            return _forward(*a, **kw)

        for layer in m.model.layers:
            layer.forward = functools.partial(counted, _forward=layer.forward, _key=id(m))
    (d0, l0), (d1, l1) = update(model), update(ckpt)
    scale = float(d0.abs().max())
    assert scale > 0 and float((d1 - d0).abs().max()) < 1e-5 * scale and abs(l1 - l0) < 1e-6
    assert calls[id(model)] > 0 and calls[id(ckpt)] == 2 * calls[id(model)]


# two held-out problems: the evaluation runs, at a fraction of the default set's cost
GRPO_FLAGS = (
    "--steps 2 --prompts-per-step 2 --rollouts 4 --max-new-tokens 12 --eval-n 2 --eval-max-new-tokens 8 "
    "--eval-data synthetic:split=ood,difficulty=1,n=2 --save-every 2 --lenient"
).split()


# ============================================================================================
# End-to-end runs, checked against independent computations
# ============================================================================================
@pytest.fixture(scope="session")
def digit_model_dir(tmp_path_factory, embedded_tokenizer):
    """A tiny Llama whose responses are made of "1", " Wait" and EOS, so that lenient rewards differ within a group.

    Dimension 0 of the residual stream is 50 at every position (the embeddings set it; no layer writes it or reads
    it), so the final norm makes it ~sqrt(32); the LM head reads it for these three tokens only, which get logits
    near 17 against near 0 for the other 49k. The other dimensions, amplified by the norms, and sharp attention
    (q, k scaled 15x, v, o 8x) make the three tokens' odds depend on the context: the teacher's prompt moves them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = embedded_tokenizer
    three = [tok(t, add_special_tokens=False)["input_ids"][0] for t in ("1", " Wait")] + [tok.eos_token_id]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_()
        model.model.embed_tokens.weight[:, 0] = 50.0
        for layer in model.model.layers:
            attn = layer.self_attn
            (
                attn.q_proj.weight.mul_(15),
                attn.k_proj.weight.mul_(15),
                attn.v_proj.weight.mul_(8),
                attn.o_proj.weight.mul_(8),
            )
            attn.o_proj.weight[0] = layer.mlp.down_proj.weight[0] = 0.0
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.fill_(9.0)
                norm.weight[0] = 0.0
        model.model.norm.weight.fill_(9.0)
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[three, 1:] = torch.randn(3, 31) * 0.3
        model.lm_head.weight[three, 0] = torch.tensor([3.15, 2.8, 2.9])
    path = tmp_path_factory.mktemp("digits")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# Four problems; the step's order is [0, 1, 3, 2], so under two ranks rank 0 holds the two with a solution
# (a teacher context under --teacher-context dataset) and rank 1 the two without.
DIGIT_PROBLEMS = [
    dict(question="What is 1?", answer="1", solution="1"),
    dict(question="What is one?", answer="1"),
    dict(question="Say 11.", answer="11"),
    dict(question="Say one.", answer="1", solution="It is 1."),
]
TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# Two ranks without torchrun's own process: the variables it sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
# _PORT, OMP_NUM_THREADS 1 unless set), and, as torchrun, both stopped once one fails. 1.7 s less per run than
# TORCHRUN2, which the tests of each script's real torchrun launch keep (evaluate.py, sft.py, grpo.py and sdpo.py).
LAUNCH2 = [
    sys.executable,
    "-c",
    """import os, socket, subprocess, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]), WORLD_SIZE="2")
s.close()
env.setdefault("OMP_NUM_THREADS", "1")
ps = [subprocess.Popen([sys.executable, *sys.argv[1:]], env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
while any(p.poll() is None for p in ps):
    if any(p.poll() for p in ps):  # a rank failed: the others get 5 s to end by themselves (a bad flag fails all)
        end = time.time() + 5
        while time.time() < end and any(p.poll() is None for p in ps):
            time.sleep(0.02)
        [p.kill() for p in ps if p.poll() is None]
    time.sleep(0.02)
sys.exit(next((p.returncode for p in ps if p.returncode), 0))""",
]
RUN_WORKER = (
    """# Runs a script's main() with the tests' sampler (FORCED_DRAW), and with `sgd` SGD in place of AdamW: one
# step at --lr 1 moves the weights by minus the gradient. argv: ROOT SCRIPT sgd|adamw ARGS...
import importlib, math, sys
import torch
sys.path.insert(0, sys.argv[1])
import rollout, sft
"""
    + FORCED_DRAW
    + """
rollout.sample_tokens = forced_draw
rollout.native_bf16 = lambda device: False  # --dtype auto: fp32 on every CPU, as in the tests' process
if sys.argv[3] == "sgd":
    sft.make_optimizer = lambda model, lr, weight_decay=0.0: torch.optim.SGD(model.parameters(), lr=lr)
importlib.import_module(sys.argv[2].removesuffix(".py")).main(sys.argv[4:])
"""
)
SGD_FLAGS = ["--lr", "1", "--warmup", "0", "--grad-clip", "1e9"]


def _worker_command(tmp_path, launcher, script, *argv, sgd=False, root=ROOT) -> list[str]:
    """`launcher script argv` under `RUN_WORKER`: the tests' sampler, and with sgd SGD at lr 1, no warmup, no
    clipping."""
    (tmp_path / "run_worker.py").write_text(RUN_WORKER)
    return [
        *launcher,
        str(tmp_path / "run_worker.py"),
        str(root),
        script,
        "sgd" if sgd else "adamw",
        *argv,
        *(SGD_FLAGS if sgd else []),
    ]


def _main_in_process(script, *argv, sgd=False, forced=True, env=None):
    """`python script argv` as `RUN_WORKER` runs it, in this process: its main(argv), with the tests' sampler (unless
    not forced), with sgd SGD at lr 1, and with `env` set (no process start-up, no second import of torch and
    transformers). The environment is restored after it (a one-process vLLM run sets RANK and the like)."""
    before = dict(os.environ)
    os.environ.update(env or {})
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(ROOT)
            if forced:
                mp.setattr(rollout, "sample_tokens", forced_draw)
            if sgd:
                mp.setattr(
                    sft,
                    "make_optimizer",
                    lambda model, lr, weight_decay=0.0: torch.optim.SGD(model.parameters(), lr=lr),
                )
            importlib.import_module(script.removesuffix(".py")).main([*argv, *(SGD_FLAGS if sgd else [])])
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)


def _digit_problems(tmp_path) -> str:
    path = tmp_path / "digits.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({k: v for k, v in p.items()}) + "\n" for p in DIGIT_PROBLEMS))
    return str(path)


def _digit_run(model_dir, tmp_path, script, name, *extra, launcher=None, sgd=False, steps=1):
    """A run of `script` on the digit model, under the tests' sampler: in this process, or with `launcher` (two ranks)
    in its own; returns its metrics rows, its rollouts, and OUT."""
    out, probs = tmp_path / name, _digit_problems(tmp_path)
    argv = [
        "--model",
        model_dir,
        "--data",
        probs,
        "--steps",
        str(steps),
        "--prompts-per-step",
        "4",
        "--rollouts",
        "4",
        "--max-new-tokens",
        "6",
        "--lenient",
        "--eval-data",
        probs,
        "--eval-n",
        "1",
        "--eval-max-new-tokens",
        "2",
        "--save-rollouts",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "0",
        "--out",
        str(out),
        *extra,
    ]
    if launcher is None:
        _main_in_process(script, *argv, sgd=sgd)
    else:
        run(
            *_worker_command(tmp_path, launcher, script, *argv, sgd=sgd),
            timeout=300,
            env={"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error:FSDP2-wrapped module"},
        )  # its "view tensor" warning
    rows = _jsonl(out / "metrics.jsonl")
    return [r for r in rows if "step" in r], _jsonl(out / "rollouts.jsonl"), out


def _weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


def _gradient_from_sgd_step(model_dir, out) -> dict:
    """init - step_1 after an SGD step at lr 1 without clipping: the gradient, parameter by parameter."""
    init, new = _weights(model_dir), _weights(out / "step_1")
    return {k: init[k] - new[k] for k in init}


def _assert_same_gradient(got: dict, want: dict, rel=1e-4, weights: dict | None = None):
    """Each parameter's gradient within `rel` of its own largest entry, plus a floor of rel / 100 of the largest
    entry over all parameters. weights: the fp32 weights `got` was recovered from by an SGD step (w - w'), which
    holds it only to their precision: one fp32 epsilon of each parameter's largest weight is added."""
    scale = max(float(w.abs().max()) for w in want.values())
    assert scale > 1e-3, "the step has no gradient to compare"
    for k in want:
        own, worst = float(want[k].abs().max()), float((got[k] - want[k]).abs().max())
        floor = rel / 100 * scale + (1.2e-7 * float(weights[k].abs().max()) if k in (weights or {}) else 0.0)
        assert worst <= rel * own + floor, (k, worst, own, scale)


def _response_logits(model, prompt_ids, response_ids):
    """The logits that predict each response token, from one unpadded forward. (R, V)"""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    return model(ids).logits[0, len(prompt_ids) - 1 : -1].double()


def _correct_by_hand(text: str, answer: str) -> float:
    """Lenient grading of the digit model's responses, independently: the last run of digits equals the answer."""
    return float(re.findall(r"\d+", text)[-1:] == [answer])


def _rewards_by_hand(rollouts):
    answers = {f"digits-{i}": p["answer"] for i, p in enumerate(DIGIT_PROBLEMS)}
    return [_correct_by_hand(r["text"], answers[r["problem"]]) for r in rollouts]


def _grads_by_hand(model_dir, loss_fn) -> tuple[float, dict]:
    """The loss `loss_fn(model)` of the initial model and its gradient by autograd through plain forwards."""
    model, _ = rollout.load_model(model_dir)
    loss = loss_fn(model)
    loss.backward()
    return float(loss.detach()), {k: p.grad.float() for k, p in model.named_parameters()}


def _by_agg(terms: list, loss_agg: str):
    """The loss from each response's per-token terms (a list of (T_i,) tensors): token-mean, every token of the
    step alike; seq-mean-token-mean, each response's token mean, then their mean."""
    if loss_agg == "token-mean":
        return sum(t.sum() for t in terms) / max(sum(len(t) for t in terms), 1)
    return sum(t.sum() / max(len(t), 1) for t in terms) / len(terms)


def _grpo_loss_by_hand(model, rollouts, is_clip=2.0, loss_agg="seq-mean-token-mean"):
    """GRPO's first step, on-policy: ratio 1 (no clip active), so each token's loss is -A * ratio * w, with the
    rollout importance weight w = min(exp(logp - logp_rollout), 2); aggregated over the step's responses."""
    terms = []
    for r in rollouts:
        logp = torch.log_softmax(_response_logits(model, r["prompt_ids"], r["response_ids"]), -1)
        logp = logp.gather(-1, torch.tensor(r["response_ids"])[:, None]).squeeze(-1)
        w = torch.clamp(
            torch.exp(logp.detach() - torch.tensor(r["rollout_logprobs"], dtype=torch.float64)), max=is_clip
        )
        terms.append(-r["advantage"] * torch.exp(logp - logp.detach()) * w)
    return _by_agg(terms, loss_agg)


def _step_metrics_equal(a: dict, b: dict):
    """Two metrics rows equal in everything but timings and memory."""

    def skip(k):
        return k.startswith("t_") or k.endswith("_tok_s") or k == "peak_mem_gb"

    assert {k for k in a if not skip(k)} == {k for k in b if not skip(k)}
    for k in a:
        if not skip(k):  # None (a step with no trainable row has no loss) equals None only
            assert (a[k] is None) == (b[k] is None) and (
                a[k] is None or a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9)
            ), k


@pytest.mark.parametrize("loss_agg", grpo.LOSS_AGGS)
def test_grpo_one_and_two_processes_equal_the_gradient_by_hand(digit_model_dir, tmp_path, loss_agg):
    """Step 1 under SGD at lr 1, on one process and on two: the same rollouts, loss, gradient norm and gradient, and
    that gradient is autograd's through plain unpacked forwards of GRPO's loss written out by hand, under either
    aggregation. Step 2's rollouts are the same too: under two ranks they come from the generation replicas
    (`rollout.sync_replica`)."""
    from transformers import AutoModelForCausalLM

    agg = ("--loss-agg", loss_agg)
    (one, one2), rolls1, o1 = _digit_run(digit_model_dir, tmp_path, "grpo.py", "one", *agg, sgd=True, steps=2)
    (two, two2), rolls2, o2 = _digit_run(
        digit_model_dir, tmp_path, "grpo.py", "two", *agg, sgd=True, launcher=LAUNCH2, steps=2
    )

    def key(rolls):
        return [(r["step"], r["prompt"], r["sample"], r["text"]) for r in rolls]

    assert key(rolls1) == key(rolls2)
    r1 = [r for r in rolls1 if r["step"] == 1]
    assert [r["text"] for r in r1] != [r["text"] for r in rolls1 if r["step"] == 2]
    rewards = _rewards_by_hand(r1)
    assert [r["reward"] for r in r1] == rewards and 0 < sum(rewards) < len(rewards)
    groups = torch.tensor(rewards, dtype=torch.float64).view(4, 4)
    assert [r["advantage"] for r in r1] == pytest.approx((groups - groups.mean(1, keepdim=True)).flatten().tolist())
    loss, grads = _grads_by_hand(digit_model_dir, lambda m: _grpo_loss_by_hand(m, r1, loss_agg=loss_agg))
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    for m, out in ((one, o1), (two, o2)):
        # on-policy each token's term is -A * w (w ~ 1). token-mean weighs a response by its length, so the
        # responses' lengths (1 to 6 tokens here) leave a value that a sign or scale error would change; under
        # seq-mean-token-mean each response counts once and the group's advantages sum to 0: the value is ~0
        assert loss_agg == "seq-mean-token-mean" or abs(loss) > 0.05
        assert m["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6) and m["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert m["score"] == sum(rewards) / 16 and m["length"] == sum(len(r["response_ids"]) for r in r1) / 16
        assert m["epistemic"] == sum(r["text"].lower().count("wait") for r in r1) / 16
        assert m["think_length"] == m["closed_think"] == 0 and m["answer_length"] == m["length"]  # no </think>
        assert m["clip_frac_high"] == m["clip_frac_low"] == m["clip_frac_dual"] == 0.0  # on-policy: ratio 1
        assert m["degenerate_groups"] == float((groups.max(1).values == groups.min(1).values).sum()) / 4
        assert 0.01 < m["peak_mem_gb"] < 8
        _assert_same_gradient(_gradient_from_sgd_step(digit_model_dir, out), grads, weights=_weights(digit_model_dir))
        AutoModelForCausalLM.from_pretrained(out / "step_1")
    for m in (one2, two2):  # the evaluation after the last step, on the held-out set
        assert {"eval/digits/acc", "eval/digits/length", "eval/digits/epistemic"} <= set(m)


def test_grpo_resume_equals_uninterrupted_run(digit_model_dir, tmp_path):
    """Three AdamW steps at once, and the same run resumed from its step-2 checkpoint: step 3's rollouts, metrics
    and weights are the same."""
    full, rolls, out = _digit_run(
        digit_model_dir, tmp_path, "grpo.py", "full", "--lr", "1e-2", "--warmup", "2", steps=3
    )
    assert [m["step"] for m in full] == [1, 2, 3]
    (tmp_path / "resumed").mkdir()
    shutil.copytree(out / "step_2", tmp_path / "resumed" / "step_2")
    resumed, rolls3, out3 = _digit_run(
        digit_model_dir, tmp_path, "grpo.py", "resumed", "--lr", "1e-2", "--warmup", "2", "--resume", steps=3
    )
    assert [m["step"] for m in resumed] == [3] and rolls3 == [r for r in rolls if r["step"] == 3]
    _step_metrics_equal(resumed[0], full[2])
    a, b, b2 = _weights(out3 / "step_3"), _weights(out / "step_3"), _weights(out / "step_2")
    assert max(float((a[k] - b2[k]).abs().max()) for k in a) > 1e-4  # step 3 moved the weights
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_mini_batch_epochs_std_and_eval_flags_reach_the_trainer(digit_model_dir, tmp_path):
    """--mini-batch 2 --ppo-epochs 2: four optimizer updates a step (two mini-batches of two problems, twice);
    --norm-adv-std: advantages divided by the group's unbiased std + 1e-6; --eval-every 2 over 3 steps: evaluated
    after steps 2 and 3 only."""
    rows, rolls, out = _digit_run(
        digit_model_dir,
        tmp_path,
        "grpo.py",
        "flags",
        "--mini-batch",
        "2",
        "--ppo-epochs",
        "2",
        "--norm-adv-std",
        "--eval-every",
        "2",
        "--lr",
        "1e-3",
        "--eval-top-k",
        "1",
        "--eval-n",
        "8",
        steps=3,
    )
    assert [m["updates"] for m in rows] == [4, 4, 4] and all(m["grad_norm"] > 0 for m in rows)
    assert [any(k.startswith("eval/") for k in m) for m in rows] == [False, True, True]
    # --eval-top-k 1: each of the 8 evaluation samples after step 3 is step 3's greedy answer to its problem
    model, tok = rollout.load_model(str(out / "step_3"))
    greedy = rollout.generate_hf(
        model,
        tok,
        [rollout.chat_prompt(tok, data.format_prompt(p["question"])) for p in DIGIT_PROBLEMS],
        rollout.SamplingParams(temperature=0, max_new_tokens=2),
        progress=False,
    )
    acc = sum(_correct_by_hand(g.text, p["answer"]) for g, p in zip(greedy, DIGIT_PROBLEMS)) / 4
    assert rows[2]["eval/digits/acc"] == acc
    assert rows[2]["eval/digits/length"] == sum(len(g.response_ids) for g in greedy) / 4
    r = torch.tensor(_rewards_by_hand(rolls), dtype=torch.float64).view(-1, 4)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)
    assert [x["advantage"] for x in rolls] == pytest.approx(adv.flatten().tolist(), rel=1e-5, abs=1e-6)
    assert any(abs(a) > 1.0 for a in adv.flatten().tolist())  # the division did something


def test_grpo_kl_reference_is_the_initial_policy(digit_model_dir, tmp_path):
    """--kl-coef 0.5: at step 1 the policy is its own reference (KL 0); step 2's KL is the k3 estimate of the step-1
    policy against the initial model on step 2's rollouts, clamped at 10 per token as verl's, and step 2's loss is
    the surrogate + 0.5 KL, by hand."""
    (m1, m2), rolls, out = _digit_run(
        digit_model_dir, tmp_path, "grpo.py", "kl", "--kl-coef", "0.5", sgd=True, steps=2
    )
    step2 = [r for r in rolls if r["step"] == 2]
    policy, ref = rollout.load_model(str(out / "step_1"))[0], rollout.load_model(digit_model_dir)[0]
    k3 = []
    with torch.no_grad():
        for r in step2:
            y = torch.tensor(r["response_ids"])[:, None]
            lp, ref_lp = (
                torch.log_softmax(_response_logits(m, r["prompt_ids"], r["response_ids"]), -1).gather(-1, y)[:, 0]
                for m in (policy, ref)
            )
            k3.append(torch.exp(ref_lp - lp) - (ref_lp - lp) - 1)
        assert max(float(t.max()) for t in k3) > 10  # a token the step-1 policy made rare: verl's clamp at 10 acts
        kl = float(_by_agg([t.clamp(max=10.0) for t in k3], "seq-mean-token-mean"))  # aggregated as the surrogate
        surrogate = float(_grpo_loss_by_hand(policy, step2))
    assert abs(m1["kl"]) < 1e-7 and kl > 1e-4
    assert m2["kl"] == pytest.approx(kl, rel=1e-4) and m2["loss"] == pytest.approx(surrogate + 0.5 * kl, rel=1e-4)


def test_rollout_is_weight_cap_and_kl_term_by_hand(tiny_model_dir):
    """train_on_rollouts with rollout log-probs below and above the policy's (weights exp(0.5) and the cap 2 of
    exp(1)) and --kl-coef 0.1 against a perturbed reference: loss, KL and the SGD update (lr 1, no clipping) equal
    the clipped surrogate + k3 term written out by hand and differentiated by autograd."""
    model, tok = rollout.load_model(tiny_model_dir)
    ref = copy.deepcopy(model)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = _rows(tok, 8, lambda i: float(i % 3 == 0))
    with torch.no_grad():
        for r in rows:
            logp = torch.log_softmax(_response_logits(model, r["prompt_ids"], r["response_ids"]), -1)
            logp = logp.gather(-1, torch.tensor(r["response_ids"])[:, None]).squeeze(-1)
            r["rollout_logprobs"] = [float(x) + (-1.0 if t % 2 else 0.5) for t, x in enumerate(logp)]
    n = sum(len(r["response_ids"]) for r in rows)

    def by_hand(m):
        loss, kl = 0.0, 0.0
        for r in rows:
            y = torch.tensor(r["response_ids"])[:, None]
            logp = torch.log_softmax(_response_logits(m, r["prompt_ids"], r["response_ids"]), -1).gather(-1, y)[:, 0]
            with torch.no_grad():
                ref_lp = torch.log_softmax(_response_logits(ref, r["prompt_ids"], r["response_ids"]), -1).gather(
                    -1, y
                )[:, 0]
            w = torch.clamp(
                torch.exp(logp.detach() - torch.tensor(r["rollout_logprobs"], dtype=torch.float64)), max=2.0
            )
            loss = loss - (r["advantage"] * torch.exp(logp - logp.detach()) * w).sum() / n
            kl = kl + (torch.exp(ref_lp - logp) - (ref_lp - logp) - 1).sum() / n  # k3
        by_hand.kl = float(kl.detach()) if torch.is_tensor(kl) else kl
        return loss + 0.1 * kl

    want_loss, grads = _grads_by_hand(tiny_model_dir, by_hand)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = grpo.Args(rollouts=4, micro_batch=3, kl_coef=0.1, grad_clip=1e9, loss_agg="token-mean")
    m = grpo.train_on_rollouts(
        model, torch.optim.SGD(model.parameters(), lr=1.0), rows, args, 1, "cpu", tok.pad_token_id, ref_model=ref
    )
    assert m["loss"] == pytest.approx(want_loss, rel=1e-5) and m["kl"] == pytest.approx(by_hand.kl, rel=1e-5)
    assert by_hand.kl > 1e-4
    _assert_same_gradient({k: before[k] - v.detach() for k, v in model.named_parameters()}, grads, weights=before)


@pytest.mark.parametrize("lr", [0.5])
def test_off_policy_updates_against_the_step_start(tiny_model_dir, lr):
    """--mini-batch 1 over two groups: two SGD updates a step. The second's ratio is exp(logp - old) against the
    log-probs before the step's FIRST update, clipped to [1 - clip_low, 1 + clip_high] (asymmetric here, 0.05 and
    0.5, so that swapping them shows; dual clip 3 where A < 0), times the rollout IS weight: the weights after the
    step equal that surrogate written out in float64, and some of the second update's ratios lie outside the clip
    range (so a step that took old = logp.detach() would differ)."""
    model, tok = rollout.load_model(tiny_model_dir)
    rows = _rows(tok, 8, lambda i: float(i in (0, 3, 4, 5, 7)))  # groups [1, 0, 0, 1] and [1, 1, 0, 1]
    m64 = copy.deepcopy(model).double()

    def logps(m, r):
        y = torch.tensor(r["response_ids"])[:, None]
        return torch.log_softmax(_response_logits(m, r["prompt_ids"], r["response_ids"]).double(), -1).gather(-1, y)[
            :, 0
        ]

    with torch.no_grad():
        old = [logps(m64, r) for r in rows]
    for r, o in zip(rows, old):  # rollout log-probs a little off the policy's: IS weights exp(0.1), and the cap
        r["rollout_logprobs"] = [float(x) - (0.1 if t % 2 else 1.0) for t, x in enumerate(o)]
    opt, ratios = torch.optim.SGD(m64.parameters(), lr=lr), []
    for u in (0, 1):
        part, n, loss = (
            range(4 * u, 4 * u + 4),
            sum(len(rows[i]["response_ids"]) for i in range(4 * u, 4 * u + 4)),
            0.0,
        )
        for i in part:
            r, lp = rows[i], logps(m64, rows[i])
            ratio, a = torch.exp(lp - old[i]), r["advantage"]
            w = torch.clamp(torch.exp(old[i] - torch.tensor(r["rollout_logprobs"], dtype=torch.float64)), max=2.0)
            per = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 0.95, 1.5))
            per = torch.minimum(per, torch.full_like(per, -a * 3.0)) if a < 0 else per
            loss = loss + (per * w).sum() / n
            ratios += ratio.detach().tolist() if u else []
        opt.zero_grad()
        loss.backward()
        opt.step()
        if u == 0:
            first = {k: p.detach().clone() for k, p in m64.named_parameters()}  # after update 1
    args = grpo.Args(
        rollouts=4, mini_batch=1, micro_batch=4, grad_clip=1e9, loss_agg="token-mean", clip_low=0.05, clip_high=0.5
    )
    m = grpo.train_on_rollouts(
        model, torch.optim.SGD(model.parameters(), lr=lr), rows, args, 1, "cpu", tok.pad_token_id
    )
    # the second update's ratios on both sides of each bound: 1.094 in (1.05, 1.5) and 0.908 in (0.5, 0.95)
    assert m["updates"] == 2 and any(r > 1.5 for r in ratios) and any(1.05 < r < 1.5 for r in ratios), ratios
    assert any(0.5 < r < 0.95 for r in ratios), ratios
    want = {k: p.detach() for k, p in m64.named_parameters()}
    second = max(float((want[k] - first[k]).abs().max()) for k in want)  # how far the second update moved
    worst = max(float((p.detach().double() - want[k]).abs().max()) for k, p in model.named_parameters())
    assert second > 0 and worst < 1e-3 * second, (worst, second)


def test_sync_replica_copies_the_trainer_weights(tiny_model_dir):
    model, _ = rollout.load_model(tiny_model_dir)
    replica = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    assert not torch.equal(replica.model.norm.weight, model.model.norm.weight)
    rollout.sync_replica(replica, model)
    assert all(torch.equal(a, b) for a, b in zip(replica.state_dict().values(), model.state_dict().values()))


class _Bin:
    """verl's seqlen_balancing Set, ported independently: a sum and its (index, value) items."""

    def __init__(self):
        self.sum, self.items = 0, []

    def put(self, idx, val):
        self.items.append((idx, val))
        self.sum += val

    def key(self):
        return (self.sum, len(self.items), self.items)


class _Partial:
    """verl's seqlen_balancing State: k bins, largest first; compared for a min-heap that pops the largest spread."""

    def __init__(self, items, k):
        self.k, self.bins = k, [_Bin() for _ in range(k)]
        for b, (idx, val) in zip(self.bins, items):
            b.put(idx, val)
        self.bins.sort(key=_Bin.key, reverse=True)

    def absorb(self, other):
        for i in range(self.k):
            for idx, val in other.bins[self.k - 1 - i].items:
                self.bins[i].put(idx, val)
        self.bins.sort(key=_Bin.key, reverse=True)

    def spread(self):
        return self.bins[0].sum - self.bins[-1].sum

    def __lt__(self, other):
        if self.spread() != other.spread():
            return self.spread() > other.spread()
        return self.bins[0].key() > other.bins[0].key()


def _verl_partitions(values, k):
    """get_seqlen_balanced_partitions(values, k, equal_size=True), as verl computes it."""
    import heapq

    ranked = sorted((v, i) for i, v in enumerate(values))
    heap = []
    for j in range(0, len(ranked), k):
        heapq.heappush(heap, _Partial([(i, v) for v, i in ranked[j : j + k]], k))
    while len(heap) > 1:
        first = heapq.heappop(heap)
        first.absorb(heapq.heappop(heap))
        heapq.heappush(heap, first)
    return [sorted(i for i, _ in b.items) for b in heap[0].bins]


def test_karmarkar_karp_partition_against_verls():
    """sdpo.karmarkar_karp against an independent port of verl's (equal-size LDM, ties included), by hand on
    four items, and on random lengths for 1, 2, 4 and 8 ranks; then the order _balance_batch builds from it."""
    # (1, 2) and (3, 4) spread 1 each: the larger first set pops first; 4 + 1 and 3 + 2 tie on sum and size, and
    # the items [(3, 4), (0, 1)] come before [(2, 3), (1, 2)]
    assert sdpo.karmarkar_karp([1, 2, 3, 4], 2) == [[0, 3], [1, 2]]
    rng = random.Random(0)
    for case in range(60):
        k = (1, 2, 4, 8)[case % 4]
        values = [rng.choice((rng.randint(1, 6), rng.randint(1, 5000))) for _ in range(k * rng.randint(1, 12))]
        assert sdpo.karmarkar_karp(values, k) == _verl_partitions(values, k), (values, k)
    lengths = [rng.randint(50, 4000) for _ in range(64)]
    work = [24576 * n + n * n for n in lengths]
    order = []
    for part in _verl_partitions(work, 4):  # _balance_batch: each part by (workload, index), evens up, odds down
        part = sorted(part, key=lambda i: (work[i], i))
        order += part[0::2] + part[1::2][::-1]
    positions = sdpo.balanced_positions(lengths)
    assert [positions[i] for i in order] == list(range(64))
    with pytest.raises(ValueError, match="do not split into 4"):
        sdpo.balanced_positions([5, 6, 7], 4)


SIBLING_ORDER_WORKER = """
import json, sys, torch.distributed as dist
import rollout, sdpo
rank, _, world, _ = rollout.init_distributed()
lengths = [(37 * i) % 101 + 5 for i in range(16)]  # 16 rollouts of a step, in their places 0..15
rows = [dict(place=p, prompt_ids=[0] * 3, response_ids=[0] * (lengths[p] - 3)) for p in range(16)]
mine = rows[rank * 4:rank * 4 + 4] + rows[8 + rank * 4:8 + rank * 4 + 4]  # each rank: its prompts' rollouts
order = sdpo.sibling_order(mine, world, ranks=4)
every = [None] * world
dist.all_gather_object(every, [(r["place"], o) for r, o in zip(mine, order)])
if rank == 0:
    json.dump(dict(sorted(x for part in every for x in part)), open(sys.argv[1], "w"))
dist.barrier()  # every rank done before any closes the group
dist.destroy_process_group()
rollout.end_process(0)
"""


def test_sibling_order_is_gathered_across_ranks(tmp_path):
    """On two ranks each rank holds some of a step's rollouts: sibling_order gathers every rank's lengths, so each
    rollout gets its place in verl's order of the whole step, as balanced_positions gives it on one process."""
    (tmp_path / "w.py").write_text(SIBLING_ORDER_WORKER)
    run(
        *LAUNCH2,
        str(tmp_path / "w.py"),
        str(tmp_path / "out.json"),
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    got = {int(k): v for k, v in json.loads((tmp_path / "out.json").read_text()).items()}
    want = sdpo.balanced_positions([(37 * i) % 101 + 5 for i in range(16)], 4)
    assert got == dict(enumerate(want)) and sorted(want) == list(range(16))


def test_balanced_sibling_order_by_hand():
    # one rank: lengths 5 3 9 3 7 sorted (3@1, 3@3, 5@0, 7@4, 9@2); even places 1, 0, 2 ascend, odd ones 3, 4 descend
    assert sdpo.balanced_positions([5, 3, 9, 3, 7], ranks=1) == [1, 0, 2, 4, 3]
    # two ranks: the parts {0, 3} and {1, 2} (as `karmarkar_karp([1, 2, 3, 4], 2)`), each short-to-long
    assert sdpo.balanced_positions([1, 2, 3, 4], ranks=2) == [0, 2, 3, 1]
    rows = [dict(text=t, reward=1.0) for t in "abcd"]
    assert sdpo.teacher_contexts(rows, [{}], 4, "sibling", order=[3, 2, 1, 0]) == ["d", "d", "d", "c"]
    assert sdpo.teacher_contexts(rows, [{}], 4, "sibling") == ["b", "a", "a", "a"]


def test_success_threshold_at_its_boundary():
    rows = [dict(text=t, reward=r) for t, r in (("a", 0.5), ("b", 0.49), ("c", 0.0), ("d", 1.0))]
    assert sdpo.teacher_contexts(rows, [{}], 4, "sibling", threshold=0.5) == ["d", "a", "a", "a"]  # 0.5 counts
    assert sdpo.teacher_contexts(rows, [{}], 4, "sibling", threshold=0.51) == ["d", "d", "d", None]


def test_grpo_coverage_and_no_checkpoints(digit_model_dir, tmp_path, capsys):
    """--coverage 1: every prompt of every step is the one problem `data.coverage_subset` draws; --save-every 0
    writes no checkpoint."""
    flags = [
        "--model",
        digit_model_dir,
        "--data",
        "synthetic:types=add,n=8",
        "--coverage",
        "99",
        "--out",
        str(tmp_path),
    ]
    assert "coverage subset of 99 asked from 8 distinct problems" in _fails(capsys, "grpo.py", *flags)
    _, rolls, out = _digit_run(
        digit_model_dir, tmp_path, "grpo.py", "y", "--coverage", "1", "--save-every", "0", steps=2
    )
    (only,) = data.coverage_subset(data.load_problems(_digit_problems(tmp_path)), 1, seed=0)
    assert len(rolls) == 32 and {r["problem"] for r in rolls} == {only["id"]}
    assert not list(out.glob("step_*"))  # --save-every 0: no checkpoint at all


def test_grpo_embedded_model_one_step(tmp_path):
    """The README's main command, one step: the embedded model trains and is evaluated (its 1.6 GB checkpoint is
    left out: checkpoints are tested on the tiny models)."""
    flags = "--steps 1 --prompts-per-step 2 --rollouts 4 --max-new-tokens 24 --eval-n 1 --eval-max-new-tokens 8 "
    flags += "--lenient --eval-data synthetic:split=ood,n=2 --save-rollouts --save-every 0"
    p = subprocess.run(
        [sys.executable, "grpo.py", *flags.split(), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    out = p.stdout
    assert "deprecated" not in p.stderr  # the KV cache passed and read under transformers' current name
    (row,) = _jsonl(tmp_path / "metrics.jsonl")
    rolls = _jsonl(tmp_path / "rollouts.jsonl")
    problems = {p["id"]: p for p in data.load_problems(grpo.Args.data)}
    assert len(rolls) == 8 and row["score"] == sum(r["reward"] for r in rolls) / 8
    assert [r["reward"] for r in rolls] == [
        data.grade(r["text"], problems[r["problem"]]["answer"], lenient=True) for r in rolls
    ]
    assert row["length"] == sum(len(r["response_ids"]) for r in rolls) / 8 <= 24 and math.isfinite(row["loss"])
    acc = row["eval/synthetic:split=ood,n=2/acc"]
    records = _jsonl(tmp_path / "eval_samples.jsonl")  # the evaluation's responses, graded, for the report
    assert [(r["step"], r["benchmark"]) for r in records] == [(1, "synthetic:split=ood,n=2")] * 2
    assert sum(s for r in records for s in r["scores"]) / 2 == acc and all(len(r["responses"]) == 1 for r in records)
    assert [r["scores"] for r in records] == [
        [data.grade(data.answer_part(r["responses"][0]), r["answer"], lenient=True)] for r in records
    ]
    assert out.splitlines()[-4:] == [
        "grpo: trained to step 1.",
        f"  synthetic:split=ood,n=2: held-out accuracy {acc:.2f} on 2 problems (2 responses), "
        f"{row['eval/synthetic:split=ood,n=2/length']:.0f} tokens, "
        f"E(y) {row['eval/synthetic:split=ood,n=2/epistemic']:.2f}",
        f"  metrics: {tmp_path / 'metrics.jsonl'}",
        "  checkpoint: none (--save-every 0)",
    ]


def _wandb_history(out: Path) -> list[dict]:
    """The history rows of the one offline Weights & Biases run under OUT/wandb, read from its .wandb file with
    wandb's own protobuf: a 7-byte file header, then leveldb-log records (crc 4, length 2, type 1; full = 1,
    first/middle/last = 2/3/4) in 32 KiB blocks whose tails under 7 bytes are padding."""
    import struct
    from wandb.proto import wandb_internal_pb2

    (path,) = out.glob("wandb/offline-run-*/run-*.wandb")
    raw, pos, chunk, rows = path.read_bytes(), 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunk, pos = chunk + raw[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_logs_what_metrics_jsonl_holds(digit_model_dir, tmp_path):
    """--wandb PROJECT in wandb's offline mode: one run under OUT/wandb whose history holds, step by step, every
    value metrics.jsonl holds (sdpo.py, so grpo.py's loop and SDPO's own metrics both)."""
    import wandb  # noqa: F401  (the README's test install brings it: a missing one fails here, not skips)

    out, probs = tmp_path / "wb", _digit_problems(tmp_path)
    run(
        sys.executable,
        "sdpo.py",
        "--model",
        digit_model_dir,
        "--data",
        probs,
        "--steps",
        "2",
        "--prompts-per-step",
        "2",
        "--rollouts",
        "4",
        "--max-new-tokens",
        "6",
        "--lenient",
        "--eval-data",
        probs,
        "--eval-n",
        "1",
        "--eval-max-new-tokens",
        "2",
        "--save-every",
        "0",
        "--wandb",
        "sdpo-test",
        "--out",
        str(out),
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    rows = [r for r in _jsonl(out / "metrics.jsonl") if "step" in r]
    history = _wandb_history(out)
    assert [h["step"] for h in history] == [r["step"] for r in rows] == [1, 2]
    for r, h in zip(rows, history):
        assert {k: v for k, v in r.items() if v is not None} == {k: h[k] for k in r if r[k] is not None}
    assert "masked_frac" in rows[0] and any(k.startswith("eval/") for k in rows[-1])


@pytest.mark.parametrize("script", ["grpo.py", "sdpo.py"])
def test_no_fast_runs_without_fast_py_and_trains_as_fast(digit_model_dir, tmp_path, script):
    """The project without fast.py: --no-fast trains (the plain twins only), and its step is --fast's -- the same
    rollouts, loss and updated weights up to float rounding -- though --fast leaves zero-gradient rows out."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ROOT.glob("*.py"):
        if f.name != "fast.py":
            (bare / f.name).write_bytes(f.read_bytes())
    out = {"plain": tmp_path / "plain", "fast": tmp_path / "fast"}
    argv = [
        "--model",
        digit_model_dir,
        "--data",
        _digit_problems(tmp_path),
        "--steps",
        "1",
        "--prompts-per-step",
        "4",
        "--rollouts",
        "4",
        "--max-new-tokens",
        "6",
        "--lenient",
        "--eval-data",
        _digit_problems(tmp_path),
        "--eval-n",
        "1",
        "--eval-max-new-tokens",
        "2",
        "--save-every",
        "1",
        # SDPO over the whole vocabulary: the digit model's 49k other logits are ~0, near-ties whose order (the
        # top-100's last members) the two paths' fp32 rounding can swap
        # GRPO under token-mean: an on-policy loss that is not ~0 (see the one-and-two-processes test)
        *(["--topk", "0"] if script == "sdpo.py" else ["--loss-agg", "token-mean"]),
    ]
    # one SGD step at lr 1 each: the weights move by -gradient; --no-fast in its own process, from the bare copy
    p = subprocess.run(
        _worker_command(
            tmp_path, [sys.executable], script, *argv, "--no-fast", "--out", str(out["plain"]), sgd=True, root=bare
        ),
        cwd=bare,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    _main_in_process(script, *argv, "--fast", "--out", str(out["fast"]), sgd=True)
    assert not (bare / "fast.py").exists()
    rows = {k: [r for r in _jsonl(v / "metrics.jsonl") if "step" in r][0] for k, v in out.items()}
    for key in ("score", "length", "epistemic"):
        assert rows["plain"][key] == rows["fast"][key]  # the same rollouts
    # SDPO's metrics over the distilled positions, twin by twin (GRPO's entropy is over the rows each path trains)
    for key in ("kl", "entropy", "teacher_entropy", "distill_loss", "masked_frac") if script == "sdpo.py" else ():
        a, b = rows["plain"].get(key), rows["fast"].get(key)
        assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-4, abs=1e-7)), key
    # fp32 rounding of two summation orders
    loss = rows["fast"]["loss"]
    assert (
        abs(loss) > 0.05
        and rows["plain"]["trained_frac"] == 1.0
        and rows["plain"]["loss"] == pytest.approx(loss, rel=1e-4)
    )
    plain, quick = (
        _gradient_from_sgd_step(digit_model_dir, out["plain"]),
        _gradient_from_sgd_step(digit_model_dir, out["fast"]),
    )
    # the plain path's fp32 sums leave the norm weights' gradients up to ~4e-4 of their largest entry from a float64
    # gradient (model.norm, measured); --fast's stay within 1e-4 (the one-and-two-processes test)
    _assert_same_gradient(quick, plain, rel=5e-4, weights=_weights(digit_model_dir))


def test_wandb_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import of wandb fails, as where it is not installed
    with pytest.raises(ValueError, match="--wandb needs the wandb package"):
        sft.open_wandb("p", grpo.Args(), tmp_path)
    assert sft.open_wandb(None, grpo.Args(), tmp_path) is None  # no flag: nothing imported


# ============================================================================================
# sdpo.py
# ============================================================================================
import sdpo


def _brute_divergence(s_logits, t_logits, topk, alpha, add_tail, temperature=1.0):
    """Eq. 1 for one position, with plain floats over a tiny vocabulary."""

    def softmax(z):
        m = max(z)
        e = [math.exp((x - m) / 1.0) for x in z]
        return [x / sum(e) for x in e]

    ps, pt = softmax([x / temperature for x in s_logits]), softmax([x / temperature for x in t_logits])
    if topk:
        idx = sorted(range(len(ps)), key=lambda i: -ps[i])[:topk]
        ps_k, pt_k = [ps[i] for i in idx], [pt[i] for i in idx]
        if add_tail:
            ps, pt = ps_k + [1 - sum(ps_k)], pt_k + [1 - sum(pt_k)]
        else:
            ps, pt = [x / sum(ps_k) for x in ps_k], [x / sum(pt_k) for x in pt_k]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)

    if alpha == 0:
        return kl(pt, ps)
    if alpha == 1:
        return kl(ps, pt)
    m = [(1 - alpha) * a + alpha * b for a, b in zip(ps, pt)]
    return (1 - alpha) * kl(ps, m) + alpha * kl(pt, m)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.3])
@pytest.mark.parametrize("topk,add_tail", [(None, True), (3, True), (3, False), (1, True)])
def test_self_distillation_loss_brute_force(alpha, topk, add_tail):
    torch.manual_seed(1)
    s, t = torch.randn(4, 7, dtype=torch.float64) * 2, torch.randn(4, 7, dtype=torch.float64) * 2
    got = sdpo.self_distillation_loss(s, t, topk=topk, alpha=alpha, add_tail=add_tail, temperature=0.7)
    assert got.shape == (4,)
    for i in range(4):
        want = _brute_divergence(s[i].tolist(), t[i].tolist(), topk, alpha, add_tail, temperature=0.7)
        assert got[i].item() == pytest.approx(want, abs=1e-6)
    assert torch.allclose(
        sdpo.self_distillation_loss(s, s, topk, alpha, add_tail), torch.zeros(4, dtype=s.dtype), atol=1e-7
    )  # identical distributions: zero


def _chunked(*args, **kwargs) -> torch.Tensor:
    """fast.chunked_distillation with sdpo.py's divergence, its fields stacked as columns (N, 5) in TERMS order."""
    out = fast.chunked_distillation(*args, divergence=sdpo.divergence, finish_support=sdpo.finish_support, **kwargs)
    return torch.stack([out[k] for k in fast.TERMS], dim=-1)


@pytest.mark.parametrize("alpha,topk", [(0.5, 3), (0.0, None), (1.0, 3)])
def test_self_distillation_gradient_step_lowers_loss(alpha, topk):
    torch.manual_seed(2)
    s = torch.randn(5, 9, requires_grad=True)
    t = torch.randn(5, 9, requires_grad=True)  # a teacher in the graph: only stopgrad keeps its gradient out
    loss = sdpo.self_distillation_loss(s, t, topk=topk, alpha=alpha).mean()
    loss.backward()
    assert t.grad is None and s.grad.abs().sum() > 0  # stopgrad on the teacher
    tx = t.detach().clone().requires_grad_()  # the chunked path too (logits in, no LM head)
    _chunked(
        s.detach().clone().requires_grad_(), tx, torch.zeros(5, dtype=torch.long), topk=topk, alpha=alpha, chunk=2
    )[:, 0].sum().backward()
    assert tx.grad is None
    with torch.no_grad():
        after = sdpo.self_distillation_loss(s - 0.1 * s.grad, t, topk=topk, alpha=alpha).mean()
    assert after < loss


def test_chunked_distillation_equals_unchunked():
    torch.manual_seed(3)
    N, H, V = 37, 8, 50
    hs = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(N, H, dtype=torch.float64)
    ws = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(V, H, dtype=torch.float64)
    y = torch.randint(0, V, (N,))
    res = _chunked(hs, ht, y, ws, wt, topk=5, alpha=0.5, temperature=0.9, chunk=8)
    res[:, 0].sum().backward()
    g_h, g_w = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    full = sdpo.self_distillation_loss(hs @ ws.T, ht @ wt.T, topk=5, alpha=0.5, temperature=0.9)
    full.sum().backward()
    assert torch.allclose(res[:, 0], full, atol=1e-10)
    assert torch.allclose(g_h, hs.grad, atol=1e-10) and torch.allclose(g_w, ws.grad, atol=1e-10)
    logp = torch.log_softmax((hs @ ws.T) / 0.9, -1).gather(-1, y[:, None]).squeeze(-1)
    assert torch.allclose(res[:, 1], logp, atol=1e-10)
    # the logits path (several ranks) gives the same numbers as the hidden-state path (one rank)
    via_logits = _chunked(hs @ ws.T, ht @ wt.T, y, None, None, topk=5, alpha=0.5, temperature=0.9, chunk=8)
    assert torch.allclose(via_logits, res, atol=1e-10)
    t = torch.log_softmax((ht @ wt.T) / 0.9, -1)  # the teacher's entropy / log V, brute force
    assert torch.allclose(res[:, 4], -(t.exp() * t).sum(-1) / math.log(V), atol=1e-10)
    flat = _chunked(hs, torch.zeros(N, H, dtype=torch.float64), y, ws, wt, topk=5, chunk=8)
    assert torch.allclose(flat[:, 4], torch.ones(N, dtype=torch.float64))  # a uniform teacher weighs 1
    # float32 at a realistic size: within 1e-5 of the straightforward computation
    hs32, ht32, w32 = torch.randn(300, 16), torch.randn(300, 16), torch.randn(1000, 16)
    y32 = torch.randint(0, 1000, (300,))
    a = _chunked(hs32, ht32, y32, w32, w32, topk=100, chunk=64)[:, 0]
    b = sdpo.self_distillation_loss(hs32 @ w32.T, ht32 @ w32.T, topk=100)
    assert torch.allclose(a, b, atol=1e-5)
    # every support and temperature: values, metrics and both gradients (the backward reuses the forward's teacher)
    for topk, add_tail, temp in ((5, True, 1.0), (5, False, 1.3), (None, True, 1.0), (None, True, 0.7)):
        hs.grad = ws.grad = None
        res = _chunked(hs, ht, y, ws, wt, topk=topk, alpha=0.3, add_tail=add_tail, temperature=temp, chunk=8)
        (res[:, 0] * torch.arange(N) + res[:, 1]).sum().backward()
        g_h, g_w = hs.grad.clone(), ws.grad.clone()
        hs.grad = ws.grad = None
        s, tl = hs @ ws.T, ht @ wt.T
        full = sdpo.self_distillation_loss(s, tl, topk=topk, alpha=0.3, add_tail=add_tail, temperature=temp)
        logp = torch.log_softmax(s / temp, -1)
        (full * torch.arange(N) + logp.gather(-1, y[:, None]).squeeze(-1)).sum().backward()
        kl = sdpo.self_distillation_loss(s, tl, topk=topk, alpha=1.0, add_tail=add_tail, temperature=temp)
        assert torch.allclose(res[:, 0], full, atol=1e-10) and torch.allclose(res[:, 2], kl, atol=1e-10)
        assert torch.allclose(res[:, 3], -(logp.exp() * logp).sum(-1), atol=1e-10)
        assert torch.allclose(g_h, hs.grad, atol=1e-10) and torch.allclose(g_w, ws.grad, atol=1e-10), (topk, add_tail)


def test_teacher_contexts_sibling_rules():
    rows = [dict(reward=r, text=f"resp{i}") for i, r in enumerate([0, 1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0])]
    problems = [{"solution": "S0"}, {"solution": None}, {"solution": "S2"}]
    c = sdpo.teacher_contexts(rows, problems, 4, "sibling")
    # group 0: successes 1 and 3 -> the first OTHER success; group 1: none -> masked; group 2: only sample 8
    assert c[:4] == ["resp1", "resp3", "resp1", "resp1"]
    assert c[4:8] == [None] * 4
    assert c[8:] == [None, "resp8", "resp8", "resp8"]  # the sample itself is excluded
    assert sdpo.teacher_contexts(rows, problems, 4, "dataset") == ["S0"] * 4 + [None] * 4 + ["S2"] * 4
    rows[1]["text"] = "Okay, hmm.</think>\n\nSo \\boxed{1}."
    assert sdpo.teacher_contexts(rows, problems, 4, "sibling-no-think")[0] == "So \\boxed{1}."


def test_sdpo_reprompt_strings_and_strip_think():
    base = "Q\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert rollout.reprompt("Q", "A") == base + "\nCorrect solution:\n\nA\n\nCorrectly solve the original question."
    assert rollout.reprompt("Q", "A", template="uncertainty").endswith(
        "include as much uncertainty or ambiguity in the explanation."
    )
    assert rollout.strip_think("<think>\nx\n</think>\n\nans") == "ans"  # Qwen3
    assert rollout.strip_think("x wait y</think>ans") == "ans"  # R1-Distill


def test_ema_direction():
    t, s = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    t0, s0 = t.weight.detach().clone(), s.weight.detach().clone()
    ema = sdpo.fp32_shards(t)  # the teacher's own weights, in fp32
    sdpo.ema_update(ema, t, s, 0.05)
    assert torch.allclose(t.weight, 0.95 * t0 + 0.05 * s0)  # the teacher keeps 1 - rate of itself
    assert torch.equal(s.weight, s0) and torch.equal(ema["weight"], t.weight.detach())


def straightforward_logprobs(model, seqs, pad_id, temperature):
    """The textbook computation: full logits over every position, log_softmax over the vocabulary."""
    out = []
    for p, r in seqs:
        z = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) + len(r) - 1] / temperature
        out.append(torch.log_softmax(z, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1))
    return out


@pytest.mark.parametrize("temp", [0.7, 1.0])
def test_token_logprobs_equal_straightforward(tiny_model_dir, temp):
    """grpo.token_logprobs (one padded row per sequence, the full logits) and its twin fast.token_logprobs (hidden
    states, response positions only, the LM head in chunks) equal a log_softmax per sequence (values, grads)."""
    for twin in (
        lambda *a, **k: grpo.token_logprobs(*a, **k),
        lambda *a, **k: fast.token_logprobs(*a, **k, chunk=3, pack=64),
    ):
        _check_token_logprobs(tiny_model_dir, temp, twin)


def test_scaled_heads_take_the_full_logits_path():
    """fast.plain_lm_head: Granite divides its logits by `logits_scaling`, so hidden @ W.T is not its logits; with a
    scale it takes the full-logits path, and fast.token_logprobs then equals the log-softmax of the model's own
    logits. At scale 1 its head is plain."""
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    assert fast.plain_lm_head(GraniteForCausalLM(GraniteConfig(**cfg, logits_scaling=1.0)))
    model = GraniteForCausalLM(GraniteConfig(**cfg, logits_scaling=4.0)).eval()
    assert not fast.plain_lm_head(model)
    seqs = [([5, 6, 7], [8, 9, 10]), ([3], [4, 5])]
    logp, mask, _ = fast.token_logprobs(model, seqs, 0, 1.0, "cpu", chunk=2, pack=64)
    for i, (x, y) in enumerate(seqs):
        z = model(input_ids=torch.tensor([x + y])).logits[0, len(x) - 1 : -1]
        want = torch.log_softmax(z, -1).gather(-1, torch.tensor(y)[:, None]).squeeze(-1)
        assert torch.allclose(logp[i, : len(y)], want, atol=1e-5) and mask[i].sum() == len(y)


def _check_token_logprobs(tiny_model_dir, temp, token_logprobs):
    model, _ = rollout.load_model(tiny_model_dir, "float32", "cpu")
    torch.manual_seed(0)
    seqs = [([5, 6, 7], [8, 9, 10, 11]), ([5, 6, 7, 12, 13], [14]), ([3], [4, 5])]
    assert fast.plain_lm_head(model)
    logp, mask, ent = token_logprobs(model, seqs, 0, temp, "cpu", with_entropy=True)
    (logp * mask).sum().backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = straightforward_logprobs(model, seqs, 0, temp)
    sum(x.sum() for x in ref).backward()
    for i, x in enumerate(ref):
        assert torch.allclose(logp[i, : len(x)], x, atol=1e-5) and mask[i].sum() == len(x)
        assert torch.all(logp[i, len(x) :] == 0)
        z = model(input_ids=torch.tensor([seqs[i][0] + seqs[i][1]])).logits[0, len(seqs[i][0]) - 1 : -1] / temp
        h = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
        assert torch.allclose(ent[i, : len(x)], h, atol=1e-5)
    # gradients relative to their largest entry: the tied embedding's reaches ~5 here, where fp32 rounding of the
    # two summation orders reached 2.7e-5 on an AMD EPYC (5e-6 of the largest entry), above a 1e-5 atol
    for n, p in model.named_parameters():
        assert float((g[n] - p.grad).abs().max()) <= 1e-5 * float(p.grad.abs().max()), n
    model.zero_grad(set_to_none=True)
    lp, m, _ = token_logprobs(model, [([5, 6], [])], 0, 1.0, "cpu")  # no response token at all
    (lp * m).sum().backward()  # still a backward through the model (every FSDP2 rank must run one)
    assert m.sum() == 0 and model.get_output_embeddings().weight.grad is not None
    # the logits path (heads that are not a plain Linear) gives the same numbers
    z = torch.randn(6, 50)
    y = torch.randint(0, 50, (6,))
    res = fast.chunked_logprobs(z, y, None, 0.7, chunk=4)
    assert torch.allclose(res[:, 0], torch.log_softmax(z / 0.7, -1)[torch.arange(6), y], atol=1e-6)


@pytest.mark.parametrize("temp", [0.7, 1.0, 1.3])
def test_chunked_logprobs_vjp_equals_autograd(temp):
    """ChunkedHead's written-out gradient (fast.chunked_logprobs' vjp) against autograd through the full
    log_softmax, in fp64, from hidden states through W and from logits; the entropy column is detached."""
    torch.manual_seed(1)
    N, H, V = 11, 6, 40
    x = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    g = torch.randn(N, dtype=torch.float64)  # an upstream gradient on each log-prob
    lse, ent = fast.softmax_stats((x @ w.T).detach() / temp)
    p = torch.softmax((x @ w.T).detach() / temp, -1)
    assert torch.allclose(lse, torch.logsumexp((x @ w.T).detach() / temp, -1), atol=1e-12)
    assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-12)
    ref = torch.log_softmax(x @ w.T / temp, -1)[torch.arange(N), y]
    dx_ref, dw_ref = torch.autograd.grad((ref * g).sum(), (x, w))
    res = fast.chunked_logprobs(x, y, w, temp, chunk=4)
    assert torch.allclose(res[:, 0], ref, atol=1e-12) and torch.allclose(res[:, 1], ent, atol=1e-12)
    dx, dw = torch.autograd.grad((res[:, 0] * g).sum() + 5.0 * res[:, 1].sum(), (x, w))  # the entropy: no gradient
    assert torch.allclose(dx, dx_ref, atol=1e-12) and torch.allclose(dw, dw_ref, atol=1e-12)
    z = (x @ w.T).detach().requires_grad_()  # from logits (w None): z itself is the user's, left as it was
    before = z.detach().clone()
    (dz,) = torch.autograd.grad((fast.chunked_logprobs(z, y, None, temp, chunk=4)[:, 0] * g).sum(), z)
    (dz_ref,) = torch.autograd.grad((torch.log_softmax(z / temp, -1)[torch.arange(N), y] * g).sum(), z)
    assert torch.allclose(dz, dz_ref, atol=1e-12) and torch.equal(z.detach(), before)


FSDP_GRADS = """
import json, sys, torch, torch.distributed as dist
import fast, grpo, rollout, sdpo, sft
rank, _, world, device = sft.init_distributed()
seqs = [([5, 6, 7], [8, 9, 10, 11]), ([5, 6, 7, 12, 13], [14, 15]), ([5, 6, 7], [4, 5]), ([9, 9], [7, 7, 7])]
tseqs = [([1, 2] + p, r) for p, r in seqs]  # the teacher sees a longer prompt

def loss_of(model, teacher, rows, trows, n_tokens):  # rows 0 and 2 share a prompt: packed into one row (rank 0)
    x, w, y, mask = fast.response_states(model, rows, 0, device, pack=64)
    tx, tw, _, _ = fast.response_states(teacher, trows, 0, device, pack=64)
    sel = mask.bool()
    res = fast.chunked_distillation(x[sel], tx[sel], y[sel], w, tw, topk=7, chunk=3, divergence=sdpo.divergence,
                                    finish_support=sdpo.finish_support)["divergence"]
    logp, m, _ = fast.token_logprobs(model, rows, 0, 1.0, device, chunk=2)
    return (res.sum() + 0.3 * (logp * m).sum()) / n_tokens

teacher, _ = rollout.load_model(sys.argv[1], "float32", device)
n_tokens = sum(len(r) for _, r in seqs)
if rank == 0:  # one process, the whole batch, no FSDP
    ref, _ = rollout.load_model(sys.argv[1], "float32", device)
    loss_of(ref, teacher, seqs, tseqs, n_tokens).backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
model, _ = rollout.load_model(sys.argv[1], "float32", device)
model = sft.shard_model(model, device, False, mixed_precision=False)
mine = list(range(rank, len(seqs), world))
# FSDP2 averages over ranks: world * local sum / global tokens = the global token mean
(world * loss_of(model, teacher, [seqs[i] for i in mine], [tseqs[i] for i in mine], n_tokens)).backward()
grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
if rank == 0:
    diff = max(float((grads[n] - want[n]).abs().max()) for n in want)
    scale = max(float(g.abs().max()) for g in want.values())
    json.dump(dict(diff=diff, scale=scale, names=len(grads)), open(sys.argv[2], "w"))
dist.barrier()  # every rank done before any closes the group
dist.destroy_process_group()
rollout.end_process(0)
"""


def test_fsdp2_chunked_losses_gradients_equal_one_process(tiny_model_dir, tmp_path):
    """On two ranks (FSDP2) the chunked SDPO and GRPO losses read the root's unsharded LM-head weight after
    its forward: the gradients must equal one process's, tied embedding included (packed rows on both sides)."""
    script = tmp_path / "fsdp_grads.py"
    script.write_text(FSDP_GRADS)
    run(
        *LAUNCH2,
        str(script),
        tiny_model_dir,
        str(tmp_path / "out.json"),
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["scale"] > 1e-3 and out["diff"] < 1e-5 * max(1.0, out["scale"]), out


def test_bench_rows_are_the_documented_ones_and_grade_runs():
    """bench.py (figures go to PERFORMANCE.md): every row its docstring names exists, and the cheapest one runs."""
    import bench

    named = {
        row
        for line in bench.__doc__.splitlines()
        if line.startswith("    python bench.py ")
        for row in line.split("#")[0].split()[2:]
    }
    assert named and named <= set(bench.ROWS), named - set(bench.ROWS)
    out = bench.bench_grade(n=24)
    wrong = sum(r.startswith(("Thus", "I think")) for r, _ in bench.mixed_responses(24))  # a + 1, and no box
    assert out["row"] == "grade" and out["responses"] == 24 and out["mean_score"] == round(1 - wrong / 24, 3)


def test_check_outcomes_on_hand_labelled_responses():
    def r(think, boxed):
        return f"<think>\n{think}\n</think>\n\nThe answer is \\boxed{{{boxed}}}."

    labelled = [  # (response, its outcomes, counted by hand, and whether it is graded right)
        (r("4 + 5 = 8. Wait, let me check: 8 - 5 = 3, not 4. I made a mistake: 4 + 5 = 9. So the answer is 9.", 9),
         dict(checks=1, wrong=1, caught=1, fixed=1, confirmed_wrong=0, false_alarms=0), True),
        (r("Hmm, 2 + 4 = 7. Wait, let me check: 7 - 4 = 3. Yes. So the answer is 7.", 7),  # the check passes it
         dict(checks=1, wrong=1, caught=0, fixed=0, confirmed_wrong=1, false_alarms=0), False),
        (r("3 * 4 = 12. Wait, let me check: 12 / 4 = 2, not 3. I made a mistake: 3 * 4 = 13.", 13),  # false alarm
         dict(checks=1, wrong=1, caught=0, fixed=0, confirmed_wrong=0, false_alarms=1), False),
        (r("9 - 3 = 5. Wait, let me check: 5 + 3 = 8, not 9. I made a mistake: 9 - 3 = 7. So 7.", 7),  # bad fix
         dict(checks=1, wrong=2, caught=1, fixed=0, confirmed_wrong=0, false_alarms=0), False),
        (r("6 * 7 = 41. So the answer is 41.", 41),  # a slip no check looks at
         dict(checks=0, wrong=1, caught=0, fixed=0, confirmed_wrong=0, false_alarms=0), False),
        (r("Hmm, let me check this again. 12 / 4 = 3. Wait, let me check: 3 * 4 = 12. Yes.", 3),  # one ungradable
         dict(checks=2, wrong=0, caught=0, fixed=0, confirmed_wrong=0, false_alarms=0), True),
        ("12 - 5 = 8. Wait, let me check: 8 + 5 = 13, not 12. I made a mistake: 12 - 5 = 7. \\boxed{7}",  # no think
         dict(checks=1, wrong=1, caught=1, fixed=1, confirmed_wrong=0, false_alarms=0), True),
        (r("5 / 2 = 2.5. 4 + 4 = 9. Wait, let me check: 9 - 4 = 5, not 4. Wait, let me check: 9 - 4 = 5, not 4. "
           "I made a mistake: 4 + 4 = 8. 6 - 1 = 4.", 4),  # a decimal is no equation; checked twice, caught once
         dict(checks=2, wrong=2, caught=1, fixed=1, confirmed_wrong=0, false_alarms=0), False),
    ]  # fmt: skip
    for response, want, _ in labelled:
        assert epistemic.check_outcomes(response) == want, response
    shares = epistemic.mechanism([x for x, _, _ in labelled], [ok for _, _, ok in labelled])
    assert shares == dict(check=7 / 8, catch=4 / 8, rescued=2 / 8, uncaught=5 / 8, confirmed_wrong=1 / 8)
    # the organism's own traces: exactly the slipped ones are caught and fixed, by the generator's own rule
    ps = data.load_problems("synthetic:style=think,split=all,n=120,slip=0.25", seed=5)
    for i, p in enumerate(ps):
        slipped = math.floor((i + 1) * 0.25) > math.floor(i * 0.25)
        o = epistemic.check_outcomes(p["solution"])
        assert (o["wrong"], o["caught"], o["fixed"], o["confirmed_wrong"], o["false_alarms"]) == (slipped,) * 3 + (
            0,
            0,
        )
        assert o["checks"] == p["solution"].count("Wait, let me check")


def test_marker_start_positions_by_hand():
    pieces = ["Ok", " W", "ait", ",", "", " hm", "m", " checking", " no", " maybe"]
    assert epistemic.marker_start_positions(pieces) == [1, 5, 7, 9]  # "W"+"ait" at " W"; "checking" counts
    assert epistemic.marker_start_positions(pieces, whole_words=True) == [1, 5, 9]  # not "checking"
    assert epistemic.marker_start_positions(["So", " 3"]) == []


def test_distill_positions_by_hand():
    assert sdpo.distill_positions(5, True) == [True] * 5
    assert sdpo.distill_positions(5, False, protected=[1]) == [False] * 5  # no context: nothing distilled
    assert sdpo.distill_positions(5, True, prefix=3) == [True, True, True, False, False]
    assert sdpo.distill_positions(5, True, prefix=3, protected=[0, 4, 9]) == [False, True, True, False, False]


def test_sdpo_loss_remedies_by_hand():
    """Each weight and each cap at work: logp - old_logp = 0.3, -0.2, 1.0 (exp 2.72, capped at 2), 0.1 and
    old_logp - rollout_logp = 0.2, 0.9 (exp 2.46, capped at 2), -0.4, 0.0; position 3 not distilled."""
    e = math.exp
    div = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64, requires_grad=True)
    logp = torch.tensor([-1.0, -2.0, -0.5, -1.2], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - torch.tensor([0.3, -0.2, 1.0, 0.1], dtype=torch.float64)
    rollout_lp = old - torch.tensor([0.2, 0.9, -0.4, 0.0], dtype=torch.float64)
    distill = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    w = [e(0.3) * e(0.2), e(-0.2) * 2.0, 2.0 * e(-0.4), e(0.1) * 1.0]  # importance weight x rollout correction
    loss, parts = sdpo.sdpo_loss(div, logp, old, rollout_lp, distill, n_distill=3)
    assert loss.item() == pytest.approx((0.5 * w[0] + 1.0 * w[1] + 2.0 * w[2]) / 3, rel=1e-12)
    loss.backward()
    assert div.grad.tolist() == pytest.approx([w[0] / 3, w[1] / 3, w[2] / 3, 0.0], rel=1e-12)
    assert logp.grad is None or not logp.grad.any()  # the weights are detached: Eq. 1 reaches the model through D
    # the caps are flags: --is-clip 3 and --rollout-is-clip 2.5 release positions 2 and 1
    loss, _ = sdpo.sdpo_loss(div, logp, old, rollout_lp, distill, 3, is_clip=3.0, rollout_is_clip=2.5)
    w3 = [w[0], e(-0.2) * e(0.9), e(1.0) * e(-0.4)]
    assert loss.item() == pytest.approx((0.5 * w3[0] + 1.0 * w3[1] + 2.0 * w3[2]) / 3, rel=1e-12)
    # --entropy-weight: each distilled term times the teacher's normalised entropy
    ent = torch.tensor([0.5, 1.0, 0.25, 0.8], dtype=torch.float64)
    loss, _ = sdpo.sdpo_loss(div, logp, old, rollout_lp, distill, 3, teacher_entropy=ent)
    assert loss.item() == pytest.approx((0.5 * 0.5 * w[0] + 1.0 * w[1] + 0.25 * 2.0 * w[2]) / 3, rel=1e-12)
    # --pg-coef 0.5, advantages 1, 1, -1, -1 over 4 tokens: GRPO's clipped surrogate times the rollout correction.
    # ratios e^0.3 (above 1.28: clipped, no gradient), e^-0.2, e^1.0 (A < 0: unclipped, under the dual clip 3), e^0.1
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    logp.grad = div.grad = None
    loss, parts = sdpo.sdpo_loss(div, logp, old, rollout_lp, distill, 3, pg_coef=0.5, advantages=adv, n_tokens=4)
    rc = [e(0.2), 2.0, e(-0.4), 1.0]
    terms = [-1.28 * rc[0], -e(-0.2) * rc[1], e(1.0) * rc[2], e(0.1) * rc[3]]
    assert parts["pg_loss"] == pytest.approx(sum(terms) / 4, rel=1e-9)
    assert loss.item() == pytest.approx(parts["distill_loss"] + 0.5 * sum(terms) / 4, rel=1e-12)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx(
        [0.0, 0.5 * terms[1] / 4, 0.5 * terms[2] / 4, 0.5 * terms[3] / 4], rel=1e-9
    )  # d(ratio)/d(logp) = ratio


def _support_jsd(s_logits, t_logits, k=100, alpha=0.5):
    """Eq. 1's divergence written a second way, in probabilities: the student's top-k + the tail 1 - sum, then
    (1 - a) KL(S || M) + a KL(T || M), M = (1 - a) S + a T. Also KL(S || T) on that support. (R, V) -> (R,), (R,)"""
    ps, pt = torch.softmax(s_logits, -1), torch.softmax(t_logits.detach(), -1)
    idx = ps.detach().topk(k, -1).indices
    p, q = (torch.cat([x.gather(-1, idx), 1 - x.gather(-1, idx).sum(-1, keepdim=True)], -1) for x in (ps, pt))
    m = (1 - alpha) * p + alpha * q

    def kl(a, b):
        return (a * (a / b).log()).sum(-1)

    return (1 - alpha) * kl(p, m) + alpha * kl(q, m), kl(p, q).detach()


def test_support_jsd_against_brute_force():
    torch.manual_seed(3)
    s, t = torch.randn(2, 7, dtype=torch.float64) * 2, torch.randn(2, 7, dtype=torch.float64) * 2
    d, kl = _support_jsd(s, t, k=3, alpha=0.5)
    for i in range(2):
        assert float(d[i]) == pytest.approx(_brute_divergence(s[i].tolist(), t[i].tolist(), 3, 0.5, True), rel=1e-10)
        assert float(kl[i]) == pytest.approx(_brute_divergence(s[i].tolist(), t[i].tolist(), 3, 1.0, True), rel=1e-10)


def _sdpo_loss_by_hand(
    student,
    teacher,
    tok,
    rollouts,
    contexts,
    pg_coef=0.0,
    entropy_weight=False,
    stats=None,
    template="sdpo",
    thinking="auto",
    protected=None,
    loss_agg="seq-mean-token-mean",
):
    """SDPO's first step, on-policy, written out: per distilled token w * e * D, w the rollout importance weight
    min(exp(logp - logp_rollout), 2), e the teacher's entropy / log V with --entropy-weight, D `_support_jsd`;
    token-mean: over the step's distilled tokens; seq-mean-token-mean: each response's mean over its distilled
    tokens (0 without any), then the mean over all responses. + pg_coef * GRPO's loss, aggregated alike over every
    token. The teacher sees the chat template (`thinking`) of the reprompt (`template`) of (question, c) and the
    student's response; rows with no c, and the tokens equal to `protected`, are not distilled. `stats` collects
    (token, KL(S || T)) at each distilled position."""
    questions = {f"digits-{i}": p["question"] for i, p in enumerate(DIGIT_PROBLEMS)}
    distilled, pg = [], []
    for r, c in zip(rollouts, contexts):
        z = _response_logits(student, r["prompt_ids"], r["response_ids"])
        logp = torch.log_softmax(z, -1).gather(-1, torch.tensor(r["response_ids"])[:, None]).squeeze(-1)
        w = torch.clamp(torch.exp(logp.detach() - torch.tensor(r["rollout_logprobs"], dtype=torch.float64)), max=2.0)
        pg.append(-r["advantage"] * torch.exp(logp - logp.detach()) * w)
        keep = [t != protected and c is not None for t in r["response_ids"]]
        if c is None:
            distilled.append(logp[:0])
            continue
        t_ids = tok(
            rollout.chat_prompt(
                tok, rollout.reprompt(questions[r["problem"]], c, template=template), thinking=thinking
            ),
            add_special_tokens=False,
        )["input_ids"]
        with torch.no_grad():
            zt = _response_logits(teacher, t_ids, r["response_ids"])
        d, kl = _support_jsd(z, zt)
        e = 1.0
        if entropy_weight:
            lt = torch.log_softmax(zt, -1)
            e = -(lt.exp() * lt).sum(-1) / math.log(zt.shape[-1])
        distilled.append((w * e * d)[torch.tensor(keep)])
        if stats is not None:
            stats.extend((t, k) for t, k, x in zip(r["response_ids"], kl.tolist(), keep) if x)
    loss = _by_agg(distilled, loss_agg)
    return loss + pg_coef * _by_agg(pg, loss_agg) if pg_coef else loss


@pytest.mark.parametrize("loss_agg", grpo.LOSS_AGGS)
def test_sdpo_one_and_two_processes_and_skipped_rows_equal_the_gradient_by_hand(digit_model_dir, tmp_path, loss_agg):
    """Step 1 of SDPO with the dataset's solutions as c, under SGD at lr 1: rows without a solution have no loss.
    One process, two (rank 0's rows all have c, rank 1's none), and one process without skipping the rows
    that have no c give the same loss, KL and gradient, and it is autograd's through plain forwards of SDPO's loss
    written out by hand. Step 2's KL is the student's against the initial, frozen teacher."""
    flags = ("--teacher-context", "dataset", "--loss-agg", loss_agg)
    (one, one2), r1, o1 = _digit_run(digit_model_dir, tmp_path, "sdpo.py", "one", *flags, sgd=True, steps=2)
    (two,), r2, o2 = _digit_run(digit_model_dir, tmp_path, "sdpo.py", "two", *flags, sgd=True, launcher=LAUNCH2)
    (full,), r3, o3 = _digit_run(digit_model_dir, tmp_path, "sdpo.py", "full", *flags, "--no-skip-zero-rows", sgd=True)
    step1 = [r for r in r1 if r["step"] == 1]
    assert [r["text"] for r in step1] == [r["text"] for r in r2] == [r["text"] for r in r3]
    solutions = {f"digits-{i}": p.get("solution") for i, p in enumerate(DIGIT_PROBLEMS)}
    contexts = [solutions[r["problem"]] for r in step1]
    assert [r["context"] for r in step1] == contexts
    assert [r["distilled"] for r in step1] == [
        len(r["response_ids"]) * (c is not None) for r, c in zip(step1, contexts)
    ]
    model, tok = rollout.load_model(digit_model_dir)
    stats = []
    loss, grads = _grads_by_hand(
        digit_model_dir, lambda m: _sdpo_loss_by_hand(m, model, tok, step1, contexts, stats=stats, loss_agg=loss_agg)
    )
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    kl = sum(k for _, k in stats) / len(stats)
    for m, out in ((one, o1), (two, o2), (full, o3)):
        assert m["masked_frac"] == 0.5 and m["loss"] == pytest.approx(loss, rel=1e-5)
        assert m["grad_norm"] == pytest.approx(norm, rel=1e-5) and m["kl"] == pytest.approx(kl, rel=1e-4)
        _assert_same_gradient(_gradient_from_sgd_step(digit_model_dir, out), grads, weights=_weights(digit_model_dir))
    assert one["trained_frac"] == 0.5 and full["trained_frac"] == 1.0
    assert 0.5 < two["trained_frac"] < 1.0  # rank 1 runs filler rows (zero loss) to match rank 0's collectives
    assert one["teacher_tokens"] < full["teacher_tokens"] and one["train_tokens"] < full["train_tokens"]
    # step 2: the student is step_1's weights, the teacher still the initial model
    step2 = [r for r in r1 if r["step"] == 2]
    student, _ = rollout.load_model(str(o1 / "step_1"))
    stats = []
    with torch.no_grad():
        _sdpo_loss_by_hand(student, model, tok, step2, [solutions[r["problem"]] for r in step2], stats=stats)
    assert one2["kl"] == pytest.approx(sum(k for _, k in stats) / len(stats), rel=1e-4)


def test_sdpo_sibling_contexts_and_remedies_equal_the_gradient_by_hand(digit_model_dir, tmp_path):
    """c = the first other successful rollout of the group, with --pg-coef 0.5 and --entropy-weight: the loss, its
    parts and the gradient written out by hand; the App. B.6 KL on the marker token " Wait" recomputed."""
    # --seed 1: the tests' sampler draws the same step on every CPU, one where the two sibling orders choose
    # differently, some rows have no successful sibling, and " Wait" is distilled
    (m,), rolls, out = _digit_run(
        digit_model_dir, tmp_path, "sdpo.py", "sib", "--pg-coef", "0.5", "--entropy-weight", "--seed", "1", sgd=True
    )
    rewards = _rewards_by_hand(rolls)
    # --sibling balanced: verl's batch order on its 4 ranks (the independent port of its partition), each rank's
    # part by workload, short ones at both ends
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rolls]
    work = [24576 * n + n * n for n in lengths]
    order = []
    for part in _verl_partitions(work, 4):
        ranked = sorted(part, key=lambda i: (work[i], i))
        order += ranked[0::2] + ranked[1::2][::-1]
    place = {i: p for p, i in enumerate(order)}
    contexts, in_rollout_order = [], []
    for i in range(len(rolls)):
        succ = [j for j in range(i // 4 * 4, i // 4 * 4 + 4) if j != i and rewards[j] >= 0.5]
        contexts.append(rolls[min(succ, key=place.get)]["text"] if succ else None)
        in_rollout_order.append(rolls[succ[0]]["text"] if succ else None)
    assert contexts != in_rollout_order  # the two choices differ on this step
    assert [r["context"] for r in rolls] == contexts and 0 < sum(c is not None for c in contexts) < len(rolls)
    model, tok = rollout.load_model(digit_model_dir)
    stats = []
    loss, grads = _grads_by_hand(
        digit_model_dir, lambda s: _sdpo_loss_by_hand(s, model, tok, rolls, contexts, 0.5, True, stats)
    )
    with torch.no_grad():
        pg = _sdpo_loss_by_hand(model, model, tok, rolls, [None] * len(rolls), 1.0)
    # the on-policy surrogate's value is sum A * w, ~0 within each group: compared to 1e-6 (|A| ~ 0.3)
    assert m["pg_loss"] == pytest.approx(float(pg), abs=1e-6) and m["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert m["distill_loss"] == pytest.approx(loss - 0.5 * float(pg), rel=1e-4)  # fp32 JSDs against fp64
    assert m["masked_frac"] == sum(c is None for c in contexts) / len(rolls)
    _assert_same_gradient(_gradient_from_sgd_step(digit_model_dir, out), grads, weights=_weights(digit_model_dir))
    (wait_id,) = tok(" Wait", add_special_tokens=False)["input_ids"]
    at_wait = [k for t, k in stats if t == wait_id]
    assert at_wait and m["kl/' Wait'"] == pytest.approx(sum(at_wait) / len(at_wait), rel=1e-4)
    assert m["kl_epistemic"] == pytest.approx(sum(at_wait) / len(at_wait), rel=1e-4)


def _qwen_digit_model(digit_model_dir, tmp_path) -> str:
    """The digit model with a Qwen3-style chat template (thinking on/off)."""
    from transformers import AutoTokenizer

    path = tmp_path / "digits-qwen"
    shutil.copytree(digit_model_dir, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = QWEN3_LIKE
    tok.save_pretrained(path)
    return str(path)


def test_sdpo_remedy_and_prompt_flags_reach_the_loss(digit_model_dir, tmp_path):
    """--protect-epistemic (no loss where " Wait" begins), --reprompt uncertainty (App. C's teacher prompt),
    --max-reprompt-len (the longer of the two teacher prompts masked), --thinking off --teacher-thinking (App. E:
    the teacher's template thinks, the student's does not): the loss and the gradient written out by hand."""
    model_dir = _qwen_digit_model(digit_model_dir, tmp_path)
    model, tok = rollout.load_model(model_dir)
    solutions = {f"digits-{i}": p.get("solution") for i, p in enumerate(DIGIT_PROBLEMS)}
    teacher_len = {
        k: len(
            tok(
                rollout.chat_prompt(
                    tok,
                    rollout.reprompt(DIGIT_PROBLEMS[int(k[7:])]["question"], s, template="uncertainty"),
                    thinking="on",
                ),
                add_special_tokens=False,
            )["input_ids"]
        )
        for k, s in solutions.items()
        if s
    }
    limit = min(teacher_len.values())
    assert max(teacher_len.values()) > limit  # one teacher prompt fits, the other is masked
    # --seed 1: the tests' sampler draws the same step on every CPU, one where rows with a context say " Wait"
    (m,), rolls, out = _digit_run(
        model_dir,
        tmp_path,
        "sdpo.py",
        "remedies",
        "--teacher-context",
        "dataset",
        "--protect-epistemic",
        "--reprompt",
        "uncertainty",
        "--max-reprompt-len",
        str(limit),
        "--thinking",
        "off",
        "--teacher-thinking",
        "--seed",
        "1",
        sgd=True,
    )
    student_prompt = tok.decode(rolls[0]["prompt_ids"])
    assert student_prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
    contexts = [
        solutions[r["problem"]] if solutions[r["problem"]] and teacher_len[r["problem"]] <= limit else None
        for r in rolls
    ]
    (wait_id,) = tok(" Wait", add_special_tokens=False)["input_ids"]
    assert [r["context"] for r in rolls] == contexts
    assert [r["distilled"] for r in rolls] == [
        sum(t != wait_id for t in r["response_ids"]) * (c is not None) for r, c in zip(rolls, contexts)
    ]
    n_wait = sum(sum(t == wait_id for t in r["response_ids"]) for r, c in zip(rolls, contexts) if c is not None)
    assert n_wait > 0 and m["protected_frac"] == pytest.approx(n_wait / (n_wait + sum(r["distilled"] for r in rolls)))
    loss, grads = _grads_by_hand(
        model_dir,
        lambda s: _sdpo_loss_by_hand(
            s, model, tok, rolls, contexts, template="uncertainty", thinking="on", protected=wait_id
        ),
    )
    assert m["loss"] == pytest.approx(loss, rel=1e-5)
    # short rows' few distilled tokens weigh up to 1/1 each: fp32 rounding reaches ~1.3e-4 of the largest entry here
    _assert_same_gradient(_gradient_from_sgd_step(model_dir, out), grads, rel=5e-4, weights=_weights(model_dir))


def test_sdpo_ema_teacher_and_resume_equal_the_uninterrupted_run(digit_model_dir, tmp_path):
    """--teacher-ema 0.05 with AdamW, two mini-batches a step (off-policy): each step's saved teacher is (1 - 0.05)
    teacher + 0.05 student, recomputed from the saved weights; the run resumed from step 2 reloads that teacher and
    gives step 3's rollouts, metrics, weights and teacher as the uninterrupted run does."""
    from safetensors.torch import load_file

    flags = ("--teacher-ema", "0.05", "--lr", "1e-2", "--warmup", "2", "--mini-batch", "2")  # two updates a step
    full, rolls, out = _digit_run(digit_model_dir, tmp_path, "sdpo.py", "full", *flags, steps=3)
    assert [m["updates"] for m in full] == [2, 2, 2]
    teacher = {k: v.double() for k, v in _weights(digit_model_dir).items()}
    for step in (1, 2, 3):
        student = _weights(out / f"step_{step}")
        teacher = {k: 0.95 * teacher[k] + 0.05 * student[k].double() for k in teacher}
        saved = load_file(out / f"step_{step}" / "teacher" / "model.safetensors")
        assert all(torch.allclose(saved[k].double(), teacher[k], rtol=1e-6, atol=1e-7) for k in teacher)
    assert max(float((teacher[k] - _weights(digit_model_dir)[k]).abs().max()) for k in teacher) > 1e-4
    (tmp_path / "resumed").mkdir()
    shutil.copytree(out / "step_2", tmp_path / "resumed" / "step_2")
    (m3,), rolls3, out3 = _digit_run(digit_model_dir, tmp_path, "sdpo.py", "resumed", *flags, "--resume", steps=3)
    assert rolls3 == [r for r in rolls if r["step"] == 3]
    _step_metrics_equal(m3, full[2])
    for name in ("model.safetensors", "teacher/model.safetensors"):
        a, b = load_file(out3 / "step_3" / name), load_file(out / "step_3" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_sdpo_embedded_model_sibling_context(tmp_path):
    """The embedded model, c = s: the masked rows are exactly those with no other success in their group."""
    flags = "--steps 1 --prompts-per-step 2 --rollouts 4 --max-new-tokens 24 --eval-n 1 --eval-max-new-tokens 8 "
    flags += "--lenient --eval-data synthetic:split=ood,n=2 --distill-prefix 16 --save-rollouts --save-every 0"
    _main_in_process("sdpo.py", *flags.split(), "--out", str(tmp_path), forced=False)
    (row,) = _jsonl(tmp_path / "metrics.jsonl")
    rolls = _jsonl(tmp_path / "rollouts.jsonl")
    alone = [
        not any(rolls[j]["reward"] >= 0.5 for j in range(i // 4 * 4, i // 4 * 4 + 4) if j != i)
        for i in range(len(rolls))
    ]
    assert [r["context"] is None for r in rolls] == alone and row["masked_frac"] == sum(alone) / len(rolls)
    assert [r["distilled"] for r in rolls] == [
        0 if a else min(len(r["response_ids"]), 16) for r, a in zip(rolls, alone)
    ]
    assert math.isfinite(row["loss"]) and (row["loss"] > 0) == (not all(alone))


def test_marker_tokens_surface_variants(embedded_tokenizer):
    table = epistemic.marker_tokens(embedded_tokenizer)
    forms = set(table.values())
    assert {"Wait", " wait", " Wait", " maybe", " check"} <= forms  # single tokens in SmolLM2's vocabulary
    for tid, text in table.items():
        assert embedded_tokenizer.decode([tid]) == text and text.strip().lower() in epistemic.MARKERS
    wait_id = embedded_tokenizer(" Wait", add_special_tokens=False)["input_ids"]
    assert len(wait_id) == 1 and table[wait_id[0]] == " Wait"


# ============================================================================================
# report/make.py: the reproduction report
# ============================================================================================
from report import make as report_make


def test_bootstrap_against_its_exact_distribution():
    # 2 seeds x 2 problems: 16 equally likely replicates (6.25% each), so the 2.5% and 97.5% points are the smallest
    # and largest: seed 0 with problem 0 twice (0.2), seed 1 with problem 1 twice (1.0)
    assert report_make.bootstrap([[0.2, 0.4], [0.6, 1.0]], reps=4000) == pytest.approx((0.55, 0.2, 1.0))
    x = [0.0, 0.25, 1.0, 0.5, 0.75]
    # a paired difference: the same problems drawn for both, so a constant shift has no spread
    assert report_make.bootstrap([[v + 0.1 for v in x]], [x], reps=500) == pytest.approx((0.1, 0.1, 0.1))
    point, low, high = report_make.bootstrap([x], reps=4000)
    assert point == pytest.approx(0.5) and 0.1 < low < 0.5 < high < 0.9
    assert report_make.ci((0.1, 0.02, 0.2), ".2f", sign=True) == "+0.10 [+0.02, +0.20] *"
    assert report_make.ci((0.1, -0.02, 0.2), ".2f", sign=True) == "+0.10 [-0.02, +0.20]"


def test_report_from_fake_runs(tmp_path):
    root = tmp_path / "runs"
    good = "<think>\nHmm.\n</think>\n\\boxed{3}"
    for name, seed, scores, accs in (
        ("grpo", 0, [0.1, 0.3], [0, 1, 0.5]),
        ("sdpo", 0, [0.2, 0.4], [1, 1, 1]),
        ("sdpo", 1, [0.2, 0.6], [1, 1, 1]),
    ):
        d = root / name / f"seed{seed}"
        (d / "eval").mkdir(parents=True)
        rows = [{"resumed_from": 0}] + [
            dict(
                step=i + 1,
                score=x,
                length=100 - 10 * i,
                epistemic=0.5,
                think_length=80,
                answer_length=20 - 10 * i,
                kl=0.0,
            )
            for i, x in enumerate(scores)
        ]
        if name == "sdpo":
            rows[-1].update(kl=0.02 * (seed + 1), kl_epistemic=0.0)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [rows[1]]))  # a resumed step
        samples = [
            dict(
                benchmark="ood",
                id=f"p{k}",
                scores=[a, a],
                lengths=[10, 30],
                epistemic=[1, 2],
                responses=[good, "3"],
                finish_reasons=["stop", "length"],
            )
            for k, a in enumerate(accs)
        ]
        (d / "eval" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        (d / "eval" / "summary.json").write_text("{}")
    (root / "base").mkdir()
    (root / "base" / "samples.jsonl").write_text(
        json.dumps(
            dict(
                benchmark="ood",
                id="p0",
                scores=[0, 1],
                lengths=[4, 6],
                epistemic=[0, 0],
                responses=[good, good + "x"],
                finish_reasons=["stop", "stop"],
            )
        )
        + "\n"
    )
    sweep = root / "sweep" / "grpo_lr1e-5" / "seed0"  # the learning-rate sweep: not a run of the comparisons
    sweep.mkdir(parents=True)
    rows = [dict(step=i + 1, lr=1e-5, score=x, length=50 + i, epistemic=2.0) for i, x in enumerate([0.2, 0.4, 0.7])]
    (sweep / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    late = root / "grpo_late" / "seed0"  # a run evaluated at step 10 only, so far: left out, and said
    late.mkdir(parents=True)
    (late / "eval_samples.jsonl").write_text(json.dumps(dict(benchmark="ood", id="p0", step=10, scores=[1.0],
        lengths=[5], epistemic=[0], responses=["x"], finish_reasons=["stop"])) + "\n")  # fmt: skip
    assert report_make.read_samples(root / "base" / "samples.jsonl")[("ood", "p0")] == dict(
        acc=0.5, length=5.0, epistemic=0.0, format=1.0, truncated=0.0, n=2, check=0.0, catch=0.0, rescued=0.0,
        uncaught=0.0, confirmed_wrong=0.0
    )  # fmt: skip
    # evaluations during training (eval_samples.jsonl) at steps 10 and 20 on two problems: GRPO's step-20 responses
    # to p0 catch and fix a slip and end right; SDPO's never check, and end wrong
    caught = (
        "<think>\n4 + 5 = 8. Wait, let me check: 8 - 5 = 3, not 4. I made a mistake: 4 + 5 = 9.\n</think> \\boxed{9}"
    )
    unchecked = "<think>\n6 * 7 = 41.\n</think> \\boxed{41}"
    for name, seed, p0 in (("grpo", 0, [caught, caught]), ("sdpo", 0, [unchecked] * 2), ("sdpo", 1, [unchecked] * 2)):
        records = [
            dict(benchmark="ood", id=pid, step=step, scores=[float(x == caught) for x in xs], lengths=[10, 20],
                 epistemic=[2 * ("check" in x) for x in xs], responses=xs, finish_reasons=["stop", "stop"])
            for step in (10, 20)
            for pid, xs in (("p0", p0 if step == 20 else [unchecked] * 2), ("p1", [unchecked] * 2))
        ]  # fmt: skip
        with open(root / name / f"seed{seed}" / "eval_samples.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records + records[:1])  # a repeated record: the last wins
    md = report_make.report(
        report_make.ReportArgs(
            runs=str(root), out=str(tmp_path / "rep"), groups=["A=grpo,sdpo,nope", "B=sdpo,gone"], last=1, boot=400
        )
    )
    assert md == (tmp_path / "rep" / "REPORT.md").read_text()
    _main_in_process(
        "report.make",
        str(root),
        "--out",
        str(tmp_path / "cli"),
        "--groups",
        "A=grpo,sdpo,nope",
        "B=sdpo,gone",
        "--last",
        "1",
        "--boot",
        "400",
    )  # the command the README runs
    assert (tmp_path / "cli" / "REPORT.md").read_text() == md.replace(str(tmp_path / "rep"), str(tmp_path / "cli"))

    def cells(run, after):
        return [c.strip() for c in md[md.index(after) :].split(f"| {run} ")[1].split("\n")[0].strip("|").split("|")]

    sdpo = cells("sdpo", "## Training runs")
    # last scores 0.4 and 0.6 -> 0.5, seeds drawn: [0.4, 0.6]; length 100 at step 1, 90 last; answer length 10
    assert sdpo[:4] == ["2", "0.500 [0.400, 0.600]", "100.0 [100.0, 100.0]", "90.0 [90.0, 90.0]"]
    assert sdpo[6:8] == ["80.0 [80.0, 80.0]", "10.0 [10.0, 10.0]"] and sdpo[9] == "1.000 [1.000, 1.000]"
    assert sdpo[8] == "0.030 [0.020, 0.040]"  # the teacher KL of the last step: 0.02 and 0.04
    assert cells("grpo", "## Training runs")[8:10] == ["-", "0.500 [0.000, 1.000]"]  # GRPO has no teacher
    diff = cells("sdpo", "## Each run minus grpo")
    assert diff[:2] == ["2", "+0.0 [+0.0, +0.0]"] and diff[4].startswith("+0.500 [+0.000, +1.000]")  # touches 0
    assert (
        "| ood       | 1        | 0.500 [0.500, 0.500] | 0.00 [0.00, 0.00] | 5.0 [5.0, 5.0] | 1.000 [1.000, 1.000]"
        in md
    )  # the table before training: one problem, its two responses both close </think> and box
    assert "| grpo_lr1e-5 | 1e-05 | 0.700          | 52.000 | 2.000 |" in md  # the last step's (--last 1)
    assert "sweep" not in md[md.index("## The evaluation sets") :]
    sets = md[md.index("## The evaluation sets over 20 steps") : md.index("## Training runs")]
    assert "2 problems x 2 sample(s) per seed" in sets and "![A: accuracy" in sets and "grpo_late |" not in sets
    assert "Left out, not yet evaluated at every step: grpo_late." in sets
    # GRPO at step 20: p0 right (1.0), p1 wrong (0.0): acc 0.5; half its responses catch, fix and end right
    assert cells("grpo", "### ood")[:4] == ["1", "0.000 [0.000, 0.000]", "0.500 [0.000, 1.000]", "15.0 [15.0, 15.0]"]
    assert cells("grpo", "### ood")[5:9] == ["0.500 [0.000, 1.000]"] * 3 + ["0.500 [0.000, 1.000]"]  # check, catch,
    # rescued; uncaught: p1's slip
    assert cells("sdpo", "Minus grpo:")[:2] == ["+0.000 [+0.000, +0.000]", "-0.500 [-1.000, +0.000]"]
    assert cells("sdpo", "Minus grpo:")[4:8] == ["-0.500 [-1.000, +0.000]"] * 3 + ["+0.500 [+0.000, +1.000]"]
    assert (tmp_path / "rep" / "three_sets_over_steps.png").read_bytes()[:4] == b"\x89PNG"
    two = report_make.report(report_make.ReportArgs(runs=str(root), out=str(tmp_path / "two"), groups=["A=grpo",
        "B b=sdpo,grpo"], last=1, boot=50))  # fmt: skip
    assert "![A: accuracy, length and E(y) per evaluation set against step](three_sets_over_steps.png)" in two
    assert "![B b: accuracy" in two and (tmp_path / "two" / "sets_b_b.png").read_bytes()[:4] == b"\x89PNG"
    none = report_make.report(
        report_make.ReportArgs(runs=str(root), out=str(tmp_path / "none"), groups=["none"], boot=50)
    )
    assert "![" not in none and not list((tmp_path / "none").glob("*.png"))  # `--groups none`: tables only
    assert "## B\n" not in md and "## A\n" in md  # B: its only run is in A's plot
    assert "![A](a.png)" in md and (tmp_path / "rep" / "a.png").read_bytes()[:4] == b"\x89PNG"  # matplotlib: in the
    # README's test install
    per_step = md[md.index("## Per step") :]
    assert per_step.count("| grpo ") == 2 and "| sdpo | 2     | 2    | 0.500 | 90.0" in per_step  # the repeat dropped
    # a third seed trained, its evaluation under way (samples.jsonl, no summary.json): sdpo has no held-out figures
    shutil.copytree(root / "sdpo" / "seed1", root / "sdpo" / "seed2")
    (root / "sdpo" / "seed2" / "eval" / "summary.json").unlink()
    md = report_make.report(report_make.ReportArgs(runs=str(root), out=str(tmp_path / "rep"), last=1, boot=400))
    sdpo = cells("sdpo", "## Training runs")
    assert sdpo[0] == "3" and sdpo[9:] == ["-", "-", "-"] and cells("grpo", "## Training runs")[9] != "-"
    assert cells("sdpo", "## Each run minus grpo")[4:] == ["-", "-", "-"]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        report_make.report(report_make.ReportArgs(runs=str(tmp_path / "missing")))
    (root / "base" / "samples.jsonl").write_text('{"benchmark": "ood"}\n')
    with pytest.raises(ValueError, match="samples.jsonl: row 0"):
        report_make.report(report_make.ReportArgs(runs=str(root), out=str(tmp_path / "rep")))


def test_report_table2_per_evaluation_set(tmp_path):
    """Table 2's section: the training sets' means, then per set (in the order evaluated) the organism, each SFT
    model and D_sg minus D_ug paired on problems. The problems differ and the files list them in other orders; D_sg
    differs from D_ug by a constant per problem, so only a paired difference collapses to that constant."""
    root = tmp_path / "runs"
    (root / "sft" / "unguided" / "eval").mkdir(parents=True)
    (root / "sft" / "solution" / "eval").mkdir(parents=True)
    (root / "base").mkdir()
    for name, rows in (("unguided", [(10, 1), (20, 3)]), ("solution", [(6, 0)])):
        with open(root / "sft" / f"d_{name}.jsonl", "w") as f:
            f.writelines(json.dumps(dict(length=n, epistemic=e)) + "\n" for n, e in rows)

    def write(path, acc, gap, order):  # sets "two" then "one", problems p0-p2 in `order`, 2 responses a problem
        records = [
            dict(benchmark=b, id=f"p{k}", scores=[acc[b][k]] * 2, lengths=[10 * k + gap, 10 * k + gap],
                 epistemic=[k, k + 2 * gap], responses=["x", "y"], finish_reasons=["stop", "stop"])
            for b in ("two", "one") for k in order
        ]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in records))

    ug = {"two": [0.0, 0.5, 0.0], "one": [0.5, 1.0, 0.0]}
    write(root / "sft" / "unguided" / "eval" / "samples.jsonl", ug, 0, (2, 0, 1))
    sg = {"two": [1.0, 1.0, 1.0], "one": [0.5, 1.0, 0.0]}  # "two": +1, +0.5, +1 per problem; "one": the same
    write(root / "sft" / "solution" / "eval" / "samples.jsonl", sg, 3, (0, 1, 2))
    write(root / "base" / "samples.jsonl", {"two": [0.5] * 3, "one": [0.0] * 3}, 0, (0, 1, 2))

    def table():
        md = report_make._table2(root, boot=200)
        return [[c.strip() for c in x.strip("|").split("|")] for x in md.splitlines() if x.startswith("| ")]

    lines = table()
    assert lines[1:3] == [["SFT on D_ug", "2", "15.0", "2.00"], ["SFT on D_sg", "1", "6.0", "0.00"]]
    body = [x for x in lines if x[0] in ("two", "one")]
    assert [x[:3] for x in body] == [[b, m, "3"] for b in ("two", "one") for m in
        ("organism", "SFT on D_ug", "SFT on D_sg", "D_sg minus D_ug")]  # fmt: skip
    assert body[0][3] == "0.500 [0.500, 0.500]" and body[1][3].startswith("0.167 [")
    assert body[1][4].startswith("10.0 [") and body[2][4].startswith("13.0 [")  # lengths 0, 10, 20 (+3 for D_sg)
    assert body[3][4:] == ["+3.0 [+3.0, +3.0] *", "+3.00 [+3.00, +3.00] *"]  # paired: the constant gap
    assert body[3][3] == "+0.833 [+0.500, +1.000] *"  # gaps 1, 0.5, 1: p1 alone in 1/27 > 2.5% of draws
    assert body[7][3] == "+0.000 [+0.000, +0.000]"  # "one": the same scores, problem by problem
    shutil.rmtree(root / "base")  # no organism evaluated: no organism rows
    assert [x[1] for x in table() if x[0] == "one"] == ["SFT on D_ug", "SFT on D_sg", "D_sg minus D_ug"]
    records = _jsonl(root / "sft" / "solution" / "eval" / "samples.jsonl")  # D_sg graded "one" on other problems
    (root / "sft" / "solution" / "eval" / "samples.jsonl").write_text(
        "".join(json.dumps(dict(r, id=r["id"] + "x") if r["benchmark"] == "one" else r) + "\n" for r in records)
    )
    assert [x[1] for x in table() if x[0] == "one"] == ["SFT on D_ug", "SFT on D_sg"]  # unpaired: no difference
    assert [x[1] for x in table() if x[0] == "two"][-1] == "D_sg minus D_ug"  # set by set
    (root / "sft" / "solution" / "eval" / "samples.jsonl").unlink()  # one model evaluated: no difference row
    md = report_make._table2(root, boot=200)
    assert "SFT on D_sg" not in md and "minus" not in md and md.count("| SFT on D_ug |") == 3
    shutil.rmtree(root / "sft")
    assert report_make._table2(root, boot=200) is None


# ============================================================================================
# The GPU path on CPU: a contract fake of the vLLM 0.33 surface the project uses
# ============================================================================================
class FakeLogprob:
    """vllm.logprobs.Logprob: the fields we read."""

    def __init__(self, logprob: float):
        self.logprob, self.rank, self.decoded_token = logprob, None, None


class FakeSamplingParams:
    """vllm.SamplingParams (0.33): the fields we set; top_k 0 (or -1) is off, seed None draws at random."""

    def __init__(
        self, n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, seed=None, logprobs=None, detokenize=True
    ):
        # vllm/sampling_params.py _verify_args, 0.33
        if top_k < -1 or not 0 < top_p <= 1 or n < 1 or not 0 <= temperature <= 2 or max_tokens < 1:
            raise ValueError(
                f"bad sampling params n={n} top_k={top_k} top_p={top_p} temperature={temperature} "
                f"max_tokens={max_tokens}"
            )
        self.n, self.temperature, self.top_p, self.top_k = n, temperature, top_p, top_k
        self.max_tokens, self.seed, self.logprobs, self.detokenize = max_tokens, seed, logprobs, detokenize


def FakeTokensPrompt(**kw):  # vllm.inputs.TokensPrompt is a TypedDict
    return dict(kw)


class FakeCompletion:
    def __init__(self, index, token_ids, logprobs, finish_reason):
        self.index, self.token_ids, self.logprobs, self.finish_reason = index, token_ids, logprobs, finish_reason


class FakeRequestOutput:
    def __init__(self, prompt_token_ids, outputs):
        self.prompt_token_ids, self.outputs = prompt_token_ids, outputs


class FakeLLM:
    """vllm.LLM (0.33) as the project calls it, sampling on the CPU from a copy of the checkpoint's weights.

    What it holds the caller to, each read from vLLM 0.33's source:
      - external_launcher reads RANK / LOCAL_RANK (KeyError otherwise) and, without an initialised
        torch.distributed group, would create one with the device backend alone: refused here;
      - max_model_len may not exceed the model's context; a request longer than it is cut silently
        (finish_reason "length", vllm/v1/core/sched/utils.py);
      - a request with n samples and seed s seeds its k-th sample with s + k (vllm/v1/engine/parallel_sampling.py);
      - sleep needs enable_sleep_mode; level 2 discards the weights (NaN here), and generating before
        wake_up of both weights and kv_cache fails;
      - load_weights takes HF names; a tensor not in the engine's dtype is logged as a warning;
      - the default loader reads every top-level *.safetensors of the model directory, in sorted order, each over
        the last (vllm/model_executor/model_loader/default_loader.py), so a second model's file there wins;
      - with $FAKE_VLLM_GPU_BYTES set, start-up needs utilization x that total free, and the parameters of every
        model alive in the process (the trainer's policy, here) count as taken (v1/worker/utils.py request_memory).
    Every call is appended to $FAKE_VLLM_LOG (one JSON line each, with the rank), when set."""

    def __init__(
        self,
        model,
        tensor_parallel_size=1,
        distributed_executor_backend=None,
        gpu_memory_utilization=0.9,
        max_model_len=None,
        enable_sleep_mode=False,
        seed=0,
        logprobs_mode="raw_logprobs",
        dtype="auto",
    ):
        import gc
        import warnings
        import torch.distributed as dist
        from safetensors.torch import load_file

        if distributed_executor_backend == "external_launcher":
            self.rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
            if not dist.is_initialized():
                raise RuntimeError(
                    "vLLM would create the default group with the device backend alone (nccl): "
                    "CPU all-reduces would fail on it"
                )
            t = torch.ones(1)
            dist.all_reduce(t)  # what the trainers do on the group vLLM reuses: it must take CPU tensors
        if os.environ.get("FAKE_VLLM_GPU_BYTES"):  # start-up: free memory >= utilization x total (v1/worker/utils.py)
            total = int(os.environ["FAKE_VLLM_GPU_BYTES"])
            with warnings.catch_warnings():  # isinstance on some of gc's objects warns of deprecated names
                warnings.simplefilter("ignore")
                held = {
                    p.data_ptr(): p.numel() * p.element_size()
                    for m in gc.get_objects()
                    if isinstance(m, torch.nn.Module)
                    for p in m.parameters()
                }  # this process's models: the "GPU"
            if total - sum(held.values()) < gpu_memory_utilization * total:
                raise ValueError(
                    f"Free memory on device ({total - sum(held.values())}/{total}) on startup is less "
                    f"than desired GPU memory utilization ({gpu_memory_utilization})"
                )
        self.model, _ = rollout.load_model(model, "float32", "cpu")
        for f in sorted(Path(model).glob("*.safetensors")):  # the default loader: every top-level file, in order
            self.model.load_state_dict(load_file(f), strict=False)
        limit = rollout.model_context(model)
        if not isinstance(max_model_len, int) or max_model_len <= 0 or (limit and max_model_len > limit):
            raise ValueError(f"max_model_len {max_model_len} is not in (0, {limit}]")
        self.max_model_len, self.sleep_mode, self.dtype = max_model_len, enable_sleep_mode, getattr(torch, dtype)
        self.logprobs_mode, self.asleep, self.warnings = logprobs_mode, set(), 0
        self.log(
            "init",
            max_model_len=max_model_len,
            logprobs_mode=logprobs_mode,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
        )

    def log(self, call, **kw):
        if os.environ.get("FAKE_VLLM_LOG"):
            with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
                f.write(json.dumps(dict(call=call, rank=int(os.environ.get("RANK", 0)), **kw)) + "\n")

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        if self.asleep:
            raise RuntimeError(f"generate on a sleeping engine ({sorted(self.asleep)} not woken)")
        sps = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        assert len(sps) == len(prompts) and all(isinstance(sp, FakeSamplingParams) for sp in sps)
        out = []
        for prompt, sp in zip(prompts, sps):
            ids = prompt["prompt_token_ids"]
            if len(ids) >= self.max_model_len:
                raise ValueError(f"prompt of {len(ids)} tokens is longer than max_model_len {self.max_model_len}")
            budget = min(sp.max_tokens, self.max_model_len - len(ids))  # the silent cut
            outputs = []
            for k in range(sp.n):
                seed = sp.seed + k if sp.seed is not None else int(torch.randint(0, 2**62, ()))
                s = self._sample(ids, sp, budget, seed)
                outputs.append(
                    FakeCompletion(
                        k,
                        s[0],
                        [{t: FakeLogprob(lp)} for t, lp in zip(s[0], s[1])] if sp.logprobs is not None else None,
                        s[2],
                    )
                )
            out.append(FakeRequestOutput(ids, outputs))
        self.log(
            "generate",
            requests=len(prompts),
            seeds=[sp.seed for sp in sps],
            n=[sp.n for sp in sps],
            logprobs=sorted({str(sp.logprobs) for sp in sps}),
            detokenize=sorted({sp.detokenize for sp in sps}),
            top_k=sorted({sp.top_k for sp in sps}),
        )
        return out

    def _sample(self, ids, sp, budget, seed):
        """One sample of `budget` tokens at most, from the engine's weights, with a generator seeded `seed`; each
        token's log-prob under the processed distribution (logprobs_mode="processed_logprobs": after temperature,
        top-k and top-p), computed here in float64 without the project's sampler."""
        eos = rollout.eos_ids(self._tok(), self.model)
        gen = torch.Generator().manual_seed(seed)
        toks, lps, x = [], [], torch.tensor([ids])
        with torch.no_grad():
            for _ in range(budget):
                z = self.model(input_ids=x, use_cache=False).logits[0, -1].double()
                if sp.temperature == 0:  # greedy; the raw log-softmax
                    logp = torch.log_softmax(z, -1)
                    t = int(logp.argmax())
                else:
                    z = z / sp.temperature
                    if sp.top_k > 0:  # the k largest
                        z = torch.where(z >= z.topk(min(sp.top_k, len(z))).values[-1], z, float("-inf"))
                    if sp.top_p < 1:  # the smallest most-probable set whose mass reaches top_p
                        p, order = torch.softmax(z, -1).sort(descending=True)
                        z[order[(p.cumsum(-1) - p) > sp.top_p]] = float("-inf")
                    logp = torch.log_softmax(z, -1)
                    t = int(torch.multinomial(logp.exp(), 1, generator=gen))
                toks.append(t)
                lps.append(float(logp[t]))
                if t in eos:
                    return toks, lps, "stop"
                x = torch.cat([x, torch.tensor([[t]])], dim=1)
        return toks, lps, "length"

    def _tok(self):
        if not hasattr(self, "tokenizer"):
            self.tokenizer = rollout.load_tokenizer(self.model.name_or_path)
        return self.tokenizer

    def apply_model(self, func):
        if "weights" in self.asleep:
            raise RuntimeError("apply_model on weights that are asleep")
        engine = self

        class Model:
            def load_weights(self, weights):
                params, names, size = dict(engine.model.named_parameters()), set(), 0
                for name, w in weights:
                    if w.dtype != engine.dtype:
                        engine.warnings += 1
                    params[name].data.copy_(w.float())  # KeyError for a name the engine does not have
                    names.add(name)
                    size += w.numel() * w.element_size()
                engine.log(
                    "load_weights",
                    names=len(names),
                    bytes=size,
                    dtypes=sorted({str(w.dtype) for _, w in weights}),
                    checksum=sum(float(w.double().sum()) for _, w in weights),
                    warnings=engine.warnings,
                )
                return names

        return [func(Model())]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.log("reset_prefix_cache")
        return True

    def sleep(self, level=1, mode="abort"):
        if not self.sleep_mode:
            raise RuntimeError("sleep mode is not enabled (enable_sleep_mode=False)")
        if level == 2:
            for p in self.model.parameters():
                p.data.fill_(float("nan"))  # discarded: only a push brings weights back
        self.asleep = {"weights", "kv_cache"}
        self.log("sleep", level=level)

    def wake_up(self, tags=None):
        tags = tags or ["weights", "kv_cache", "scheduling"]
        assert set(tags) <= {"weights", "kv_cache", "scheduling"}, tags
        self.asleep -= set(tags)
        self.log("wake_up", tags=list(tags))
        return not self.asleep


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """The fake as the module `vllm`: in this process (sys.modules) and for subprocesses (PYTHONPATH)."""
    import types

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams, mod.TokensPrompt = FakeLLM, FakeSamplingParams, FakeTokensPrompt
    monkeypatch.setitem(sys.modules, "vllm", mod)
    shim = tmp_path / "fake_vllm" / "vllm"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "from test_all import FakeLLM as LLM, FakeSamplingParams as SamplingParams, "
        "FakeTokensPrompt as TokensPrompt  # noqa: F401\n"
    )
    log = tmp_path / "fake_vllm.jsonl"
    return dict(PYTHONPATH=f"{shim.parent}{os.pathsep}{ROOT}", FAKE_VLLM_LOG=str(log), OMP_NUM_THREADS="1"), log


def _calls(log) -> list[dict]:
    return _jsonl(log) if Path(log).exists() else []


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fake_backend(model_dir, max_model_len=512, sleep_level=0):
    """A vllm Backend over the fake, built in this process without a process group (no external_launcher)."""
    llm = FakeLLM(
        model_dir,
        max_model_len=max_model_len,
        enable_sleep_mode=sleep_level > 0,
        dtype="bfloat16",
        logprobs_mode="processed_logprobs",
    )
    return rollout.Backend(
        "vllm", rollout.load_tokenizer(model_dir), llm=llm, max_model_len=max_model_len, sleep_level=sleep_level
    )


def test_vllm_single_process_and_torchrun(tiny_model_dir, tmp_path, fake_vllm):
    """evaluate.py --backend vllm under plain python (no RANK: external_launcher reads it), under torchrun with one
    rank (RANK set, no group: vLLM would make an nccl-only one) and with two; every problem answered, the engine
    sized to the longest prompt plus --max-new-tokens, counted here independently, and given 0.9 of the GPU by
    default; requests ask for no log-probs and no detokenization. rollout.py and evaluate.py build pass
    --vllm-gpu-memory to their engines."""
    env, log = fake_vllm
    flags = f"--model {tiny_model_dir} --backend vllm --data synthetic:types=add,n=5 --n-samples 2 --k 1 "
    flags = (flags + "--max-new-tokens 8 --chunk 2").split()
    tok = rollout.load_tokenizer(tiny_model_dir)
    longest = max(
        len(tok(rollout.chat_prompt(tok, data.format_prompt(p["question"])), add_special_tokens=False)["input_ids"])
        for p in data.load_problems("synthetic:types=add,n=5")
    )
    one_rank = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    for name, launcher in (
        ("python", None),  # in this process, whose environment has no RANK
        ("torchrun1", one_rank),  # in this process too, with the variables torchrun sets for one rank
        ("torchrun2", TORCHRUN2),
    ):
        log.unlink(missing_ok=True)
        if not isinstance(launcher, list):
            assert "RANK" not in os.environ
            _main_in_process(
                "evaluate.py", *flags, "--out", str(tmp_path / name), forced=False, env={**env, **(launcher or {})}
            )
        else:
            run(*launcher, "evaluate.py", *flags, "--out", str(tmp_path / name), env=env)
        rows = _jsonl(tmp_path / name / "samples.jsonl")
        assert len(rows) == 5 and all(len(r["scores"]) == 2 for r in rows)
        inits = [c for c in _calls(log) if c["call"] == "init"]
        assert len(inits) == (2 if name == "torchrun2" else 1)
        assert all(c["max_model_len"] == longest + 8 and c["logprobs_mode"] == "processed_logprobs" for c in inits)
        assert all(c["gpu_memory_utilization"] == 0.9 for c in inits)  # nothing else shares the GPU
        gens = [c for c in _calls(log) if c["call"] == "generate"]
        assert gens and all(c["logprobs"] == ["None"] and c["detokenize"] == [False] for c in gens)
    for cmd in (
        ["evaluate.py", "select", "--data", "synthetic:types=add,n=2", "--n-samples", "2", "--keep", "1"],
        ["evaluate.py", "build", "--setting", "solution", "--data", "synthetic:types=add,n=2", "--n-samples", "2"],
    ):
        log.unlink(missing_ok=True)  # every script that makes an engine takes --vllm-gpu-memory (in this process)
        flags = f"--model {tiny_model_dir} --backend vllm --max-new-tokens 4 --vllm-gpu-memory 0.7".split()
        _main_in_process(*cmd, *flags, "--out", str(tmp_path / cmd[1] / "out.jsonl"), forced=False, env=env)
        assert [c["gpu_memory_utilization"] for c in _calls(log) if c["call"] == "init"] == [0.7]


def test_vllm_engine_length_refused_past_the_model_context(tiny_model_dir, tmp_path, fake_vllm, capsys):
    env, _ = fake_vllm
    flags = [
        "--model",
        tiny_model_dir,
        "--backend",
        "vllm",
        "--data",
        "synthetic:types=add,n=2",
        "--out",
        str(tmp_path),
    ]
    message = _fails(capsys, "evaluate.py", *flags, "--max-new-tokens", "600", forced=False, env=env)
    assert "--max-new-tokens 600" in message and "context of 512" in message, message[-2000:]
    backend = _fake_backend(tiny_model_dir, max_model_len=40)
    prompt = rollout.chat_prompt(backend.tokenizer, "What is 1 + 1?")
    n = len(backend.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="exceeds the engine's max_model_len 40"):  # vLLM would cut it silently
        rollout.generate(backend, [prompt], rollout.SamplingParams(max_new_tokens=40 - n + 1))
    out = rollout.generate(backend, [prompt], rollout.SamplingParams(max_new_tokens=40 - n, temperature=1.0))
    assert len(out[0].response_ids) <= 40 - n


def test_duplicate_prompts_draw_different_rollouts(tiny, tiny_model_dir, fake_vllm):
    """|D| = 1 and seen_8x8 are made of duplicate prompts: each copy must draw its own rollout, on both backends,
    and a call seeded s + 1 (the next rank) must not repeat this one's samples shifted by one."""
    model, tok = tiny
    prompts = [rollout.chat_prompt(tok, "What is 2 + 2?")] * 3
    params = rollout.SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=5)
    hf = [tuple(s.response_ids) for s in rollout.generate(rollout.Backend("hf", tok, model=model), prompts, params)]
    assert len(set(hf)) == 6
    backend = _fake_backend(tiny_model_dir)
    a = [tuple(s.response_ids) for s in rollout.generate(backend, prompts, params)]
    b = [
        tuple(s.response_ids)
        for s in rollout.generate(
            backend, prompts, rollout.SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=6)
        )
    ]
    assert len(set(a)) == 6 and not set(a) & set(b)
    assert a == [tuple(s.response_ids) for s in rollout.generate(backend, prompts, params)]  # seeded: reproducible
    seeds = [rollout.request_seed(5, i) for i in range(3)] + [rollout.request_seed(6, i) for i in range(3)]
    assert min(abs(x - y) for x, y in itertools.combinations(seeds, 2)) > 2**20  # s + k never meets another


def test_vllm_logprobs_are_the_trainers_sampling_logprobs(tiny, tiny_model_dir, fake_vllm):
    """The fake engine's processed log-probs (its own float64 sampler, as vLLM computes them) equal the project's
    `sampling_logprobs` of the model's forward at the sampled tokens: the contract the trainers' IS weights rely on."""
    model, tok = tiny
    params = rollout.SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=6, seed=3)
    samples = rollout.generate(_fake_backend(tiny_model_dir), [rollout.chat_prompt(tok, "What is 2 + 2?")], params)
    for s in samples:
        assert len(s.logprobs) == len(s.response_ids) > 0
        assert torch.allclose(torch.tensor(s.logprobs), _forward_logprobs(model, s, params), atol=1e-5)


def test_vllm_weight_push_casts_and_batches_by_bytes(tiny_model_dir, fake_vllm):
    """The push loads bf16 tensors (no per-parameter dtype warning), in batches of at most max_bytes (one tensor
    larger than that goes alone), and the engine then holds the trainer's weights rounded to bf16."""
    backend = _fake_backend(tiny_model_dir, sleep_level=2)
    model, _ = rollout.load_model(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    loads = []
    backend.llm.log = lambda call, **kw: loads.append(kw) if call == "load_weights" else None
    rollout.sleep_engine(backend)  # level 2: the engine's weights are gone (NaN in the fake)
    assert backend.asleep
    with pytest.raises(RuntimeError, match="asleep"):
        rollout.generate(backend, ["x"], rollout.SamplingParams(max_new_tokens=2))
    limit = 20_000
    rollout.push_weights_to_vllm(backend, model, max_bytes=limit)
    sizes = {n: p.numel() * 2 for n, p in model.named_parameters()}
    assert len(loads) > 1 and all(c["dtypes"] == ["torch.bfloat16"] for c in loads) and backend.llm.warnings == 0
    assert all(c["bytes"] <= limit or c["names"] == 1 for c in loads)
    assert sum(c["bytes"] for c in loads) == sum(sizes.values())  # every parameter once (the tied head is skipped)
    engine = dict(backend.llm.model.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(engine[n], p.detach().to(torch.bfloat16).float()), n
    assert not backend.asleep and rollout.generate(backend, ["x"], rollout.SamplingParams(max_new_tokens=2))


def test_make_backend_vllm_loads_no_hf_model(tiny_model_dir, monkeypatch):
    made = {}
    monkeypatch.setattr(
        rollout, "make_vllm", lambda path, max_model_len, **kw: made.setdefault("args", (path, max_model_len))
    )
    monkeypatch.setattr(rollout, "load_model", lambda *a, **kw: pytest.fail("the vllm backend loaded a HF model"))
    backend = rollout.make_backend("vllm", tiny_model_dir, "cpu", max_model_len=99, seed=3)
    assert backend.model is None and backend.max_model_len == 99 and made["args"] == (tiny_model_dir, 99)
    assert backend.tokenizer.pad_token_id is not None


def test_ema_teacher_in_bf16_follows_the_fp32_ema(tiny_model_dir):
    """A bf16 teacher (as on GPU) with rate 0.05 for 40 steps equals the fp32 EMA rounded once to bf16, and that
    EMA the fp64 recurrence; the same updates made by lerp_ in bf16 itself leave far more weights unmoved."""
    torch.manual_seed(0)
    student, _ = rollout.load_model(tiny_model_dir)
    teacher, naive = copy.deepcopy(student).to(torch.bfloat16), copy.deepcopy(student).to(torch.bfloat16)
    ema = sdpo.fp32_shards(student)
    t0 = {n: p.detach().to(torch.bfloat16) for n, p in student.named_parameters()}
    want = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    drift = {n: torch.randn_like(p).sign() * 1e-4 for n, p in student.named_parameters()}  # a training direction
    for _ in range(40):
        with torch.no_grad():
            for n, p in student.named_parameters():
                p.add_(drift[n])
            for p, s in zip(naive.parameters(), student.parameters()):
                p.lerp_(s.to(torch.bfloat16), 0.05)  # the defect: the EMA kept in bf16
        for n, p in student.named_parameters():
            want[n] = 0.95 * want[n] + 0.05 * p.detach().double()
        sdpo.ema_update(ema, teacher, student, 0.05)
    for n, p in teacher.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, ema[n].to(torch.bfloat16)), n
        assert torch.allclose(ema[n].double(), want[n], atol=1e-6)

    def error(m):
        return sum(float((p.detach().double() - want[n]).abs().sum()) for n, p in m.named_parameters())

    def unmoved(m):
        return sum(int((p == t0[n]).sum()) for n, p in m.named_parameters()) / sum(p.numel() for p in m.parameters())

    assert error(naive) > 3 * error(teacher) and unmoved(naive) > 2 * unmoved(teacher)


def test_training_forwards_build_no_cache_and_keep_one_hidden_state(tiny_model_dir, monkeypatch):
    model, _ = rollout.load_model(tiny_model_dir)
    seen = []
    real = type(model).forward

    def spy(self, *a, **kw):
        seen.append(kw)
        out = real(self, *a, **kw)
        assert out.past_key_values is None and out.hidden_states is None
        return out

    monkeypatch.setattr(type(model), "forward", spy)
    head_rows = []  # positions the model's own LM head computes: none (an empty logits_to_keep), never (T, V)
    model.lm_head.register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[1]) and None)
    fast.token_logprobs(model, [([5, 6, 7], [8, 9])], 0, 1.0, "cpu", pack=64)
    fast.token_nll(model, [[5, 6, 7, 8]], [[0, 0, 1, 1]], 0, "cpu")
    assert len(seen) == 2 and all(kw["use_cache"] is False and not kw.get("output_hidden_states") for kw in seen)
    assert head_rows == [0, 0]


def test_sft_chunked_nll_equals_full_logits(tiny_model_dir):
    """sft.token_nll (full logits) and its twin fast.token_nll (the chunked LM head) against cross-entropy per
    sequence: the value and every parameter's gradient, chunks smaller than the batch."""
    for twin in (lambda *a: sft.token_nll(*a), lambda *a: fast.token_nll(*a, chunk=2)):
        _check_token_nll(tiny_model_dir, twin)


def _check_token_nll(tiny_model_dir, token_nll):
    # float64: the reference runs each sequence alone, the twins a padded batch; in fp32 their gradients differ by
    # up to 2.5e-5 on values near 1 on some CPUs (most likely the attention kernels' backward: the forwards agree to
    # 1.5e-7).
    # In float64 only a bookkeeping error (a shift, a mask, a chunk) can exceed the tolerance
    model, tok = rollout.load_model(tiny_model_dir)
    model.double()
    ids = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    masks = [[0, 0, 1, 1, 1, 1], [0, 1, 1]]
    nll, count = token_nll(model, ids, masks, tok.pad_token_id, "cpu")
    nll.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = 0.0
    for x, m in zip(ids, masks):
        logits = model(torch.tensor([x])).logits[0, :-1]
        y, keep = torch.tensor(x[1:]), torch.tensor(m[1:]).bool()
        ref = ref + torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum")
    ref.backward()
    assert count == 6 and float(nll.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-5), n


CHOICE_FLAGS = {
    "backend",
    "thinking",
    "dtype",
    "setting",
    "solution_source",
    "teacher_context",
    "reprompt",
    "loss_agg",
    "sibling",
}
FREE_FLAGS = {"seed"}  # numeric flags that take any value


def _refused(cls, name, value):
    """The ValueError that cls's __post_init__ raises for this field's value, or None."""
    try:
        cls(**{name: value})
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    "cls",
    [
        data.Args,
        evaluate.Table1Args,
        evaluate.SelectArgs,
        evaluate.Args,
        report_make.ReportArgs,
        evaluate.BuildArgs,
        sft.TrainArgs,
        grpo.Args,
        sdpo.Args,
    ],
    ids=lambda c: f"{c.__module__}.{c.__name__}",
)
def test_every_choice_and_range_flag_is_refused_naming_it(cls, capsys):
    """Every numeric flag and every flag with choices refuses some value (a choice that does not exist, or one of
    -1, 0, 1.5, 2); through parse_args the refusal exits 2 naming the flag. The defaults pass, and --seed takes any
    integer."""
    import typing

    data.parse_args(cls, [])
    for name, hint in typing.get_type_hints(cls).items():
        if name in FREE_FLAGS:  # any value
            assert _refused(cls, name, -1) is None and _refused(cls, name, 10**9) is None, name
        if name in FREE_FLAGS or not (
            name in CHOICE_FLAGS or hint in (int, float, int | None, float | None, list[int])
        ):
            continue
        listed = typing.get_origin(hint) is list
        tries = ["bogus", 99] if name in CHOICE_FLAGS else [-1, 0, 1.5, 2]
        tries = [v for v in tries if not (int in typing.get_args(hint) + (hint,) and v == 1.5)]
        bad = next((v for v in tries if _refused(cls, name, [v] if listed else v)), None)
        assert bad is not None, f"{cls.__name__}.{name} takes any of {tries}"
        flag = "--" + name.replace("_", "-")
        with pytest.raises(SystemExit) as e:
            data.parse_args(cls, [flag, str(bad)])
        shown = [bad] if listed else bad
        assert e.value.code == 2 and f"error: {flag} {shown!r}" in capsys.readouterr().err, flag


def test_a_script_offers_only_the_flags_it_uses(capsys):
    """SDPO's loss has no KL term: sdpo.py has no --kl-coef (grpo.py has); an unknown flag exits 2 naming it."""
    assert "kl_coef" in {f.name for f in dataclasses.fields(grpo.Args)}
    assert "kl_coef" not in {f.name for f in dataclasses.fields(sdpo.Args)}
    with pytest.raises(SystemExit) as e:
        data.parse_args(sdpo.Args, ["--kl-coef", "0.1"])
    assert e.value.code == 2 and "--kl-coef" in capsys.readouterr().err


def test_scripts_refuse_bad_flags_before_any_work(tmp_path, capsys):
    for script, flag, value in (
        ("grpo.py", "--vllm-sleep", "3"),
        ("sdpo.py", "--teacher-context", "nope"),
        ("grpo.py", "--keep-checkpoints", "-1"),
    ):
        message = _fails(capsys, script, flag, value, "--out", str(tmp_path))
        assert message.startswith("2\n") and f"{flag} " in message and not (tmp_path / "metrics.jsonl").exists()


def test_batch_sizes_that_do_not_split_over_the_ranks_are_refused(monkeypatch, tmp_path):
    """--prompts-per-step (RL) and --batch-size (SFT) must split evenly over the ranks, and SDPO's step over
    --sibling-dp; each refusal names its flag, before any model is loaded."""
    monkeypatch.setattr(sft, "init_distributed", lambda: (0, 0, 2, torch.device("cpu")))  # as rank 0 of 2
    monkeypatch.setattr(rollout, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="--prompts-per-step 3 must be a multiple of the world size 2"):
        sft.setup(grpo.Args(prompts_per_step=3, out=str(tmp_path)))
    with pytest.raises(ValueError, match="--batch-size 5 must be a positive multiple of the world size 2"):
        sft.train(sft.TrainArgs(batch_size=5, data=_sft_file(tmp_path / "d.jsonl"), out=str(tmp_path)))
    run_ = type("Run", (), {"args": sdpo.Args(prompts_per_step=3, rollouts=2, sibling_dp=4)})()
    with pytest.raises(ValueError, match="--sibling-dp 4"):
        sdpo.sdpo_train_step(run_)


def test_chunk_size_suits_the_device():
    assert sft.chunk_size(0, "cpu") == 256 and sft.chunk_size(0, "cuda") == 1024 and sft.chunk_size(7, "cpu") == 7
    with pytest.raises(ValueError, match="--chunk -1"):
        sft.chunk_size(-1, "cpu")


ONE_GPU_MP = """
import json, sys, torch
from torch.distributed.fsdp import FSDPModule
import rollout, sft
model, _ = rollout.load_model(sys.argv[1], "float32", "cpu")
model = sft.shard_model(model, torch.device("cpu"), mixed_precision=True)  # one process, as on one GPU
seen = {}
model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("dtype", str(o.dtype)) and None)
model(input_ids=torch.tensor([[5, 6, 7]])).logits.float().sum().backward()
json.dump(dict(fsdp=isinstance(model, FSDPModule), compute=seen["dtype"],
               master=str(next(model.parameters()).dtype)), open(sys.argv[2], "w"))
"""


def test_one_process_mixed_precision_is_sharded_like_eight(tiny_model_dir, tmp_path):
    script = tmp_path / "mp.py"
    script.write_text(ONE_GPU_MP)
    run(sys.executable, str(script), tiny_model_dir, str(tmp_path / "out.json"), env={"PYTHONPATH": str(ROOT)})
    out = json.loads((tmp_path / "out.json").read_text())
    assert out == dict(fsdp=True, compute="torch.bfloat16", master="torch.float32")


FSDP_SKIPPED_UPDATE = """
import json, sys, torch, torch.distributed as dist
import grpo, rollout, sft
rank, _, world, device = sft.init_distributed()
if len(sys.argv) > 3:  # the defect, for checking that this script can fail
    sft.reshard = lambda model: None
torch.manual_seed(0)
model, tok = rollout.load_model(sys.argv[1], "float32", device)
model = sft.shard_model(model, device)
opt = sft.make_optimizer(model, 1e-3)
rows = []
for g, rewards in enumerate(([1.0] * 4, [1.0, 0.0, 0.0, 1.0])):  # group 0: zero advantage, group 1: not
    p = tok(rollout.chat_prompt(tok, f"q{g}{rank}"), add_special_tokens=False)["input_ids"]
    for i, r in enumerate(rewards):
        resp = [100 + i, 200 + g, 300][: 1 + i % 3]
        rows.append(dict(prompt_ids=p, response_ids=resp, rollout_logprobs=[-5.0] * len(resp), reward=r))
for r, a in zip(rows, grpo.group_advantages([r["reward"] for r in rows], 4).tolist()):
    r["advantage"] = a
# two updates (--mini-batch 2 over 2 ranks: one group per rank each): off-policy, so pi_old's no-grad forward runs
# first, and the first update has no trainable row on any rank
args = grpo.Args(rollouts=4, mini_batch=2, micro_batch=2)
out = grpo.train_on_rollouts(model, opt, rows, args, world, device, tok.pad_token_id)
if rank == 0:
    json.dump(dict(updates=out["grad_norm"] > 0, trained_frac=out["trained_frac"]), open(sys.argv[2], "w"))
dist.barrier()  # every rank done before any closes the group
dist.destroy_process_group()
rollout.end_process(0)
"""


def test_fsdp2_update_without_trainable_rows_after_no_grad_forward(tiny_model_dir, tmp_path):
    """Off-policy under 2-rank FSDP2, the first update skips every row: after pi_old's no-grad forward the root's
    parameters must be resharded, or apply_update's zero gradients would mix plain and sharded tensors."""
    script = tmp_path / "skipped.py"
    script.write_text(FSDP_SKIPPED_UPDATE)
    cmd = [*LAUNCH2, str(script), tiny_model_dir, str(tmp_path / "out.json")]
    run(*cmd, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=300)
    assert json.loads((tmp_path / "out.json").read_text()) == dict(updates=True, trained_frac=0.5)


def _checkpoint_checksum(ckpt) -> float:
    """The sum of a checkpoint's weights rounded to bf16, as the engine should hold them after the last push."""
    from safetensors.torch import load_file

    return sum(
        float(t.to(torch.bfloat16).double().sum()) for t in load_file(Path(ckpt) / "model.safetensors").values()
    )


def _engine_phases(calls: list[dict]) -> str:
    """One letter per engine call: g generate, s sleep, w wake weights, l load, r reset, k wake kv_cache."""
    code = dict(generate="g", sleep="s", load_weights="l", reset_prefix_cache="r")
    return "".join(
        code.get(c["call"]) or {"weights": "w", "kv_cache": "k"}[c["tags"][0]] for c in calls if c["call"] != "init"
    )


def _param_bytes(model_dir) -> int:
    model, _ = rollout.load_model(model_dir)
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize(
    "script,extra",
    [("grpo.py", []), ("sdpo.py", ["--teacher-ema", "0.05", "--save-every", "1"])],
)
def test_trainers_with_vllm_backend(tiny_model_dir, tmp_path, fake_vllm, script, extra):
    """grpo.py and sdpo.py --backend vllm on one process and two: the engine starts before the policy is loaded
    (the fake's "GPU" is 1.5x the fp32 policy and the engine asks for 0.6 of it, so a policy loaded first leaves too
    little free), sleeps at once and wakes with the policy's weights; then two steps, each one generating (with
    log-probs), sleeping through training (level 2 discards the engine's weights, so a missing push would generate
    from NaN), then waking with the trainer's weights in bf16; the evaluation asks for no log-probs, nothing is
    detokenized by the engine, and after the last step the engine holds the checkpoint's weights. Each checkpoint
    has one model at top level: an engine started on it (as vLLM loads, every top-level *.safetensors) holds the
    policy, not SDPO's EMA teacher (in teacher/)."""
    env, log = fake_vllm
    env = dict(env, FAKE_VLLM_GPU_BYTES=str(int(1.5 * _param_bytes(tiny_model_dir))))
    flags = ["--model", tiny_model_dir, "--backend", "vllm", *GRPO_FLAGS, "--vllm-gpu-memory", "0.6", *extra]
    for name, launcher in (("one", [sys.executable]), ("two", TORCHRUN2)):  # processes of their own: the fake's
        log.unlink(missing_ok=True)  # "GPU" counts the live tensors of its process
        run(*launcher, script, *flags, "--out", str(tmp_path / name), env=env)
        rows = _jsonl(tmp_path / name / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2] and any(
            k.startswith("eval/") and k.endswith("/acc") for k in rows[-1]
        )
        calls = _calls(log)
        assert all(c["gpu_memory_utilization"] == 0.6 for c in calls if c["call"] == "init")
        for rank in range(2 if name == "two" else 1):
            mine = [c for c in calls if c["rank"] == rank]
            phases = _engine_phases(mine)
            push = "wl+rk"
            assert re.fullmatch(f"s{push}gs{push}gs{push}g", phases), phases  # last g: evaluation
            gens = [c for c in mine if c["call"] == "generate"]
            assert all(c["detokenize"] == [False] for c in gens)
            assert [c["logprobs"] for c in gens][-1] == ["None"] and gens[0]["logprobs"] == ["0"]
            assert gens[-1]["top_k"] == [-1]  # the evaluation: no top-k, as the released validation (vLLM's off: -1)
            loads = [c for c in mine if c["call"] == "load_weights"]
            assert all(c["dtypes"] == ["torch.bfloat16"] and c["warnings"] == 0 for c in loads)
            last_push = phases.rindex("w")  # the batches of the last push, after step 2's update
            pushed = sum(c["checksum"] for c in loads[phases[:last_push].count("l") :])
            assert pushed == pytest.approx(_checkpoint_checksum(tmp_path / name / "step_2"), rel=1e-9, abs=1e-6)
        for step in (1, 2) if script == "sdpo.py" else (2,):
            ckpt = tmp_path / name / f"step_{step}"
            assert [f.name for f in ckpt.glob("*.safetensors")] == ["model.safetensors"]
            engine = dict(FakeLLM(str(ckpt), max_model_len=64, dtype="bfloat16").model.named_parameters())
            policy = _weights(ckpt)
            assert all(torch.equal(engine[k], policy[k]) for k in policy)
            if script == "sdpo.py":  # the EMA teacher: a HF directory of its own
                from transformers import AutoModelForCausalLM

                AutoModelForCausalLM.from_pretrained(ckpt / "teacher")
        if name == "two":  # every request of every call its own seed: none shared between the ranks
            seeds = [
                set(s for c in calls if c["call"] == "generate" and c["rank"] == r for s in c["seeds"]) for r in (0, 1)
            ]
            assert seeds[0] and not seeds[0] & seeds[1]


ONE_GPU_HF = """
import json, sys, torch
from torch.distributed.tensor import DTensor
import grpo, rollout, sft
torch.manual_seed(0)
model, tok = rollout.load_model(sys.argv[1], "float32", "cpu")
model = sft.shard_model(model, torch.device("cpu"), mixed_precision=True)  # one process as on one GPU: FSDP2
if len(sys.argv) > 3:  # the defect, for checking that this script can fail
    sft.reshard = lambda model: None
opt = sft.make_optimizer(model, 1e-3)
prompt = rollout.chat_prompt(tok, "What is 1 + 1?")
out = []
for rewards in ([1.0] * 4, [1.0, 0.0, 0.0, 1.0]):  # a step that trains no row, then one that trains all four
    params = rollout.SamplingParams(n=4, max_new_tokens=4)  # the policy generates: no-grad FSDP2 forwards
    samples = rollout.generate_hf(model, tok, [prompt], params, progress=False, fast=False)
    rows = [dict(prompt_ids=s.prompt_ids, response_ids=s.response_ids, rollout_logprobs=s.logprobs, reward=r)
            for s, r in zip(samples, rewards)]
    for r, a in zip(rows, grpo.group_advantages(rewards, 4).tolist()):
        r["advantage"] = a
    m = grpo.train_on_rollouts(model, opt, rows, grpo.Args(rollouts=4, micro_batch=2), 1, torch.device("cpu"),
                               tok.pad_token_id)
    out.append(dict(trained_frac=m["trained_frac"], grad_norm=m["grad_norm"], updates=m["updates"]))
gathered = []  # the dtype each all-gather of the weight push moves
real = DTensor.full_tensor
DTensor.full_tensor = lambda self, **kw: gathered.append(str(self.dtype)) or real(self, **kw)
class Engine:
    def apply_model(self, func):
        return [func(type("Model", (), {"load_weights": lambda self, weights: {n for n, _ in weights}})())]
    def reset_prefix_cache(self):
        return True
rollout.push_weights_to_vllm(rollout.Backend("vllm", tok, llm=Engine()), model)
json.dump(dict(steps=out, gathered=gathered, params=len(list(model.parameters()))), open(sys.argv[2], "w"))
"""


def test_one_gpu_fsdp2_policy_generates_then_steps_without_trainable_rows(tiny_model_dir, tmp_path):
    """--backend hf on one GPU: the FSDP2 policy generates its own rollouts (no-grad forwards that leave the root
    gathered as plain tensors), then a step trains no row, then one trains all: apply_update reshards first, else
    clip_grad_norm_ meets plain tensors beside DTensors. The weight push afterwards casts each shard to bf16 before
    its all-gather."""
    script = tmp_path / "one_gpu.py"
    script.write_text(ONE_GPU_HF)
    run(
        sys.executable,
        str(script),
        tiny_model_dir,
        str(tmp_path / "out.json"),
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    out = json.loads((tmp_path / "out.json").read_text())
    (none, every) = out["steps"]
    assert none["trained_frac"] == 0 and none["updates"] == 1 and every["trained_frac"] == 1 and every["grad_norm"] > 0
    assert out["gathered"] == ["torch.bfloat16"] * out["params"]
    p = subprocess.run(
        [sys.executable, str(script), tiny_model_dir, str(tmp_path / "bad.json"), "defect"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert p.returncode != 0 and "mixed torch.Tensor and DTensor" in p.stderr, p.stderr[-2000:]


def test_weight_push_empties_the_cache_before_each_wake_up(tiny_model_dir, fake_vllm, monkeypatch):
    backend = _fake_backend(tiny_model_dir, sleep_level=2)
    model, _ = rollout.load_model(tiny_model_dir)
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    wake = backend.llm.wake_up
    monkeypatch.setattr(backend.llm, "wake_up", lambda tags=None: events.append(tags[0]) or wake(tags))
    rollout.sleep_engine(backend)
    rollout.push_weights_to_vllm(backend, model)
    assert events == ["empty_cache", "weights", "empty_cache", "kv_cache"]


def test_periodic_evaluation_generates_every_benchmark_in_one_call(tiny_model_dir, fake_vllm, monkeypatch):
    """The trainers' evaluation: one generate call for all benchmarks, no log-probs asked, every problem its own
    seed (numbered across benchmarks), and each benchmark's summary over its own problems."""
    backend = _fake_backend(tiny_model_dir)
    calls, real = [], rollout.generate
    monkeypatch.setattr(
        rollout,
        "generate",
        lambda b, prompts, params, **kw: (
            calls.append((len(prompts), params, kw["indices"])) or real(b, prompts, params, **kw)
        ),
    )
    benchmarks = {
        "a": data.load_problems("synthetic:types=add,n=3"),
        "b": data.load_problems("synthetic:types=sub,n=2"),
    }
    summary = evaluate.evaluate(backend, benchmarks, rollout.SamplingParams(n=2, max_new_tokens=4, temperature=1.0))
    assert [(n, params.logprobs, list(ix)) for n, params, ix in calls] == [(5, False, [0, 1, 2, 3, 4])]
    assert summary["a"]["problems"] == 3 and summary["b"]["problems"] == 2
    assert summary["a"]["samples"] == 6 and summary["b"]["samples"] == 4


def _resume_across(tiny_model_dir, tmp_path, name, first, second):
    """sft.py: step 1 on `first` (1 or 2 processes), saved; resumed for step 2 on `second`."""
    d = _sft_file(tmp_path / "d.jsonl")
    _train(tiny_model_dir, d, tmp_path / name, "--steps", "1", "--save-every", "1", torchrun=first == 2)
    ckpt = tmp_path / name / "step_1"
    assert sorted(f.name for f in (ckpt / "optimizer").iterdir()) == [f"shard_{r}.safetensors" for r in range(first)]
    assert not [f for f in ckpt.rglob("*") if f.suffix in (".pt", ".pkl", ".bin")]  # nothing to unpickle
    _train(tiny_model_dir, d, tmp_path / name, "--steps", "2", "--save-every", "1", "--resume", torchrun=second == 2)
    return _jsonl(tmp_path / name / "metrics.jsonl"), _weights(tmp_path / name / "step_2")


def _paper_models() -> dict:
    """The paper's two models, from their published config.json (sizes only; built on the meta device)."""
    from transformers import Qwen2Config, Qwen3Config

    return {
        "R1-Distill-Qwen-7B": Qwen2Config(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            tie_word_embeddings=False,
            max_position_embeddings=131072,
        ),
        "Qwen3-8B": Qwen3Config(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=False,
            max_position_embeddings=40960,
        ),
    }


def _memory_table() -> str:
    """PERFORMANCE.md's memory table: Table 8's recipe (--grad-ckpt --micro-batch 1, 2,048 + 20,480 tokens, the LM head
    in chunks of 1,024), SDPO's teacher over --max-reprompt-len 22,528 + 20,480, the engine at the trainers'
    evaluation length (38,912 + a 2,048-token prompt).
    `python -c "import test_all; print(test_all._memory_table())"`"""
    lines = [
        "| model | run | GPUs | trainer during rollouts, GB | training peak, GB | --vllm-gpu-memory on 80 GB "
        "| on 141 GB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, cfg in _paper_models().items():
        sizes = sft.model_sizes(cfg)
        for run_name, teacher in (("GRPO", 0), ("SDPO", 22528 + 20480)):
            for world in (1, 4, 8):
                plans = [
                    sft.memory_plan(sizes, world, gpu, 2048 + 20480, teacher_tokens=teacher, engine_len=2048 + 38912)
                    for gpu in (80, 141)
                ]
                fits = ["does not fit" if p["problem"] else f"{p['share']:.2f}" for p in plans]
                lines.append(
                    f"| {name} | {run_name} | {world} | {plans[0]['resident']:.1f} | "
                    f"{plans[0]['training']:.1f} | {fits[0]} | {fits[1]} |"
                )
    return "\n".join(lines)


def test_memory_plan_against_the_readme_table_and_by_hand(tmp_path, monkeypatch):
    """PERFORMANCE.md's table is memory_plan's; the parts by hand for R1-Distill-Qwen-7B (8 x 80 GB, GRPO: fp32
    weights, gradients and AdamW over 8 ranks are 16 P / 8 bytes, P counted from the config by hand); a run that
    cannot fit is refused before loading, naming the numbers and what to change."""
    assert _memory_table() in (ROOT / "PERFORMANCE.md").read_text()
    cfg = _paper_models()["R1-Distill-Qwen-7B"]
    h, i, layers, v, kv = 3584, 18944, 28, 152064, 4 * 128
    layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h  # q, k, v (biased), o, MLP, two norms
    p = 2 * v * h + layers * layer + h
    sizes = sft.model_sizes(cfg)
    assert sizes["params"] == p and sizes["layer"] == layer and sizes["kv_per_token"] == 2 * layers * kv * 2
    plan = sft.memory_plan(sizes, 8, 80, 22528, engine_len=40960)
    assert (plan["weights"] + plan["grads"] + plan["adam"]) * 1e9 == pytest.approx(16 * p / 8)
    assert plan["activations"] * 1e9 == pytest.approx(22528 * h * (2 * layers + 34))
    assert plan["training"] == pytest.approx(
        sum(plan[k] for k in ("weights", "grads", "adam", "gathered", "activations", "head"))
    )
    assert plan["share"] == pytest.approx(0.9 if 0.9 * 80 + plan["resident"] <= 76 else (76 - plan["resident"]) / 80)
    assert plan["problem"] is None and sft.memory_plan(sizes, 1, 80, 22528, engine_len=40960)["problem"]
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 80e9})())
    args = grpo.Args(micro_batch=1, max_new_tokens=20480, grad_ckpt=True)
    with pytest.raises(ValueError, match=r"on 1 GPU\(s\) of 80 GB.*training peak 1\d\d\.\d GB.*more GPUs"):
        sft.check_memory(args, str(tmp_path), "cuda", 1, engine_len=40960)
    assert sft.check_memory(args, str(tmp_path), "cuda", 8, engine_len=40960) == pytest.approx(plan["share"], abs=0.01)
    args.vllm_gpu_memory = 0.95  # more than fits beside the trainer
    with pytest.raises(ValueError, match="--vllm-gpu-memory 0.95"):
        sft.check_memory(args, str(tmp_path), "cuda", 8, engine_len=40960)


def test_requirements_pin_the_transformers_that_vllm_brings():
    """vllm 0.33.0 requires transformers>=5.16.1,<5.21.0 (its wheel's METADATA): the CPU install pins that range, so
    these tests run the transformers a GPU user gets."""
    import transformers
    from packaging.specifiers import SpecifierSet

    spec = next(
        line.split("transformers", 1)[1]
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.startswith("transformers")
    )
    assert SpecifierSet(spec) == SpecifierSet(">=5.16.1,<5.21.0") and transformers.__version__ in SpecifierSet(spec)


# ============================================================================================
# Precision: --dtype bfloat16 (CPU: autocast over fp32 weights; bf16 teacher and generation replica)
# ============================================================================================
BF16_U = 2.0**-8  # bf16's unit roundoff: 8 significant bits, so one rounding moves a value by at most 2^-8 of it


@pytest.mark.parametrize(
    "cpuinfo,native",
    [
        ("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16\n", True),  # AVX512-BF16: Zen 4, Cooper Lake
        ("flags : fpu sse2 avx2 amx_bf16 amx_tile\n", True),  # Sapphire Rapids
        ("flags : fpu sse2 avx2 avx512f avx512bw avx512_vnni\n", False),  # AVX512 without bf16: emulated
        ("Features : fp asimd evtstrm aes crc32 bf16 i8mm\n", True),  # Arm v8.6 (Graviton 3, Neoverse V1)
        ("Features : fp asimd evtstrm aes crc32\n", False),
    ],
)
def test_native_bf16_reads_the_cpu_flags(monkeypatch, cpuinfo, native):
    """--dtype auto: bf16 where the CPU's flags name a bf16 dot product, fp32 elsewhere; explicit dtypes stay."""
    import io

    monkeypatch.setattr(rollout, "open", lambda *a, **k: io.StringIO(cpuinfo), raising=False)
    assert NATIVE_BF16("cpu") is native
    monkeypatch.setattr(rollout, "native_bf16", NATIVE_BF16)
    assert rollout.compute_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert (
        rollout.compute_dtype("float32", "cpu") == "float32" and rollout.compute_dtype("bfloat16", "cpu") == "bfloat16"
    )
    with pytest.raises(ValueError, match="--dtype 'float16'"):
        rollout.compute_dtype("float16", "cpu")
    assert isinstance(rollout.autocast("bfloat16", "cpu"), torch.autocast)
    assert not isinstance(rollout.autocast("float32", "cpu"), torch.autocast)


def _logprob_grads(model, seqs, pad, dtype, plain: bool):
    """log pi of the responses under --dtype `dtype`'s autocast (fast.py's chunked head, or the full logits), the
    gradient of their sum parameter by parameter, and the dtypes of the backward's matmul operands."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                self.seen |= {a.dtype for a in args[-2:]}
            return func(*args, **(kwargs or {}))

    model.zero_grad(set_to_none=True)
    with rollout.autocast(dtype, "cpu"):
        if plain:
            logp, mask, _ = grpo.token_logprobs(model, seqs, pad, 1.0, "cpu")
        else:
            logp, mask, _ = fast.token_logprobs(model, seqs, pad, 1.0, "cpu", chunk=7, pack=4096)
    with MatmulDtypes() as mode:
        (logp * mask).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return logp.detach().double(), mask.bool(), grads, mode.seen


@pytest.mark.parametrize("plain", [False, True], ids=["fast", "plain"])
def test_bf16_forward_and_gradient_within_bf16_resolution(tiny_model_dir, plain):
    """Under --dtype bfloat16 the forwards compute in bf16 over fp32 weights (autocast), fast.py's chunked LM head
    and its backward included (every backward matmul in bf16): log-probs within bf16's resolution of fp32's, and
    fp32 gradients within a few roundings. The bounds: bf16 keeps 8 significant bits, so one rounding moves a value
    by at most u = 2^-8 of it. A log-prob, z_y - logsumexp(z), moves by about u times the logits' size; this random
    model's logits are under 1 (asserted), so under u (measured 0.17 u). The gradient sums products of such
    values: 3 u of its norm (measured 0.75-0.79 u). Both errors must be above zero: bf16 was used."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fast.use_segment_attention(model)
    tok = rollout.load_tokenizer(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 1000, (9,), generator=g).tolist()
    seqs = [(prompt, torch.randint(10, 1000, (n,), generator=g).tolist()) for n in (13, 5, 20)]
    want, mask, want_g, _ = _logprob_grads(model, seqs, tok.pad_token_id, "float32", plain)
    got, _, got_g, matmuls = _logprob_grads(model, seqs, tok.pad_token_id, "bfloat16", plain)
    assert matmuls == {torch.bfloat16}  # the backward's matmuls too (fast.ChunkedHead's are cast by hand)
    with torch.no_grad():
        assert float(model(torch.tensor([seqs[0][0] + seqs[0][1]])).logits.abs().max()) < 1
    err = (got - want).abs()[mask]
    assert 0 < float(err.max()) <= BF16_U, float(err.max())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights
    assert all(v.dtype == torch.float32 for v in got_g.values())  # and their gradients
    num = math.sqrt(sum(float((got_g[k] - want_g[k]).double().norm() ** 2) for k in want_g))
    den = math.sqrt(sum(float(want_g[k].double().norm() ** 2) for k in want_g))
    assert 0 < num <= 3 * BF16_U * den, num / den


def _bf16_digit_args(cls, digit_model_dir, tmp_path, out: str, **kw):
    """A bf16 run's Args on the digit model: 4 rollouts of at most 6 tokens, no evaluation, no checkpoints."""
    return cls(
        model=digit_model_dir,
        data=_digit_problems(tmp_path),
        rollouts=4,
        max_new_tokens=6,
        lenient=True,
        eval_data=[],
        save_every=0,
        dtype="bfloat16",
        out=str(tmp_path / out),
        **kw,
    )


def test_bf16_run_keeps_fp32_master_weights_and_bf16_copies(digit_model_dir, tmp_path):
    """--dtype bfloat16: the policy's weights and AdamW's state stay fp32 through two updates (--mini-batch 2), which
    move them by amounts bf16 could not hold; the generation replica and SDPO's teacher hold bf16 weights, and the
    replica, which computes the forwards, is the policy's weights rounded to bf16 after each update (sft.apply_update,
    before `rollout.refresh_weights`)."""
    args = _bf16_digit_args(
        sdpo.Args, digit_model_dir, tmp_path, prompts_per_step=4, warmup=0, lr=1e-4, mini_batch=2, out="run"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollout, "sample_tokens", forced_draw)
        run = sft.setup(args)
        teacher = sft.frozen_model(args.model, args, run.device)
        before = {k: p.detach().clone() for k, p in run.model.named_parameters()}
        assert run.backend.model is not run.model and {p.dtype for p in run.backend.model.parameters()} == {
            torch.bfloat16
        }
        assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
        rows, problems, _ = grpo.collect_rollouts(run, 0)
        assert run.compute is run.backend.model  # the forwards run in the bf16 replica (sft.bf16_compute_copy)
        pad = run.tokenizer.pad_token_id
        m = grpo.train_on_rollouts(run.model, run.optimizer, rows, args, 1, run.device, pad, compute=run.compute)
        assert all(q.grad is None for q in run.compute.parameters())  # moved into the masters, then freed
    assert m["updates"] == 2 and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    moved = 0
    for k, p in run.model.named_parameters():
        assert p.dtype == torch.float32
        state = run.optimizer.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        d = (p.detach() - before[k]).abs()
        # AdamW's first step moves each weight by ~lr = 1e-4: below half a bf16 spacing of most weights
        spacing = before[k].abs() * BF16_U
        moved += int(((d > 0) & (d < spacing / 2)).sum())
    assert moved > 1000  # updates that a bf16 weight would have rounded away
    replica = dict(run.backend.model.named_parameters())
    for k, p in run.model.named_parameters():
        assert torch.equal(replica[k], p.detach().to(torch.bfloat16)), k


def _counted(*a, _forward, _calls, **kw):
    _calls["layer"] += 1
    _calls["lengths"].add(a[0].shape[1] if a else kw["hidden_states"].shape[1])  # positions in this forward
    return _forward(*a, **kw)


@pytest.mark.parametrize("fast_code", [True, False], ids=["fast", "no-fast"])
def test_bf16_grad_ckpt_checkpoints_the_compute_copy(digit_model_dir, tmp_path, fast_code):
    """--dtype bfloat16 --grad-ckpt on a CPU: the bf16 replica still computes the forwards (sft.bf16_compute_copy), in
    training mode, with each decoder layer run again in the backward; it decodes with its KV cache
    (rollout.eval_mode: under --no-fast transformers' layers decode one new position at a time; fast.py's decoder
    keeps a cache of its own past the prefill). The same rollouts, and the fp32 masters' gradients within 1e-5 of
    their size of those taken without --grad-ckpt, as `test_gradient_checkpointing_changes_nothing` bounds the
    fp32 policy's."""
    got = {}
    for ckpt in (False, True):
        args = _bf16_digit_args(
            grpo.Args, digit_model_dir, tmp_path, prompts_per_step=2, grad_ckpt=ckpt, fast=fast_code, out=f"run{ckpt}"
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rollout, "sample_tokens", forced_draw)
            run = sft.setup(args)
            assert run.compute is run.backend.model and run.compute.training
            calls = {"layer": 0, "lengths": set()}  # decoder-layer forwards, counted in forward itself (a
            for layer in run.compute.model.layers:  # recomputation runs no module hooks)
                layer.forward = functools.partial(_counted, _forward=layer.forward, _calls=calls)
            rows, _, _ = grpo.collect_rollouts(run, 0)
            assert fast_code or 1 in calls["lengths"]  # decoding steps of one new position each: the KV cache
            calls["layer"] = 0
            for r in rows:
                r["advantage"] = 1.0 if r["reward"] > 0 else -1.0  # every row trained, whatever it drew
            run.optimizer.step = lambda: None  # the gradient stays on the masters
            run.optimizer.zero_grad = lambda set_to_none=True: None
            grpo.train_on_rollouts(
                run.model, run.optimizer, rows, args, 1, run.device, run.tokenizer.pad_token_id, compute=run.compute
            )
        got[ckpt] = (
            [r["response_ids"] for r in rows],
            {k: p.grad.clone() for k, p in run.model.named_parameters()},
            calls["layer"],
        )
    (ids0, g0, n0), (ids1, g1, n1) = got[False], got[True]
    assert ids1 == ids0 and n0 > 0 and n1 == 2 * n0
    scale = max(float(g.abs().max()) for g in g0.values())
    assert scale > 0 and max(float((g1[k] - g0[k]).abs().max()) for k in g0) < 1e-5 * scale


def test_bf16_compute_copy_sums_its_gradients_into_the_fp32_masters(tiny_model_dir):
    """sft.bf16_compute_copy: the bf16 replica's backward leaves its own gradients freed and each fp32 master's .grad
    the fp32 sum of that parameter's bf16 gradients over the micro-batches, exactly: the same as a hook-free copy's
    gradients, taken one micro-batch at a time and summed in fp32 by hand. The masters' weights do not move."""
    import copy

    model, _ = rollout.load_model(tiny_model_dir, "float32")
    replica, tok = rollout.load_model(tiny_model_dir, "bfloat16")
    plain = fast.use_segment_attention(copy.deepcopy(replica).requires_grad_(True))
    assert sft.bf16_compute_copy(replica, model, segment_attention=True) is replica
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 1000, (7,), generator=g).tolist()
    micros = [[(prompt, torch.randint(10, 1000, (n,), generator=g).tolist()) for n in ns] for ns in ((9, 4), (12,))]
    want = {}
    for seqs in micros:
        for net in (replica, plain):
            plain.zero_grad(set_to_none=True)
            logp, mask, _ = fast.token_logprobs(net, seqs, tok.pad_token_id, 1.0, "cpu", chunk=7, pack=4096)
            (logp * mask).sum().backward()
        for k, q in plain.named_parameters():
            want[k] = q.grad.float() + want.get(k, 0)
    assert all(q.grad is None for q in replica.parameters())
    for k, p in model.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, want[k]), k
        assert torch.equal(p.detach(), before[k]), k
    assert float(sum(w.norm() ** 2 for w in want.values())) > 0


def _sgd_gradient(model_dir, tmp_path, script, name, *flags):
    """One SGD step at lr 1 on the digit model under the tests' sampler: (its rollouts' texts, its gradient)."""
    _, rolls, out = _digit_run(model_dir, tmp_path, script, name, *flags, sgd=True)
    return [r["text"] for r in rolls], _gradient_from_sgd_step(model_dir, out)


@pytest.mark.parametrize(
    "script,flags",
    [("grpo.py", ["--loss-agg", "token-mean"]), ("grpo.py", ["--no-fast"]), ("sdpo.py", ["--seed", "1"])],
    ids=["grpo", "grpo-no-fast", "sdpo"],
)
def test_bf16_update_matches_fp32(digit_model_dir, tmp_path, script, flags):
    """An update taken under --dtype bfloat16 equals fp32's to bf16's resolution: the same rollouts (the tests'
    sampler picks among tokens far from every threshold, so the bf16 replica draws what the fp32 policy draws), and
    the gradient recovered from an SGD step at lr 1 within the bound below, the large parts of the gradient pointing
    the same way (cosine > 0.99). A bf16 step that lost the fp32 master weights, sampled from a stale replica or
    computed in fp32 would fail one of these.

    The bound: the forwards run in the bf16 replica (sft.bf16_compute_copy), whose logits are bf16, rounded by up to
    u = 2^-8 of their size; the digit model's three tokens have logits near 17 (`digit_model_dir`), so a log-prob
    moves by up to 2 u 17 = 0.13 and the softmax terms of the gradient, p and 1 - p, by about as much relative to
    themselves: 2 u 17 of the gradient's norm (measured: 25 u GRPO, 11 u GRPO --no-fast, 9 u SDPO). A parameter's
    gradient is itself bf16 before the masters sum it in fp32; a small one that sums terms of both signs over the
    positions keeps less of its direction: layer 0's input norm, 1.6% of the norm, at cosine 0.77 (GRPO)."""
    texts32, g32 = _sgd_gradient(digit_model_dir, tmp_path, script, "fp32", *flags, "--dtype", "float32")
    texts16, g16 = _sgd_gradient(digit_model_dir, tmp_path, script, "bf16", *flags, "--dtype", "bfloat16")
    assert texts16 == texts32
    num = math.sqrt(sum(float((g16[k] - g32[k]).double().norm() ** 2) for k in g32))
    den = math.sqrt(sum(float(g32[k].double().norm() ** 2) for k in g32))
    assert den > 1e-3 and 0 < num <= 2 * BF16_U * 17 * den, num / den
    for k in g32:  # a large part of the gradient keeps its direction; the norms' small sums cancel more: 0.7
        share = float(g32[k].norm()) / den
        if share > 1e-3:
            cos = float(torch.nn.functional.cosine_similarity(g16[k].flatten().double(), g32[k].flatten().double(), 0))
            assert cos > (0.99 if share > 0.05 else 0.7), (k, cos, share)


# ============================================================================================
# Copying: the math uses torch and the standard library alone
# ============================================================================================
PURE_MATH = {
    grpo: ["group_advantages", "loss_denominator", "policy_loss", "k3_kl", "upcast"],
    sdpo: ["tail_bucket", "topk_support", "finish_support", "divergence", "self_distillation_loss", "sdpo_loss"]
    + ["teacher_contexts", "karmarkar_karp", "balanced_positions"],
    rollout: ["strip_think"],
}


def _reads_beyond_torch(fn, seen) -> list[str]:
    """What `fn` (and the functions it defines inside) reads beyond torch, the standard library, builtins and its own
    file's names: a module it imports, or a name of another of this project's files. A function of this project
    that it calls, as `name` or `module.name`, is followed in turn."""
    import dis
    import types

    project = {m.__name__ for m in (data, epistemic, rollout, evaluate, sft, grpo, sdpo, fast)}
    allowed = ("torch", *sys.stdlib_module_names)
    bad, codes = [], [fn.__code__]
    while codes:
        code = codes.pop()
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        ins = list(dis.get_instructions(code))
        for i, op in enumerate(ins):
            if op.opname == "IMPORT_NAME" and op.argval.split(".")[0] not in allowed:
                bad.append(f"import {op.argval}")
            if op.opname != "LOAD_GLOBAL" or op.argval not in fn.__globals__:
                continue  # a builtin
            value, name = fn.__globals__[op.argval], op.argval
            if isinstance(value, types.ModuleType) and value.__name__ in project:
                attr = ins[i + 1].argval if i + 1 < len(ins) and ins[i + 1].opname == "LOAD_ATTR" else None
                value, name = getattr(value, str(attr), None), f"{op.argval}.{attr}"
                bad.append(name)  # another file's function (followed below), constant or class
                if not isinstance(value, types.FunctionType):
                    continue
            if isinstance(value, types.ModuleType):
                if value.__name__.split(".")[0] not in allowed:
                    bad.append(name)
            elif isinstance(value, types.FunctionType) and value.__module__ in project:
                if value not in seen:
                    seen.add(value)
                    bad += _reads_beyond_torch(value, seen)
            elif isinstance(value, type) and value.__module__ in project:
                bad.append(name)
    return bad


@pytest.mark.parametrize("module", list(PURE_MATH), ids=lambda m: m.__name__)
def test_the_math_copies_with_torch_alone(module):
    """The advantages, the policy loss, the divergence and Eq. 1, the SDPO weighting and the teacher contexts read
    nothing but torch, the standard library and their own file: copied, they run alone. Two exceptions, named: the
    SDPO objective's --pg-coef remedy adds grpo.policy_loss, and c = s\\think rollout.strip_think (each pure itself).
    The checker itself flags a class of another file (rollout.SamplingParams in grpo.collect_rollouts) and an import
    met on the way (transformers, under grpo.grpo_train_step's sft.frozen_model)."""
    for name in PURE_MATH[module]:
        want = {"sdpo_loss": ["grpo.policy_loss"], "teacher_contexts": ["rollout.strip_think"]}.get(name, [])
        assert _reads_beyond_torch(getattr(module, name), set()) == want, (module.__name__, name)
    assert "rollout.SamplingParams" in _reads_beyond_torch(grpo.collect_rollouts, set())
    assert "import transformers" in _reads_beyond_torch(grpo.grpo_train_step, set())

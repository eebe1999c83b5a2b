"""epistemic.py -- epistemic markers and the word-usage analyses of the paper.

Implements, for arXiv 2603.24472:
  - the 10 epistemic markers T = {wait, hmm, perhaps, maybe, actually, alternatively, seems, might,
    likely, check} and E(y) = sum_t count(t, y) (Sec. 3, "Epistemic Tokens") -> `MARKERS`,
    `count_markers`, `epistemic_count`
  - the per-marker breakdown over many responses (App. B.1, Fig. 9) -> `marker_breakdown`
  - the word-frequency shift of App. B.4 (Eq. 6): mu_m(w) = (1/N) sum_i f(w, r_i^(m)),
    Delta_m(w) = mu_m(w) - mu_base(w) over the base model's vocabulary, markers vs the rest
    (Fig. 12) -> `word_frequency_shift`
  - splitting a response into its <think> part and its answer -> `split_think`
  - the tokens at which a marker begins, for sdpo.py's --protect-epistemic -> `marker_start_positions`
  - what the checks of the reasoning organism's responses did: caught slips (not in the paper) ->
    `check_outcomes`, `mechanism`

Departures from the released analysis code (beanie00/self-distillation-analysis,
eval/check_epistemic_tokens.py), and why:
  1. None by default: counts are lower-cased substring counts over the whole response, exactly as
     released, so "checking" counts for check and "hmmm" for hmm. `whole_words=True` is an extra
     mode that counts whole words only, for readers who want the stricter reading.
  2. App. B.4 says only "English words extracted with regular expressions"; we take maximal runs of
     ASCII letters, lower-cased (`[a-z]+` after lower()), and whole-word counts.

Run it:
    python epistemic.py responses.jsonl                 # per-marker table
    python epistemic.py trained.jsonl --base base.jsonl  # + App. B.4 frequency shift
Each jsonl row holds a response under "response" (or a list under "responses" /
"generated_responses", the released code's key); `--key` picks another field.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
from collections import Counter

MARKERS = ("wait", "hmm", "perhaps", "maybe", "actually", "alternatively", "seems", "might", "likely", "check")
_WORD = re.compile(r"[a-z]+")


def count_markers(text: str, whole_words: bool = False) -> dict[str, int]:
    """Occurrences of each marker in `text`, case-insensitive. Substrings by default (the paper's code)."""
    low = text.lower()
    if whole_words:
        words = Counter(_WORD.findall(low))
        return {m: words[m] for m in MARKERS}
    return {m: low.count(m) for m in MARKERS}


def epistemic_count(text: str, whole_words: bool = False) -> int:
    """E(y): the total count of the 10 markers in y (Sec. 3)."""
    return sum(count_markers(text, whole_words).values())


def marker_start_positions(pieces: list[str], whole_words: bool = False) -> list[int]:
    """Indices of the pieces (a response's tokens, each decoded) in which an occurrence of a marker
    begins, counted as `count_markers` counts (substrings by default, so "Checking" begins at its first
    token too). A marker split over tokens, "W" + "ait", is found at "W"."""
    starts, pos = [], 0
    for piece in pieces:
        starts.append(pos)
        pos += len(piece)
    text = "".join(pieces).lower()
    pattern = r"\b(?:%s)\b" if whole_words else "(?:%s)"
    out = []
    for m in re.finditer(pattern % "|".join(MARKERS), text):
        i = bisect.bisect_right(starts, m.start()) - 1  # the last piece starting at or before it: never empty
        if not out or out[-1] != i:
            out.append(i)
    return out


def marker_tokens(tokenizer) -> dict[int, str]:
    """token id -> surface form (" Wait", "Wait", " wait", ...) for every vocabulary entry that is one of
    the 10 epistemic markers on its own (App. B.6, Table 6). One pass over the vocabulary."""
    out = {}
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text.strip().lower() in MARKERS:
            out[token_id] = text
    return out


def split_think(text: str) -> tuple[str, str]:
    """(think, answer). Text up to the first </think> is thinking; a leading <think> is dropped.

    Models whose template opens the tag in the prompt (DeepSeek-R1-Distill) emit no <think>, only
    </think>; a response with no </think> has no thinking part."""
    head, sep, tail = text.partition("</think>")
    if not sep:
        return "", text
    head = head.lstrip()
    if head.startswith("<think>"):
        head = head[len("<think>") :]
    return head.strip(), tail.strip()


# --------------------------------------------------------------------------------------------
# Caught slips: the paper's explanation, tested directly (no anchor measures it). The reasoning organism
# (data.think_trace) computes "a op b = v" and checks a result as "Wait, let me check: <the inverse> = r." then
# "Yes." or ", not a. I made a mistake: a op b = v'.". Each equation's truth is exact integer arithmetic, so a
# response's checks can be graded: did one flag a wrong result, and did the correction then hold?
# --------------------------------------------------------------------------------------------
_EQUATION = r"(?<![\d.])(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)(?!\.\d)"  # whole numbers, not parts of decimals
_RESULT = re.compile(_EQUATION)
_CHECK = re.compile(r"let me check: " + _EQUATION + r"(?:\.\s*(yes)|, not (-?\d+))", re.IGNORECASE)


def equation_holds(a, op: str, b, value) -> bool:
    """Whether "a op b = value" is true in integers ("/" is exact division)."""
    a, b, value = int(a), int(b), int(value)
    return {"+": a + b == value, "-": a - b == value, "*": a * b == value, "/": b != 0 and a == b * value}[op]


def check_outcomes(response: str) -> dict[str, int]:
    """What the verbalized checks of one response did, in its <think> part (the whole text when it has none).

    checks: "let me check" occurrences. Results are the equations outside a check's own equation; each graded
    check refers to the last result before it. Counts of results (one checked twice counts once): wrong: false ones;
    caught: false ones a check flags ("..., not a"); fixed: caught ones whose next result (the correction) is true;
    confirmed_wrong: false ones a check passes ("Yes"); false_alarms: true ones a check flags."""
    think, _ = split_think(response)
    text = think or response
    checks = list(_CHECK.finditer(text))
    spans = [c.span() for c in checks]
    results = [m for m in _RESULT.finditer(text) if not any(a <= m.start() < b for a, b in spans)]
    wrong = {i for i, m in enumerate(results) if not equation_holds(*m.groups())}
    caught, fixed, passed, alarms = set(), set(), set(), set()  # results, by index: a result checked twice counts once
    for c in checks:
        before = [i for i, m in enumerate(results) if m.end() <= c.start()]
        if not before:
            continue
        i, flagged = before[-1], c.group(6) is not None
        if flagged and i in wrong:
            caught.add(i)
            after = [m for m in results if m.start() >= c.end()]
            if after and equation_holds(*after[0].groups()):
                fixed.add(i)
        (alarms if flagged else passed).add(i)
    return dict(
        checks=text.lower().count("let me check"),
        wrong=len(wrong),
        caught=len(caught),
        fixed=len(fixed),
        confirmed_wrong=len(passed & wrong),
        false_alarms=len(alarms - wrong),
    )


def mechanism(responses: list[str], correct: list[bool]) -> dict[str, float]:
    """Shares of responses that verbalize a check, catch a wrong result, end right (`correct`) after a caught and
    fixed slip ("right because of the catch"), leave a wrong result uncaught, and pass a wrong result with a check."""
    n = max(len(responses), 1)
    rows = [check_outcomes(r) for r in responses]
    return dict(
        check=sum(o["checks"] > 0 for o in rows) / n,
        catch=sum(o["caught"] > 0 for o in rows) / n,
        rescued=sum(o["fixed"] > 0 and ok for o, ok in zip(rows, correct)) / n,
        uncaught=sum(o["wrong"] > o["caught"] for o in rows) / n,
        confirmed_wrong=sum(o["confirmed_wrong"] > 0 for o in rows) / n,
    )


def marker_breakdown(responses: list[str], whole_words: bool = False) -> dict[str, float]:
    """Mean count per response of each marker, plus 'total' = mean E(y) (Fig. 9)."""
    n = max(len(responses), 1)
    sums = Counter()
    for r in responses:
        sums.update(count_markers(r, whole_words))
    out = {m: sums[m] / n for m in MARKERS}
    out["total"] = sum(sums.values()) / n
    return out


def word_frequencies(responses: list[str]) -> dict[str, float]:
    """mu(w): mean number of occurrences of each word per response (Eq. 6)."""
    n = max(len(responses), 1)
    total = Counter()
    for r in responses:
        total.update(_WORD.findall(r.lower()))
    return {w: c / n for w, c in total.items()}


def word_frequency_shift(base_responses: list[str], responses: list[str]) -> dict:
    """App. B.4: Delta(w) = mu_m(w) - mu_base(w) for every word w of the base model's vocabulary.

    Returns the per-word shifts and the comparison of Fig. 12: mean shift over the markers T
    (those present in the base vocabulary) against the mean shift over V \\ T."""
    mu_base, mu = word_frequencies(base_responses), word_frequencies(responses)
    delta = {w: mu.get(w, 0.0) - mu_base[w] for w in mu_base}
    markers = [w for w in MARKERS if w in delta]
    rest = [d for w, d in delta.items() if w not in MARKERS]

    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    return dict(
        delta=delta,
        marker_delta={w: delta[w] for w in markers},
        mean_marker_delta=mean([delta[w] for w in markers]),
        mean_rest_delta=mean(rest),
        mean_abs_marker_delta=mean([abs(delta[w]) for w in markers]),
        mean_abs_rest_delta=mean([abs(d) for d in rest]),
        vocab_size=len(delta),
    )


def read_responses(path: str, key: str | None = None) -> list[str]:
    """Responses from a jsonl file: `key`, else "response", "responses" or "generated_responses"."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {i}: not valid JSON ({e})") from None
            keys = [key] if key else ["response", "responses", "generated_responses"]
            found = next((k for k in keys if isinstance(row, dict) and k in row), None)
            if found is None:
                raise ValueError(f"{path}: row {i}: no field {' / '.join(map(repr, keys))}")
            value = row[found]
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in values):
                raise ValueError(f"{path}: row {i}, field {found!r}: expected text")
            out.extend(values)
    if not out:
        raise ValueError(f"{path}: no responses")
    return out


def format_table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(r):
        return "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="\n".join(__doc__.split("\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("responses", help="jsonl file of responses")
    p.add_argument("--base", default=None, help="jsonl of the base model's responses: adds the App. B.4 shift table")
    p.add_argument(
        "--key",
        default=None,
        help="field that holds the response (default: response / responses / generated_responses)",
    )
    p.add_argument(
        "--whole-words", action="store_true", help="count whole words only (default: substrings, as the paper)"
    )
    p.add_argument(
        "--part",
        choices=["all", "think", "answer"],
        default="all",
        help="count over the whole response (paper), its <think> part, or the text after </think>",
    )
    args = p.parse_args(argv)
    try:
        report(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def report(args):
    pick = {"all": lambda r: r, "think": lambda r: split_think(r)[0], "answer": lambda r: split_think(r)[1]}[args.part]
    responses = [pick(r) for r in read_responses(args.responses, args.key)]
    columns = [("model", responses)]
    if args.base:
        columns.insert(0, ("base", [pick(r) for r in read_responses(args.base, args.key)]))
    stats = {name: marker_breakdown(rs, args.whole_words) for name, rs in columns}
    print(
        f"mean count per response ({len(responses)} responses"
        f"{', ' + str(len(columns[0][1])) + ' base' if args.base else ''})"
    )
    print(
        format_table(
            [(m, *(f"{stats[name][m]:.2f}" for name, _ in columns)) for m in (*MARKERS, "total")],
            ("marker", *(name for name, _ in columns)),
        )
    )
    if args.base:
        shift = word_frequency_shift(columns[0][1], responses)
        print(f"\nApp. B.4 word-frequency shift (vocabulary of the base responses: {shift['vocab_size']} words)")
        print(format_table([(w, f"{d:+.2f}") for w, d in shift["marker_delta"].items()], ("marker", "Delta")))
        print(
            f"mean Delta over markers: {shift['mean_marker_delta']:+.3f} (|.| {shift['mean_abs_marker_delta']:.3f}); "
            f"over the other words: {shift['mean_rest_delta']:+.3f} (|.| {shift['mean_abs_rest_delta']:.3f})"
        )


if __name__ == "__main__":
    main()

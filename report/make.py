"""report/make.py -- the CPU reproduction's report: report/REPORT.md and its PNG plots, from the runs' files.

    python -m report.make runs/cpu --out report        # the README's reproduction blocks, summarised

It reads what the README's reproduction blocks wrote under RUNS (the organism's and each run's evaluation records,
their metrics.jsonl, Table 1's table, Table 2's sets) and never loads a model. Per evaluation set and step: accuracy,
length, E(y), the format rates and what the checks did (`epistemic.mechanism`); each run minus the baseline (GRPO),
with 95% bootstrap intervals over seeds and problems; a learning-rate sweep's table; Table 2. The plots need
matplotlib (an optional extra) and are left out without it.

Copying: needs data.py, epistemic.py and rollout.py (its entry point: errors in one line) on the import path (run it
from the repository's root), and numpy.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers.hf_argparser import HfArg

import data
import epistemic
import rollout


@dataclass
class ReportArgs:
    runs: str = HfArg(
        default="runs/cpu",
        help="the reproduction block's directory: organism/, base/, table1/, sft/, NAME/seedK/ (metrics.jsonl and "
        "eval/)",
    )
    out: str = HfArg(default="report", help="where REPORT.md and the PNG plots go")
    baseline: str = HfArg(default="grpo", help="the run every other run is compared with")
    last: int = HfArg(default=5, help="a run's training figures: the mean over its last this many steps")
    boot: int = HfArg(default=2000, help="bootstrap replicates for the 95%% intervals")
    groups: list[str] = field(
        default_factory=lambda: [
            "GRPO vs SDPO (Fig. 3-5)=grpo,sdpo,grpo_lr1e-6,sdpo_nothink",
            "Fixed vs EMA teacher (Fig. 6)=sdpo,sdpo_ema",
            "Task coverage |D| (Fig. 7/8)=grpo_d1,grpo,sdpo_d1,sdpo",
            "Remedies (beyond the paper)=grpo,sdpo,sdpo_protect,sdpo_pg,sdpo_entw",
        ],
        metadata={
            "help": "comparisons, each 'title=run,run,...'; runs that are absent are left out, and so is a plot "
            "whose runs an earlier one showed"
        },
    )

    def __post_init__(self):
        data.check(self, "last boot", *data.POSITIVE)


def read_metrics(path: Path) -> list[dict]:
    """The per-step rows of a metrics.jsonl, one per step (a resumed run's repeated steps: the last wins)."""
    rows = {row["step"]: row for row in data.read_jsonl(path) if "step" in row}
    return [rows[k] for k in sorted(rows)]


def read_samples(path: Path) -> dict:
    """Per-problem means over a samples.jsonl's responses, keyed (benchmark, id): acc, length, E(y), format (the
    share that close </think> and box an answer), truncated, and the checks' outcomes (`epistemic.mechanism`)."""
    return read_steps(path).get(0, {})


def read_steps(path: Path) -> dict[int, dict]:
    """{step: read_samples' dict} from a file of evaluation records; a record without 'step' counts as step 0 (an
    evaluate.py run). A step evaluated twice (a resumed run) keeps its last records."""
    out = {}
    for i, r in enumerate(data.read_jsonl(path)):
        try:
            n = len(r["scores"])
            out.setdefault(r.get("step", 0), {})[(r["benchmark"], r["id"])] = dict(
                acc=sum(r["scores"]) / n,
                length=sum(r["lengths"]) / n,
                epistemic=sum(r["epistemic"]) / n,
                format=sum(
                    "</think>" in x and data.last_boxed(data.answer_part(x)) is not None for x in r["responses"]
                )
                / n,
                truncated=sum(f == "length" for f in r["finish_reasons"]) / n,
                n=n,
                **epistemic.mechanism(r["responses"], [s > 0 for s in r["scores"]]),
            )
        except (KeyError, TypeError, ZeroDivisionError) as e:
            raise ValueError(f"{path}: row {i}: not a samples.jsonl record ({e!r})") from None
    return out


def bootstrap(a, b=None, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high): the mean over seeds of the mean over problems of a (seeds, problems) array, and its 95%
    percentile interval. Each replicate draws seeds with replacement and problems with replacement, the same
    problems for every seed (they share them). With b, the difference a - b: the two runs' seeds drawn apart, their
    problems together (paired)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a = np.asarray(a, dtype=float)
    b = None if b is None else np.asarray(b, dtype=float)
    point = a.mean() - (b.mean() if b is not None else 0.0)
    reps_ = np.empty(reps)
    for k in range(reps):
        p = rng.integers(0, a.shape[1], a.shape[1])
        reps_[k] = a[rng.integers(0, len(a), len(a))][:, p].mean()
        if b is not None:
            reps_[k] -= b[rng.integers(0, len(b), len(b))][:, p].mean()
    low, high = np.percentile(reps_, [2.5, 97.5])
    return float(point), float(low), float(high)


def ci(t: tuple | None, fmt: str = ".3f", sign: bool = False) -> str:
    """'m [lo, hi]'; with sign, a difference, starred when its interval excludes 0."""
    if t is None:
        return "-"
    f = ("+" if sign else "") + fmt
    return f"{t[0]:{f}} [{t[1]:{f}}, {t[2]:{f}}]" + (" *" if sign and (t[1] > 0 or t[2] < 0) else "")


def eval_matrix(evals: dict, key: str, ids: list) -> list[list[float]]:
    """(seeds, problems) of one per-problem figure, problems in the order of ids."""
    return [[ev[i][key] for i in ids] for ev in evals.values()]


def training_matrix(seeds: dict, key: str, last: int, first: bool = False) -> list[list[float]] | None:
    """(seeds, 1): per seed, the first step's figure, or the mean over those of its last `last` steps that have one
    (a step logs None where nothing was measured, e.g. SDPO's KL without a context); None where a seed has none."""
    values = [
        [r[key] for r in (rows[:1] if first else rows[-last:]) if r.get(key) is not None] for rows in seeds.values()
    ]
    return [[sum(v) / len(v)] for v in values] if all(values) else None


def plot_group(title: str, runs: dict, evals: dict, base: dict | None, path: Path, boot: int) -> bool:
    """Score, length, E(y) and think length over steps (mean over seeds, 95% band over seeds) and the held-out
    accuracy with its 95% interval. False when matplotlib is missing (an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = {
        "score": "training score",
        "length": "response length (tokens)",
        "epistemic": "epistemic count E(y)",
        "think_length": "tokens inside <think>",
    }
    fig, axes = plt.subplots(1, 5, figsize=(21, 3.6))
    for name, seeds in runs.items():
        for ax, key in zip(axes, keys):
            steps = sorted({r["step"] for rows in seeds.values() for r in rows if key in r})
            if not steps:
                continue
            stats = [
                bootstrap([[r[key]] for rows in seeds.values() for r in rows if r["step"] == t], reps=boot)
                for t in steps
            ]
            ax.plot(steps, [s[0] for s in stats], marker="o", markersize=3, label=name)
            ax.fill_between(steps, [s[1] for s in stats], [s[2] for s in stats], alpha=0.2)
            ax.set_xlabel("step")
            ax.set_title(keys[key])
    names = [n for n in runs if n in evals]
    for i, name in enumerate(names):
        m, lo, hi = evals[name]
        axes[4].bar(i, m, color=f"C{list(runs).index(name)}")
        axes[4].errorbar(i, m, yerr=[[m - lo], [hi - m]], color="k", capsize=4)
    axes[4].set_xticks(range(len(names)), names, rotation=30)
    if base:
        axes[4].axhline(base["acc"], color="gray", linestyle="--", label="before training")
        axes[4].legend(fontsize=8)
    axes[4].set_title("held-out accuracy (95% interval)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title + " (mean over seeds, 95% bootstrap band)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _problem_table(samples: dict, reps: int) -> str:
    """One row per benchmark of a single evaluation: acc, E(y), length, format, truncated with 95% intervals over
    problems."""
    rows = []
    for bench in sorted({b for b, _ in samples}):
        ids = sorted(k for k in samples if k[0] == bench)

        def col(key, fmt=".3f", ids=ids):
            return ci(bootstrap([[samples[i][key] for i in ids]], reps=reps), fmt)

        rows.append(
            (
                bench,
                len(ids),
                col("acc"),
                col("epistemic", ".2f"),
                col("length", ".1f"),
                col("format"),
                col("truncated"),
            )
        )
    return (
        epistemic.format_table(
            rows, ("benchmark", "problems", "acc", "E(y)", "length", "closes </think> and boxes", "truncated")
        )
        + "\n"
    )


def _table2(root: Path, boot: int) -> str | None:
    """Table 2's section: SFT on D_ug vs D_sg, their training rows, then per evaluation set (in the order they were
    evaluated) the organism's figures (base/, where it exists), each SFT model's, and D_sg minus D_ug paired on
    problems (where both graded the same problems of that set), * where its interval excludes 0."""
    train, evals = [], {}
    for setting, name in (("unguided", "D_ug"), ("solution", "D_sg")):
        d, ev = root / "sft" / f"d_{setting}.jsonl", root / "sft" / setting / "eval" / "samples.jsonl"
        if d.exists() and ev.exists():
            rows = data.read_jsonl(d)
            n = max(len(rows), 1)
            length, e = sum(r["length"] for r in rows) / n, sum(r["epistemic"] for r in rows) / n
            train.append((f"SFT on {name}", len(rows), f"{length:.1f}", f"{e:.2f}"))
            evals[name] = read_samples(ev)
    if not train:
        return None
    if (root / "base" / "samples.jsonl").exists():
        evals = {"organism": read_samples(root / "base" / "samples.jsonl"), **evals}
    rows, keys = [], (("acc", ".3f"), ("length", ".1f"), ("epistemic", ".2f"))
    for bench in dict.fromkeys(b for name in ("D_ug", "D_sg") for b, _ in evals.get(name, {})):
        for name, s in evals.items():
            ids = [k for k in s if k[0] == bench]
            if ids:
                rows.append([bench, name if name == "organism" else f"SFT on {name}", len(ids)])
                rows[-1] += [ci(bootstrap([[s[i][k] for i in ids]], reps=boot), f) for k, f in keys]
        ids = [k for k in evals.get("D_sg", {}) if k[0] == bench]
        if ids and {k for k in evals.get("D_ug", {}) if k[0] == bench} == set(ids):  # the same problems: paired
            rows.append([bench, "D_sg minus D_ug", len(ids)])
            for k, f in keys:
                a, b = ([[evals[m][i][k] for i in ids]] for m in ("D_sg", "D_ug"))
                rows[-1].append(ci(bootstrap(a, b, reps=boot), f, sign=True))
    return (
        "## Table 2: SFT on D_ug vs D_sg\n\n"
        + epistemic.format_table(train, ("model", "train rows", "train length", "train E(y)"))
        + "\n\n"
        + epistemic.format_table(rows, ("set", "model", "problems", "acc", "length", "E(y)"))
        + "\n"
    )


def _run_sections(root: Path, args: ReportArgs, base: dict | None, out: Path) -> list[str]:
    """The training runs' sections: their table, each minus the baseline, the plots, the figures per step. A run's
    held-out figures come from eval/ at every seed, once each evaluation has finished (summary.json written)."""
    md = []
    runs, evals = {}, {}
    for path in sorted(root.glob("*/seed*/metrics.jsonl")):
        rows = read_metrics(path)
        if rows and "score" in rows[0]:
            name, seed = path.parent.parent.name, path.parent.name
            runs.setdefault(name, {})[seed] = rows
            if (path.parent / "eval" / "summary.json").exists():  # written last: the evaluation is complete
                evals.setdefault(name, {})[seed] = read_samples(path.parent / "eval" / "samples.jsonl")
    evals = {n: ev for n, ev in evals.items() if len(ev) == len(runs[n])}  # only runs evaluated at every seed
    shared = sorted(set.intersection(*(set(e) for ev in evals.values() for e in ev.values()))) if evals else []
    last, reps = args.last, args.boot
    if not runs:
        return md
    table, acc_ci = [], {}
    for name, seeds in runs.items():

        def tm(key, first=False, seeds=seeds):
            m = training_matrix(seeds, key, last, first)
            return m and bootstrap(m, reps=reps)

        def em(key, name=name):
            return bootstrap(eval_matrix(evals[name], key, shared), reps=reps) if name in evals else None

        acc_ci[name] = em("acc")
        table.append(
            (
                name,
                len(seeds),
                ci(tm("score")),
                ci(tm("length", True), ".1f"),
                ci(tm("length"), ".1f"),
                ci(tm("epistemic", True), ".2f"),
                ci(tm("epistemic"), ".2f"),
                ci(tm("think_length"), ".1f"),
                ci(tm("answer_length"), ".1f"),
                ci(tm("kl") if all("kl_epistemic" in r[-1] for r in seeds.values()) else None, ".3f"),  # SDPO
                ci(acc_ci[name]),
                ci(em("length"), ".1f"),
                ci(em("epistemic"), ".2f"),
            )
        )
    md.append(
        f"## Training runs\n\nTraining figures: step 1, and the mean over the last {last} steps, one value "
        f"per seed (their intervals draw seeds only). Held-out: "
        + (f"the final checkpoint on {len(shared)} held-out problems (eval/).\n\n" if shared else "no eval/ yet.\n\n")
        + epistemic.format_table(
            table,
            (
                "run",
                "seeds",
                "score (last)",
                "length 1st",
                "length (last)",
                "E(y) 1st",
                "E(y) (last)",
                "think length (last)",
                "answer length (last)",
                "teacher KL (last)",
                "held-out acc",
                "held-out length",
                "held-out E(y)",
            ),
        )
        + "\n"
    )
    if args.baseline in runs:
        b_seeds = runs[args.baseline]
        diffs = []
        for name, seeds in runs.items():
            if name == args.baseline:
                continue

            def td(key, seeds=seeds):
                m, n = training_matrix(seeds, key, last), training_matrix(b_seeds, key, last)
                return m and n and bootstrap(m, n, reps=reps)

            def ed(key, name=name):
                return (
                    bootstrap(
                        eval_matrix(evals[name], key, shared),
                        eval_matrix(evals[args.baseline], key, shared),
                        reps=reps,
                    )
                    if name in evals and args.baseline in evals
                    else None
                )

            diffs.append(
                (
                    name,
                    len(seeds),
                    ci(td("length"), ".1f", True),
                    ci(td("epistemic"), ".2f", True),
                    ci(td("think_length"), ".1f", True),
                    ci(ed("acc"), ".3f", True),
                    ci(ed("length"), ".1f", True),
                    ci(ed("epistemic"), ".2f", True),
                )
            )
        note = "A run of one seed has no spread over seeds in its intervals: they understate its noise.\n\n"
        md.append(
            f"## Each run minus {args.baseline}\n\n{note}"
            + epistemic.format_table(
                diffs,
                (
                    "run",
                    "seeds",
                    "length (last)",
                    "E(y) (last)",
                    "think length (last)",
                    "held-out acc",
                    "held-out length",
                    "held-out E(y)",
                ),
            )
            + "\n"
        )
    drawn = set()
    for spec in args.groups:
        title, _, names = spec.partition("=")
        group = {n: runs[n] for n in names.split(",") if n in runs}
        if not group or set(group) <= drawn:  # nothing that an earlier plot did not show
            continue
        drawn |= set(group)
        png = "".join(c if c.isalnum() else "_" for c in title.lower()).strip("_")[:40] + ".png"
        md.append(f"## {title}\n")
        if plot_group(title, group, {n: acc_ci[n] for n in group if acc_ci[n]}, base, out / png, reps):
            md.append(f"![{title}]({png})\n")
    per_step = []
    for name, seeds in runs.items():
        for t in sorted({r["step"] for rows in seeds.values() for r in rows}):
            at = [r for rows in seeds.values() for r in rows if r["step"] == t]

            def mean(key, fmt, at=at):
                return f"{sum(r.get(key, 0) for r in at) / len(at):{fmt}}"

            per_step.append(
                (
                    name,
                    len(at),
                    t,
                    mean("score", ".3f"),
                    mean("length", ".1f"),
                    mean("think_length", ".1f"),
                    mean("epistemic", ".2f"),
                )
            )
    md.append(
        "## Per step (mean over seeds)\n\n"
        + epistemic.format_table(per_step, ("run", "seeds", "step", "score", "length", "think length", "E(y)"))
        + "\n"
    )
    return md


MECHANISM = dict(check="verbalize a check", catch="catch a wrong result", rescued="right after a caught slip")


def plot_sets(curves: dict, base: dict, benches: list, path: Path, boot: int) -> bool:
    """Accuracy, length and E(y) against step, one row per evaluation set (Fig. 3's manner): the mean over seeds and
    problems with its 95% bootstrap band; step 0 is the organism before training. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = dict(acc="accuracy", length="response length (tokens)", epistemic="E(y)")
    fig, axes = plt.subplots(len(benches), 3, figsize=(15, 3.2 * len(benches)), squeeze=False)
    for row, bench in zip(axes, benches):
        for ax, key in zip(row, keys):
            for name, (steps, mats) in curves.items():
                stats = [bootstrap(mats[t][bench][key], reps=boot) for t in steps]
                at0 = [k for k in base if k[0] == bench]
                if at0:
                    steps, stats = [0, *steps], [bootstrap([[base[k][key] for k in at0]], reps=boot), *stats]
                ax.plot(steps, [s[0] for s in stats], marker="o", markersize=3, label=name)
                ax.fill_between(steps, [s[1] for s in stats], [s[2] for s in stats], alpha=0.2)
            ax.set_title(f"{bench}: {keys[key]}", fontsize=9)
            ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _set_sections(root: Path, args: ReportArgs, out: Path) -> list[str]:
    """The evaluation sets over steps: each run's evaluations during training (eval_samples.jsonl, at every seed)
    and the organism's before it (base/): accuracy, length, E(y) and what the checks did, per set and step; each
    run minus the baseline; the curves."""
    runs = {}
    for path in sorted(root.glob("*/seed*/eval_samples.jsonl")):
        runs.setdefault(path.parent.parent.name, {})[path.parent.name] = read_steps(path)
    steps = sorted({t for seeds in runs.values() for st in seeds.values() for t in st})
    unfinished = sorted(n for n, seeds in runs.items() if any(sorted(st) != steps for st in seeds.values()))
    runs = {n: seeds for n, seeds in runs.items() if n not in unfinished}
    every = [ev for seeds in runs.values() for st in seeds.values() for ev in st.values()]
    shared = set.intersection(*(set(ev) for ev in every)) if every else set()  # problems every evaluation graded
    if not shared:
        left = f" (not yet evaluated at every step: {', '.join(unfinished)})" if unfinished else ""
        return [f"## The evaluation sets\n\nNo problem was graded at every step of every run{left}.\n"] * bool(
            runs or unfinished
        )
    benches = [
        b for b in dict.fromkeys(b for ev in every for b, _ in ev) if any(k[0] == b for k in shared)
    ]  # --eval-data's order
    ids = {b: sorted(k for k in shared if k[0] == b) for b in benches}
    keys = ("acc", "length", "epistemic", *MECHANISM, "uncaught")
    curves = {  # name -> (steps, {step: {bench: {key: (seeds, problems)}}})
        name: (steps, {t: {b: {k: eval_matrix({s: st[t] for s, st in seeds.items()}, k, ids[b]) for k in keys}
                           for b in benches} for t in steps})
        for name, seeds in runs.items()
    }  # fmt: skip
    base_path = root / "base" / "samples.jsonl"
    base = {k: v for k, v in read_samples(base_path).items() if k in shared} if base_path.exists() else {}
    last, reps = steps[-1], args.boot
    md = [
        f"## The evaluation sets over {last} steps\n\nEach run evaluated during training at steps "
        f"{', '.join(map(str, steps))} (step 0: the organism, base/). Shares of responses that "
        + "; ".join(f"{k}: {v}" for k, v in MECHANISM.items())
        + "; uncaught: that leave a wrong result standing (`epistemic.check_outcomes`)."
        + (f" Left out, not yet evaluated at every step: {', '.join(unfinished)}." if unfinished else "")
        + "\n"
    ]
    drawn = set()  # one figure a comparison (--groups), as the training plots; the first is the headline
    for spec in args.groups:
        title, _, names = spec.partition("=")
        group = {n: curves[n] for n in names.split(",") if n in curves}
        if not group or set(group) <= drawn:
            continue
        slug = "".join(c if c.isalnum() else "_" for c in title.lower()).strip("_")[:40]
        png = f"sets_{slug}.png" if drawn else "three_sets_over_steps.png"
        drawn |= set(group)
        if plot_sets(group, base, benches, out / png, reps):
            md.append(f"![{title}: accuracy, length and E(y) per evaluation set against step]({png})\n")

    def cell(key, a, b=None):
        return ci(bootstrap(a, b, reps=reps), {"length": ".1f", "epistemic": ".2f"}.get(key, ".3f"), b is not None)

    cols = (*(f"acc step {t}" for t in steps), *(f"{k} (step {last})" for k in keys[1:]))
    for b in benches:
        table, diffs = [], []
        for name, (_, mats) in curves.items():
            row = [cell("acc", mats[t][b]["acc"]) for t in steps] + [cell(k, mats[last][b][k]) for k in keys[1:]]
            table.append((name, len(runs[name]), *row))
            if name != args.baseline and args.baseline in curves:
                bm = curves[args.baseline][1]
                row = [cell("acc", mats[t][b]["acc"], bm[t][b]["acc"]) for t in steps]
                diffs.append((name, *row, *(cell(k, mats[last][b][k], bm[last][b][k]) for k in keys[1:])))
        at0 = [k for k in base if k[0] == b]
        before = ", ".join(f"{k} {cell(k, [[base[i][k] for i in at0]])}" for k in keys) if at0 else "not evaluated"
        md.append(
            f"### {b}\n\n{len(ids[b])} problems x {first_n(runs, last, ids[b][0])} sample(s) per seed. Before "
            f"training (the organism): {before}.\n\n"
            + epistemic.format_table(table, ("run", "seeds", *cols))
            + (f"\n\nMinus {args.baseline}:\n\n" + epistemic.format_table(diffs, ("run", *cols)) if diffs else "")
            + "\n"
        )
    return md


def first_n(runs: dict, step: int, key) -> int:
    """Samples per problem of one evaluation (the first run's first seed)."""
    return next(iter(next(iter(runs.values())).values()))[step][key]["n"]


def report(args: ReportArgs) -> str:
    """REPORT.md (+ PNGs) from the reproduction's outputs, every figure with its 95% bootstrap interval. Returns
    the markdown."""
    root, out = Path(args.runs), Path(args.out)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (run the README's reproduction block first)")
    out.mkdir(parents=True, exist_ok=True)
    md = [
        f"# CPU-scale reproduction report\n\nFrom `{root}` (the README's reproduction block). Every interval is a "
        f"95% percentile bootstrap ({args.boot} replicates) over seeds and problems; * marks a difference whose "
        f"interval excludes 0.\n"
    ]
    if (root / "organism" / "samples.jsonl").exists():
        md.append(
            "## The organism (warm start), strict reward\n\n"
            + _problem_table(read_samples(root / "organism" / "samples.jsonl"), args.boot)
        )
    base = None
    if (root / "base" / "samples.jsonl").exists():
        base_samples = read_samples(root / "base" / "samples.jsonl")
        base = dict(acc=sum(v["acc"] for v in base_samples.values()) / len(base_samples))
        md.append(
            "## Before training: the organism at the evaluation sampling\n\n" + _problem_table(base_samples, args.boot)
        )
    if (root / "table1" / "table.md").exists():
        md.append("## Table 1: conditioning settings\n\n" + (root / "table1" / "table.md").read_text())
    table2 = _table2(root, args.boot)
    if table2:
        md.append(table2)
    sweep = []
    for path in sorted(root.glob("sweep/*/seed*/metrics.jsonl")):
        rows = read_metrics(path)[-args.last :]
        if not rows:
            continue
        sweep.append(
            (path.parent.parent.name, f"{rows[-1]['lr']:g}")
            + tuple(f"{sum(r[k] for r in rows) / len(rows):.3f}" for k in ("score", "length", "epistemic"))
        )
    if sweep:
        md.append(
            f"## Learning-rate sweep (one seed; the mean over the last {args.last} steps)\n\n"
            + epistemic.format_table(sweep, ("run", "lr", "training score", "length", "E(y)"))
            + "\n"
        )
    md += _set_sections(root, args, out)
    md += _run_sections(root, args, base, out)
    text = "\n".join(md)
    (out / "REPORT.md").write_text(text)
    print(f"wrote {out / 'REPORT.md'}")
    return text


def main(argv=None):
    rollout.run_main(
        lambda: report(data.parse_args(ReportArgs, sys.argv[1:] if argv is None else argv, positional="runs"))
    )


if __name__ == "__main__":
    rollout.run_script(main)

"""evaluate.py -- acc@n, pass@k, response length and epistemic markers on benchmarks.

Implements, for arXiv 2603.24472:
  - Acc@16 (the mean correctness over 16 samples per problem; Figs. 3-8, 14) -> `summarize`
  - pass@k (App. F.4, Fig. 19) with the unbiased estimator 1 - C(n-c, k) / C(n, k) -> `pass_at_k`
  - per benchmark: acc, pass@k, mean response length, mean epistemic count E(y) (Figs. 3d, 4d,
    11), fraction truncated
  - App. D, Table 11, the evaluation settings (max tokens / temperature / top-p / top-k):
        DeepSeek-R1-Distill-Qwen-7B  38912  0.6  0.95  20
        Qwen3-8B (thinking)          38912  0.6  0.95  20   --thinking on
        Qwen3-8B (non-thinking)      38912  0.7  0.8   20   --thinking off
        OLMo-3-7B-Instruct           38912  0.6  0.95  20
  - `evaluate(...)`, the function the trainers call every --eval-every steps.
  - `python evaluate.py report runs/cpu --out report`: the README's CPU reproduction as REPORT.md with
    PNG plots (matplotlib, an optional extra) -> `report`

Departures from the released evaluation code, and why:
  1. The released eval passes top_k=20 on its command line but never hands it to the sampler;
     here --top-k reaches the sampler (hf and vllm backends alike).
  2. The released pass@k is "any of the 16 samples correct" (pass@n only); here pass@k is the
     unbiased estimator for every k <= n, which equals "any correct" at k = n.
  3. A killed evaluation resumes: samples.jsonl is appended problem by problem and a re-run with
     the same --out skips finished problems (their samples are kept, not redrawn).

Run it:
    python evaluate.py                                                    # embedded model, OOD synthetic types
    python evaluate.py --data ../shared/data/amc23.parquet --n-samples 4 --k 1 4 --max-new-tokens 512
    python evaluate.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --backend vllm \\
        --data aime24.parquet amc23.parquet --n-samples 16 --k 1 16 --temperature 0.6 --top-p 0.95 --top-k 20 \\
        --max-new-tokens 38912 --out runs/eval-r1
    torchrun --nproc_per_node 8 evaluate.py ...        # problems split across ranks, gathered on rank 0
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

import data
import epistemic
import rollout


@dataclass
class Args:
    CHECKS: ClassVar[dict] = dict(
        n_samples=data.POSITIVE, k=data.POSITIVE, temperature=data.NON_NEGATIVE, top_p=data.FRACTION,
        top_k=data.NON_NEGATIVE, max_new_tokens=data.POSITIVE, limit=data.POSITIVE, backend=data.BACKENDS,
        batch_size=data.POSITIVE, chunk=data.POSITIVE, thinking=data.THINKING, dtype=data.DTYPES)
    model: str = rollout.EMBEDDED
    """Hugging Face id or directory, or 'smollm2-135m' (embedded)"""
    data: list[str] = field(default_factory=lambda: ["synthetic:split=ood,difficulty=1,n=16"])
    """benchmarks: .parquet/.jsonl/.json paths or embedded sources; the default is the held-out OOD synthetic types"""
    n_samples: int = 4
    """samples per problem (paper: 16). Under torchrun spell it out: torchrun rejects --n"""
    k: list[int] = field(default_factory=lambda: [1, 4])
    """pass@k values to report, each <= n (paper: 1 and 16)"""
    temperature: float = 0.6
    """sampling temperature (Table 11: 0.6; Qwen3 non-thinking 0.7)"""
    top_p: float = 0.95
    """nucleus sampling (Table 11: 0.95; Qwen3 non-thinking 0.8)"""
    top_k: int = 20
    """top-k sampling, 0 = off (Table 11: 20, applied here for real)"""
    max_new_tokens: int = 256
    """response budget (Table 11: 38912)"""
    limit: int | None = None
    """first `limit` problems of each benchmark"""
    backend: str = "hf"
    """hf (transformers, CPU/GPU) or vllm (GPU)"""
    batch_size: int = 64
    """hf backend: sequences decoded together"""
    chunk: int = 8
    """problems generated together per rank before their samples are appended to samples.jsonl"""
    thinking: str = "auto"
    """Qwen3-style chat templates: on | off | auto"""
    system: str | None = None
    """system prompt (OLMo-3 style); None = the template's default"""
    dtype: str = "auto"
    """float32 | bfloat16 | auto (bf16 on GPU, fp32 on CPU)"""
    seed: int = 0
    """sampling seed"""
    lenient: bool = False
    """grade the last number when a response has no \\boxed{} (for the embedded model; not the paper's reward)"""
    out: str = "runs/eval"
    """output directory: samples.jsonl (one line per problem), summary.json, summary.md"""


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n (got n={n}, c={c})")
    if k > n or k < 1:
        raise ValueError(f"pass@k needs 1 <= k <= n (got n={n}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))  # = C(n-c, k) / C(n, k), stably


def summarize(records: list[dict], ks: list[int]) -> dict:
    """One benchmark's figures from per-problem records (scores, lengths, epistemic, finish_reasons)."""
    samples = [i for r in records for i in range(len(r["scores"]))]
    if not records:
        return dict(problems=0, samples=0)
    flat = lambda key: [x for r in records for x in r[key]]
    out = dict(problems=len(records), samples=len(samples),
               acc=sum(flat("scores")) / len(samples),  # acc@n: mean correctness over all n samples
               length=sum(flat("lengths")) / len(samples),
               epistemic=sum(flat("epistemic")) / len(samples),
               truncated=sum(f == "length" for f in flat("finish_reasons")) / len(samples))
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(len(r["scores"]), int(sum(r["scores"])), k) for r in records) / len(records)
    return out


def format_summary(summary: dict, ks: list[int]) -> str:
    cols = ["acc", *(f"pass@{k}" for k in ks), "length", "epistemic", "truncated"]
    rows = [(name, s["problems"], *(f"{s[c]:.3f}" if c not in ("length", "epistemic") else f"{s[c]:.1f}" for c in cols))
            for name, s in summary.items() if s.get("samples")]
    return epistemic.format_table(rows, ("benchmark", "problems", *cols))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def answer_part(response: str) -> str:
    """What is graded: with a <think>...</think> pair in the response, the text after the first one (stripped);
    otherwise all of it. As the reference's eval/eval.py, which does so with --enable_thinking; R1-Distill's
    responses, whose template opens the tag, carry no pair and are graded whole there and here."""
    pair = re.search(r"<think>(.*?)</think>", response, flags=re.S)
    return response[pair.end():].strip() if pair else response


def score_problems(backend, problems: list[dict], params: rollout.SamplingParams, chat: dict,
                   progress: bool = True, lenient: bool = False, indices: list[int] | None = None) -> list[dict]:
    """Generate params.n samples per problem and grade them: one record per problem. `indices`: the problems'
    numbers, their seeds (`rollout.generate`)."""
    prompts = [rollout.chat_prompt(backend.tokenizer, data.format_prompt(p["question"]), **chat) for p in problems]
    samples = rollout.generate(backend, prompts, params, progress=progress, indices=indices)
    records = [dict(id=p["id"], question=p["question"], answer=p["answer"], responses=[], scores=[], lengths=[],
                    epistemic=[], finish_reasons=[]) for p in problems]
    for s in tqdm(samples, desc="grade", disable=not progress, leave=False):
        r = records[s.prompt_index]
        r["responses"].append(s.text)
        r["scores"].append(data.grade(answer_part(s.text), r["answer"], lenient=lenient))
        r["lengths"].append(len(s.response_ids))
        r["epistemic"].append(epistemic.epistemic_count(s.text))
        r["finish_reasons"].append(s.finish_reason)
    return records


def evaluate(backend, benchmarks: dict[str, list[dict]], params: rollout.SamplingParams, ks=(1,),
             chat: dict | None = None, progress: bool = False, lenient: bool = False) -> dict:
    """Periodic evaluation for the trainers: {benchmark: summary}, the same on every rank.

    Problems are split across ranks; records are gathered on rank 0, summarised there and broadcast."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    chat = chat or {}
    summary = {}
    for name, problems in benchmarks.items():  # each problem seeded by its place: the same samples on any world size
        indices = rollout.shard(list(range(len(problems))), rank, world)
        mine = score_problems(backend, [problems[i] for i in indices], params, chat, progress, lenient, indices)
        allr = rollout.gather_to_rank0(mine, world)
        summary[name] = summarize(allr, list(ks)) if rank == 0 else None
    if world > 1:
        box = [summary]
        dist.broadcast_object_list(box, src=0)  # collective: every rank gets rank 0's summary
        summary = box[0]
    return summary


def benchmark_name(source: str) -> str:
    return Path(source).stem if os.path.splitext(source)[1] else source


def read_done(path: Path) -> dict:
    """Finished problems of an earlier run, keyed (benchmark, id). A torn last line (killed mid-write) is cut off."""
    done, good_bytes = {}, 0
    if not path.exists():
        return done
    with open(path, "rb") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                break
            done[(r["benchmark"], r["id"])] = r
            good_bytes += len(line)
    with open(path, "r+b") as f:
        f.truncate(good_bytes)
    return done


def check_args(args: Args):
    data.check_args(args)
    bad = [k for k in args.k if k > args.n_samples]
    if bad:
        raise ValueError(f"--k {bad}: pass@k needs 1 <= k <= n, and --n-samples is {args.n_samples}")


def main(args: Args) -> dict:
    check_args(args)
    rank, _, world, device = rollout.init_distributed()
    benchmarks = {benchmark_name(s): data.load_problems(s, limit=args.limit, seed=args.seed) for s in args.data}
    out = Path(args.out)
    config = dict(model=args.model, n=args.n_samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  max_new_tokens=args.max_new_tokens, thinking=args.thinking, system=args.system, seed=args.seed,
                  lenient=args.lenient)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "config.json").exists() and json.loads((out / "config.json").read_text()) != config:
            raise ValueError(f"{out} holds samples of another configuration ({out / 'config.json'}); use a new --out")
        (out / "config.json").write_text(json.dumps(config, indent=1))
    if world > 1:
        dist.barrier()  # rank 0 has checked and truncated the output before anyone reads it
    done = read_done(out / "samples.jsonl") if rank == 0 else {}
    if world > 1:
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    pending = [(name, p) for name, ps in benchmarks.items() for p in ps if (name, p["id"]) not in done]
    rollout.print0(f"{sum(map(len, benchmarks.values()))} problems, {len(done)} already done, {len(pending)} to go")
    chat = dict(system=args.system, thinking=args.thinking)
    max_len = 0
    if args.backend == "vllm":  # sized from the longest prompt: vLLM cuts longer requests silently
        tok = rollout.load_tokenizer(args.model)
        max_len = rollout.engine_length(tok, [rollout.chat_prompt(tok, data.format_prompt(p["question"]), **chat)
                                              for _, p in pending], args.max_new_tokens, args.model)
    backend = rollout.make_backend(args.backend, args.model, device, args.dtype, args.batch_size, max_model_len=max_len,
                                   seed=args.seed + rank)
    step = args.chunk * world
    bar = tqdm(total=len(pending), desc="problems", disable=rank != 0)
    for i, start in enumerate(range(0, len(pending), step)):
        mine = rollout.shard(pending[start:start + step], rank, world)
        params = rollout.SamplingParams(n=args.n_samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                        max_new_tokens=args.max_new_tokens, seed=args.seed + 1000003 * i + rank)
        records = score_problems(backend, [p for _, p in mine], params, chat, rank == 0, args.lenient) if mine else []
        for (name, _), r in zip(mine, records):
            r["benchmark"] = name
        gathered = rollout.gather_to_rank0(records, world)
        if rank == 0:
            with open(out / "samples.jsonl", "a") as f:  # problem by problem: a kill loses at most this chunk
                for r in gathered:
                    f.write(json.dumps(r) + "\n")
                    done[(r["benchmark"], r["id"])] = r
            bar.update(len(gathered))
    bar.close()
    if rank != 0:
        return {}
    summary = {name: summarize([done[(name, p["id"])] for p in ps], args.k) for name, ps in benchmarks.items()}
    table = format_summary(summary, args.k)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'samples.jsonl'}, {out / 'summary.json'}, {out / 'summary.md'}")
    return summary



# --------------------------------------------------------------------------------------------
# The reproduction report (README, "Reproduction on CPU")
# --------------------------------------------------------------------------------------------
@dataclass
class ReportArgs:
    runs: str = "runs/cpu"
    """the directory of the README's reproduction block: base/, table1/, sft/, NAME/seedK/ training runs"""
    out: str = "report"
    """where REPORT.md and the PNG plots go"""
    groups: list[str] = field(default_factory=lambda: [
        "GRPO vs SDPO (Fig. 3-5)=grpo,sdpo,sdpo_nothink", "Fixed vs EMA teacher (Fig. 6)=sdpo,sdpo_ema",
        "Task coverage |D| (Fig. 7/8)=grpo_d1,grpo,sdpo_d1,sdpo",
        "Remedies (beyond the paper)=grpo,sdpo,sdpo_protect,sdpo_pg,sdpo_entw"])
    """comparisons, each 'title=run,run,...'; runs that are absent are left out"""


def read_metrics(path: Path) -> list[dict]:
    """The per-step rows of a metrics.jsonl, one per step (a resumed run's repeated steps: the last wins)."""
    rows = {}
    for i, line in enumerate(open(path, encoding="utf-8")):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: row {i}: not valid JSON ({e})") from None
        if "step" in row:
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def mean_spread(xs: list[float], fmt: str = ".3f") -> str:
    """'m' for one value, 'm +- sd' (sample std) over seeds, '-' for none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:{fmt}}"
    return f"{m:{fmt}} +- {math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)):{fmt}}"


def final_eval(rows: list[dict], key: str) -> float | None:
    """eval/<benchmark>/<key> of the last evaluated step (the first benchmark)."""
    for row in reversed(rows):
        for k, v in row.items():
            if k.startswith("eval/") and k.endswith("/" + key):
                return v
    return None


def plot_group(title: str, runs: dict, base: dict | None, path: Path) -> bool:
    """Score, length, E(y) over steps (mean over seeds, min-max band) and the final OOD accuracy. False
    when matplotlib is missing (an optional extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for name, seeds in runs.items():
        for ax, key in zip(axes[:3], ("score", "length", "epistemic")):
            steps = sorted({r["step"] for rows in seeds.values() for r in rows})
            ys = [[r[key] for rows in seeds.values() for r in rows if r["step"] == t] for t in steps]
            ax.plot(steps, [sum(y) / len(y) for y in ys], marker="o", label=name)
            if len(seeds) > 1:
                ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2)
            ax.set_xlabel("step")
            ax.set_title({"score": "training score", "length": "response length (tokens)",
                          "epistemic": "epistemic count E(y)"}[key])
    names = list(runs)
    accs = [[final_eval(rows, "acc") for rows in runs[n].values()] for n in names]
    accs = [[a for a in acc if a is not None] for acc in accs]
    axes[3].bar(names, [sum(a) / len(a) if a else 0 for a in accs], color=[f"C{i}" for i in range(len(names))])
    for i, a in enumerate(accs):
        axes[3].scatter([i] * len(a), a, color="k", s=10, zorder=3)
    if base:
        axes[3].axhline(base["acc"], color="gray", linestyle="--", label="base model")
        axes[3].legend(fontsize=8)
    axes[3].set_title("OOD accuracy (held-out types)")
    axes[3].tick_params(axis="x", rotation=30)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def report(args: ReportArgs) -> str:
    """REPORT.md (+ PNGs) from the reproduction's outputs. Returns the markdown."""
    root, out = Path(args.runs), Path(args.out)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (run the README's reproduction block first)")
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# CPU-scale reproduction report\n\nFrom `{root}` (the README's reproduction block).\n"]
    base = None
    if (root / "base" / "summary.json").exists():
        base = next(iter(json.loads((root / "base" / "summary.json").read_text()).values()))
        md.append("## The base model on the held-out OOD types\n\n" + epistemic.format_table(
            [("base", f"{base['acc']:.3f}", f"{base['length']:.1f}", f"{base['epistemic']:.2f}")],
            ("model", "OOD acc", "length", "E(y)")) + "\n")
    if (root / "table1" / "table.md").exists():
        md.append("## Table 1: conditioning settings\n\n" + (root / "table1" / "table.md").read_text())
    sft_rows = []
    for setting, name in (("unguided", "D_ug"), ("solution", "D_sg")):
        d, ev = root / "sft" / f"d_{setting}.jsonl", root / "sft" / setting / "eval" / "summary.json"
        if not (d.exists() and ev.exists()):
            continue
        rows = [json.loads(line) for line in open(d, encoding="utf-8") if line.strip()]
        s = next(iter(json.loads(ev.read_text()).values()))
        mean = lambda key: sum(r[key] for r in rows) / max(len(rows), 1)
        sft_rows.append((f"SFT on {name}", len(rows), f"{mean('length'):.1f}", f"{mean('epistemic'):.2f}",
                         f"{s['acc']:.3f}", f"{s['length']:.1f}", f"{s['epistemic']:.2f}"))
    if sft_rows:
        md.append("## Table 2: SFT on D_ug vs D_sg\n\n" + epistemic.format_table(
            sft_rows, ("model", "train rows", "train length", "train E(y)", "OOD acc", "OOD length", "OOD E(y)")) + "\n")
    runs = {}
    for path in sorted(root.glob("*/seed*/metrics.jsonl")):
        rows = read_metrics(path)
        if rows and "score" in rows[0]:
            runs.setdefault(path.parent.parent.name, {})[path.parent.name] = rows
    if runs:
        table = []
        for name, seeds in runs.items():
            col = lambda f, fmt=".3f": mean_spread([f(rows) for rows in seeds.values()], fmt)
            table.append((name, len(seeds), col(lambda r: r[0]["score"]), col(lambda r: r[-1]["score"]),
                          col(lambda r: sum(x["score"] for x in r) / len(r)),
                          col(lambda r: r[0]["length"], ".1f"), col(lambda r: r[-1]["length"], ".1f"),
                          col(lambda r: r[0]["epistemic"], ".2f"), col(lambda r: r[-1]["epistemic"], ".2f"),
                          col(lambda r: final_eval(r, "acc")), col(lambda r: final_eval(r, "length"), ".1f"),
                          col(lambda r: final_eval(r, "epistemic"), ".2f")))
        md.append("## Training runs (first step -> last step; OOD after the last step)\n\n" + epistemic.format_table(
            table, ("run", "seeds", "score 1st", "score last", "score mean", "length 1st", "length last", "E(y) 1st", "E(y) last",
                    "OOD acc", "OOD length", "OOD E(y)")) + "\n")
        md.append("Values are means over seeds, +- the sample standard deviation when there are several.\n")
    for spec in args.groups:
        title, _, names = spec.partition("=")
        group = {n: runs[n] for n in names.split(",") if n in runs}
        if not group:
            continue
        png = "".join(c if c.isalnum() else "_" for c in title.lower()).strip("_")[:40] + ".png"
        md.append(f"## {title}\n")
        if plot_group(title, group, base, out / png):
            md.append(f"![{title}]({png})\n")
    if runs:
        per_step = [(n, k, r["step"], f"{r['score']:.3f}", f"{r['length']:.1f}", f"{r['epistemic']:.2f}")
                    for n, seeds in runs.items() for k, rows in seeds.items() for r in rows]
        md.append("## Per step\n\n" + epistemic.format_table(per_step, ("run", "seed", "step", "score", "length",
                                                                           "E(y)")) + "\n")
    text = "\n".join(md)
    (out / "REPORT.md").write_text(text)
    print(f"wrote {out / 'REPORT.md'}")
    return text


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["report"]:
            report(data.parse_args(ReportArgs, sys.argv[2:], positional=("runs",)))
        else:
            main(data.parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

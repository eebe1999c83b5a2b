"""evaluate.py -- acc@n, pass@k, length and epistemic markers on benchmarks; Sec. 3, Table 1, Table 2's sets.

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
  - `evaluate(...)`, the function the trainers call every --eval-every steps (their OUT/eval_samples.jsonl).
  - Sec. 3 and Table 1, as the released analysis scripts run them (beanie00/self-distillation-analysis,
    analyzing_reasoning_behavior/): `evaluate.py select` samples 8 responses per DAPO problem at 0.6 / 0.95 /
    top-k 20 and keeps the first 100 problems (file order) with 1-4 correct, each one's first correct response as s
    (eval_dapo_dataset.py) -> `select`; `evaluate.py table1` reads that file and reports avg score, length and
    E(y) per conditioning setting: c = s with the hint `{prompt}\\n\\nCorrect solution: {s}\\n\\nCorrectly solve
    the original question.` (eval_with_hint.py build_augmented_prompt), and y_r, the first correct response under
    c = s, or else the first (its second round's best_response) -> `table1`, `context_for`.
  - Sec. 4, Table 2's sets, as the released make_sft_dataset.py: per selected problem, D_ug its s and D_sg its first
    correct response under c = s (Table 1's hint), for `sft.py --data` -> `build`.

Copying: needs data.py, rollout.py and epistemic.py beside it (vllm for --backend vllm).

Departures from the released evaluation code, and why:
  1. The released eval passes top_k=20 on its command line but never hands it to the sampler;
     here --top-k reaches the sampler (hf and vllm backends alike).
  2. The released pass@k is "any of the 16 samples correct" (pass@n only); here pass@k is the
     unbiased estimator for every k <= n, which equals "any correct" at k = n.
  3. A killed evaluation resumes: samples.jsonl is appended problem by problem and a re-run with
     the same --out skips finished problems (their samples are kept, not redrawn).
  4. Table 1's setting (3), c = s\\think, and App. C's row have no released script: they use the same hint on
     strip_think(s) and App. C's prompt on s. SDPO's teacher uses SDPO's own template (`reprompt`'s "sdpo").
  5. `table1 --solution-source rollout` takes s from this run's unguided samples instead (problems without a
     correct one are left out of settings (2)-(5) and counted); `dataset` (the default) reads the file's
     `solution`, which is the selection's s.

Run it:
    python evaluate.py                                                    # embedded model, OOD synthetic types
    python evaluate.py --data benchmarks/amc23.parquet --n-samples 4 --k 1 4 --max-new-tokens 512
    python evaluate.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --backend vllm \\
        --data aime24.parquet amc23.parquet --n-samples 16 --k 1 16 --temperature 0.6 --top-p 0.95 --top-k 20 \\
        --max-new-tokens 38912 --out runs/eval-r1
    torchrun --nproc_per_node 8 evaluate.py ...        # problems split across ranks, gathered on rank 0
    python evaluate.py select --data synthetic:difficulty=1,n=64 --lenient --keep 16 --max-new-tokens 192
    python evaluate.py table1 --data runs/select/selected.jsonl --setting all --n-samples 4 --lenient
    torchrun --nproc_per_node 8 evaluate.py select --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --backend vllm \\
        --data dapo-math-17k.parquet --max-new-tokens 32768 --out runs/select-r1       # Sec. 3's 100 problems
    torchrun --nproc_per_node 8 evaluate.py table1 --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --backend vllm \\
        --data runs/select-r1/selected.jsonl --setting all --n-samples 8 --max-new-tokens 32768   # Table 1
    python evaluate.py build --setting solution --data runs/select/selected.jsonl --lenient --out runs/d_sg.jsonl
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm
from transformers.hf_argparser import HfArg

import data
import epistemic
import rollout


@dataclass
class Args(rollout.SamplingArgs):
    data: list[str] = HfArg(
        default_factory=lambda: ["synthetic:split=ood,difficulty=1,n=16"],
        help="benchmarks: .parquet/.jsonl/.json paths or embedded sources; the default is the held-out OOD synthetic "
        "types",
    )
    k: list[int] = HfArg(default_factory=lambda: [1, 4], help="pass@k values to report, each <= n (paper: 1 and 16)")
    limit: int | None = HfArg(default=None, help="first `limit` problems of each benchmark")
    chunk: int = HfArg(
        default=8, help="problems generated together per rank before their samples are appended to samples.jsonl"
    )
    out: str = HfArg(
        default="runs/eval", help="output directory: samples.jsonl (one line per problem), summary.json, summary.md"
    )

    def __post_init__(self):
        super().__post_init__()
        data.check(self, "k limit chunk", *data.POSITIVE)
        if any(k > self.n_samples for k in self.k):
            raise ValueError(f"--k {self.k}: pass@k needs 1 <= k <= n, and --n-samples is {self.n_samples}")


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

    def flat(key):
        return [x for r in records for x in r[key]]

    out = dict(
        problems=len(records),
        samples=len(samples),
        acc=sum(flat("scores")) / len(samples),  # acc@n: mean correctness over all n samples
        length=sum(flat("lengths")) / len(samples),
        epistemic=sum(flat("epistemic")) / len(samples),
        truncated=sum(f == "length" for f in flat("finish_reasons")) / len(samples),
    )
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(len(r["scores"]), int(sum(r["scores"])), k) for r in records) / len(records)
    return out


def format_summary(summary: dict, ks: list[int]) -> str:
    cols = ["acc", *(f"pass@{k}" for k in ks), "length", "epistemic", "truncated"]
    rows = [
        (name, s["problems"], *(f"{s[c]:.3f}" if c not in ("length", "epistemic") else f"{s[c]:.1f}" for c in cols))
        for name, s in summary.items()
        if s.get("samples")
    ]
    return epistemic.format_table(rows, ("benchmark", "problems", *cols))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def score_problems(
    backend,
    problems: list[dict],
    params: rollout.SamplingParams,
    chat: dict,
    progress: bool = True,
    lenient: bool = False,
    indices: list[int] | None = None,
) -> list[dict]:
    """Generate params.n samples per problem and grade them: one record per problem. `indices`: the problems'
    numbers, their seeds (`rollout.generate`). No log-probs are asked of vLLM: grading needs none."""
    params = replace(params, logprobs=False)
    prompts = [rollout.chat_prompt(backend.tokenizer, data.format_prompt(p["question"]), **chat) for p in problems]
    samples = rollout.generate(backend, prompts, params, progress=progress, indices=indices)
    lists = ("responses", "scores", "lengths", "epistemic", "finish_reasons")
    records = [
        dict(id=p["id"], question=p["question"], answer=p["answer"], **{k: [] for k in lists}) for p in problems
    ]
    for s in tqdm(samples, desc="grade", disable=not progress, leave=False):
        r = records[s.prompt_index]
        r["responses"].append(s.text)
        r["scores"].append(data.grade(data.answer_part(s.text), r["answer"], lenient=lenient))
        r["lengths"].append(len(s.response_ids))
        r["epistemic"].append(epistemic.epistemic_count(s.text))
        r["finish_reasons"].append(s.finish_reason)
    return records


def evaluate(
    backend,
    benchmarks: dict[str, list[dict]],
    params: rollout.SamplingParams,
    ks=(1,),
    chat: dict | None = None,
    progress: bool = False,
    lenient: bool = False,
    records_to: Path | None = None,
    step: int = 0,
) -> dict:
    """Periodic evaluation for the trainers: {benchmark: summary}, the same on every rank.

    Problems are split across ranks; records are gathered on rank 0, summarised there and broadcast. With
    `records_to`, rank 0 appends each problem's record (its responses, scores, `benchmark` and `step`) to that file."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    chat = chat or {}
    # one generate call for every benchmark (vLLM schedules them together, not one long tail after another); each
    # problem numbered across the benchmarks: its seed, the same samples on any world size
    flat = [(name, p) for name, problems in benchmarks.items() for p in problems]
    indices = rollout.shard(list(range(len(flat))), rank, world)
    mine = score_problems(backend, [flat[i][1] for i in indices], params, chat, progress, lenient, indices)
    for i, r in zip(indices, mine):
        r["benchmark"] = flat[i][0]
    every = rollout.gather_to_rank0(mine, world)
    summary = None
    if rank == 0:
        summary = {name: summarize([r for r in every if r["benchmark"] == name], list(ks)) for name in benchmarks}
        if records_to is not None:
            with open(records_to, "a") as f:
                f.writelines(json.dumps(dict(r, step=step)) + "\n" for r in every)
    if world > 1:
        box = [summary]
        dist.broadcast_object_list(box, src=0)  # collective: every rank gets rank 0's summary
        summary = box[0]
    return summary


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


def evaluate_model(args: Args) -> dict:
    """`evaluate.py`'s job: every benchmark of --data, resumable, written to --out."""
    rank, _, world, device = rollout.init_distributed()
    benchmarks = {data.benchmark_name(s): data.load_problems(s, limit=args.limit, seed=args.seed) for s in args.data}
    out = Path(args.out)
    config = dict(
        model=args.model,
        n=args.n_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        thinking=args.thinking,
        system=args.system,
        seed=args.seed,
        lenient=args.lenient,
    )
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
    max_len = settings_engine_length(args, [p for _, p in pending], ["unguided"], "dataset")  # vLLM: longest prompt
    backend = rollout.backend_from_args(args, device, max_len, seed=args.seed + rank)
    step = args.chunk * world
    bar = tqdm(total=len(pending), desc="problems", disable=rank != 0)
    for i, start in enumerate(range(0, len(pending), step)):
        mine = rollout.shard(pending[start : start + step], rank, world)
        params = args.sampling_params(seed=args.seed + 1000003 * i + rank)
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
# Sec. 3's problems (`select`), Table 1's conditioning settings (`table1`), Table 2's sets (`build`)
# --------------------------------------------------------------------------------------------
SETTINGS = ("unguided", "solution", "solution-no-think", "regenerated", "uncertainty")


@dataclass
class Table1Args(rollout.SamplingArgs):
    data: str = HfArg(
        default="synthetic:difficulty=1,n=16",
        help="problems: a .parquet/.jsonl/.json path or an embedded source (see data.py)",
    )
    setting: str = HfArg(
        default="all",
        help="unguided | solution | solution-no-think | regenerated | uncertainty | all (Table 1 + App. C)",
    )
    solution_source: str = HfArg(
        default="dataset",
        help="where s comes from: 'dataset' (the problems' `solution`: for the paper's pipeline the selection's "
        "first correct response, `evaluate.py select`) or 'rollout' (this run's first correct unguided response; "
        "problems without one are left out of settings (2)-(5))",
    )
    limit: int | None = HfArg(default=None, help="use only the first `limit` problems")
    out: str = HfArg(default="runs/table1", help="output directory: samples.jsonl and table.md")

    def __post_init__(self):
        super().__post_init__()
        data.check(self, "limit", *data.POSITIVE)
        data.choose(self, "setting", (*SETTINGS, "all"))
        data.choose(self, "solution_source", ("rollout", "dataset"))


@dataclass
class SelectArgs(Table1Args):
    """`evaluate.py select`: Sec. 3's problems, as the released eval_dapo_dataset.py picks them."""

    data: str = HfArg(
        default="synthetic:difficulty=1,n=64", help="the pool, read in file order (the paper: DAPO-Math-17k)"
    )
    n_samples: int = HfArg(default=8, help="samples per problem (the paper: 8)")
    min_correct: int = HfArg(default=1, help="keep a problem with at least this many correct samples (the paper: 1)")
    max_correct: int = HfArg(default=4, help="and at most this many (the paper: 4, so accuracy in [0.125, 0.5])")
    keep: int = HfArg(default=100, help="stop once this many are kept: the first in file order (the paper: 100)")
    chunk: int = HfArg(
        default=64, help="problems generated together (over all ranks) before checking whether enough are kept"
    )
    out: str = HfArg(
        default="runs/select",
        help="output directory: selected.jsonl (question, answer, solution = the first correct sample) and "
        "samples.jsonl",
    )

    def __post_init__(self):
        super().__post_init__()
        data.check(self, "min_correct max_correct", *data.NON_NEGATIVE)
        data.check(self, "keep chunk", *data.POSITIVE)


def setting_summary(records: list[dict]) -> dict:
    """Table 1's columns over a list of per-sample records: avg score, length (tokens), epistemic count."""
    n = max(len(records), 1)
    return dict(
        samples=len(records),
        score=sum(r["score"] for r in records) / n,
        length=sum(r["length"] for r in records) / n,
        epistemic=sum(r["epistemic"] for r in records) / n,
    )


SETTING_NAMES = {
    "unguided": "(1) Unguided",
    "solution": "(2) Solution-Guided (c = s)",
    "solution-no-think": "(3) Solution-Guided (c = s\\think)",
    "regenerated": "(4) Regeneration-Conditioned",
    "uncertainty": "App. C: Solution-Guided (w/ encouraged uncertainty)",
}


def context_for(setting: str, question: str, s: str | None) -> str:
    """The user turn of each setting; s is the solution (y_r for "regenerated"), unused when unguided.
    Settings (2)-(4) use the released analysis script's hint (`rollout.reprompt(..., template="hint")`)."""
    if setting == "unguided":
        return rollout.unguided_prompt(question)
    if setting == "solution-no-think":
        return rollout.reprompt(question, rollout.strip_think(s), template="hint")
    if setting == "uncertainty":
        return rollout.reprompt(question, s, template="uncertainty")
    return rollout.reprompt(question, s, template="hint")  # "solution" (c = s) and "regenerated" (c = y_r)


def settings_engine_length(args, problems: list[dict], settings: list[str], solution_source: str) -> int:
    """`rollout.engine_length` under vLLM, else 0: every setting's prompt for every problem (Table 1, `select`,
    `build`, and the benchmarks' unguided prompts). Where s is drawn from the model (a rollout, or y_r), it is
    not known yet: room for one more response of max_new_tokens is added."""
    if args.backend != "vllm":
        return 0
    tok, chat = rollout.load_tokenizer(args.model), dict(system=args.system, thinking=args.thinking)
    dataset = solution_source == "dataset"
    prompts = [
        rollout.chat_prompt(tok, context_for(s, p["question"], (p.get("solution") or "x") if dataset else "x"), **chat)
        for s in settings
        for p in problems
    ]
    drawn = any(s != "unguided" for s in settings) and (not dataset or "regenerated" in settings)
    n = args.max_new_tokens
    return rollout.engine_length(tok, prompts, n, args.model, extra=n if drawn else 0)


def first_correct(records: list[dict], or_first: bool = False) -> dict[str, str]:
    """problem id -> its first correct response: s (from unguided rollouts) or y_r (from solution-guided ones).
    or_first: a problem with none gets its first response (y_r, as eval_with_hint.py's best_response)."""
    out = {}
    for r in records:
        if r["score"] == 1.0:
            out.setdefault(r["id"], r["response"])
    for r in records if or_first else []:
        out.setdefault(r["id"], r["response"])
    return out


def table1(args: Table1Args) -> dict:
    rank, _, world, device = rollout.init_distributed()
    chosen = list(SETTINGS) if args.setting == "all" else [args.setting]
    problems = rollout.shard(data.load_problems(args.data, limit=args.limit, seed=args.seed), rank, world)
    chat = dict(system=args.system, thinking=args.thinking)
    max_len = settings_engine_length(args, problems, ["unguided", *chosen], args.solution_source)
    backend = rollout.backend_from_args(args, device, max_len, seed=args.seed + rank)
    params = args.sampling_params(seed=args.seed + rank)
    records = {}

    def run(setting: str, given: dict):  # generate and grade one setting; given: problem id -> s (or y_r)
        rollout.print0(SETTING_NAMES[setting])
        todo = [p for p in problems if setting == "unguided" or p["id"] in given]
        contexts = [context_for(setting, p["question"], given.get(p["id"])) for p in todo]
        prompts = [rollout.chat_prompt(backend.tokenizer, c, **chat) for c in contexts]
        records[setting] = [
            dict(
                setting=setting,
                id=todo[s.prompt_index]["id"],
                answer=todo[s.prompt_index]["answer"],
                context=contexts[s.prompt_index],
                response=s.text,
                score=data.grade(s.text, todo[s.prompt_index]["answer"], lenient=args.lenient),
                length=len(s.response_ids),
                epistemic=epistemic.epistemic_count(s.text),
                finish_reason=s.finish_reason,
            )
            for s in rollout.generate(backend, prompts, params)
        ]

    need_s = chosen != ["unguided"]
    if "unguided" in chosen or (need_s and args.solution_source == "rollout"):
        run("unguided", {})
    if args.solution_source == "rollout":
        solution = first_correct(records.get("unguided", []))
    else:
        solution = {p["id"]: p["solution"] for p in problems if p.get("solution")}
    if "solution" in chosen or "regenerated" in chosen:
        run("solution", solution)
    if "solution-no-think" in chosen:
        run("solution-no-think", solution)
    if "regenerated" in chosen:
        run(
            "regenerated", first_correct(records["solution"], or_first=True)
        )  # y_r ~ pi(.|x, s): correct, else the first
    if "uncertainty" in chosen:
        run("uncertainty", solution)
    flat = rollout.gather_to_rank0([r for s in chosen for r in records.get(s, [])], world)
    if rank != 0:
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:
        for r in flat:
            f.write(json.dumps(r) + "\n")
    n_problems = len(data.load_problems(args.data, limit=args.limit, seed=args.seed))
    rows = {s: setting_summary([r for r in flat if r["setting"] == s]) for s in chosen}
    table = epistemic.format_table(
        [
            (
                SETTING_NAMES[s],
                f"{rows[s]['samples'] // max(args.n_samples, 1)}/{n_problems}",
                f"{rows[s]['score']:.2f}",
                f"{rows[s]['length']:.1f}",
                f"{rows[s]['epistemic']:.2f}",
            )
            for s in chosen
        ],
        ("setting", "problems", "Avg. Score", "Avg. Length", "Epistemic Token Count"),
    )
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    rollout.print0(table)
    rollout.print0(f"wrote {out / 'samples.jsonl'} ({len(flat)} samples), {out / 'table.md'}")
    return rows


def select(args: SelectArgs) -> list[dict]:
    """Sample --n-samples responses per problem of --data in file order, chunk by chunk (ranks share a chunk), and
    keep the problems with --min-correct..--max-correct correct ones, the first --keep of them, each with its first
    correct response as `solution`: the file Table 1 reads (`--data OUT/selected.jsonl`, s = that solution).
    As eval_dapo_dataset.py, except that its batches of 128 problems become --chunk."""
    rank, _, world, device = rollout.init_distributed()
    problems = data.load_problems(args.data, limit=args.limit, seed=args.seed)
    chat = dict(system=args.system, thinking=args.thinking)
    max_len = settings_engine_length(args, problems, ["unguided"], "rollout")
    backend = rollout.backend_from_args(args, device, max_len, seed=args.seed + rank)
    params = args.sampling_params(seed=args.seed)
    kept, seen = [], []
    bar = tqdm(total=args.keep, desc="select", disable=rank != 0)
    for start in range(0, len(problems), args.chunk):
        indices = rollout.shard(list(range(start, min(start + args.chunk, len(problems)))), rank, world)
        prompts = [
            rollout.chat_prompt(backend.tokenizer, rollout.unguided_prompt(problems[i]["question"]), **chat)
            for i in indices
        ]
        mine = [
            dict(
                index=indices[s.prompt_index],
                response=s.text,
                length=len(s.response_ids),
                score=data.grade(s.text, problems[indices[s.prompt_index]]["answer"], lenient=args.lenient),
            )
            for s in rollout.generate(backend, prompts, params, progress=False, indices=indices)
        ]
        every = rollout.gather_to_rank0(mine, world)
        box = [None]
        if rank == 0:
            every.sort(key=lambda r: r["index"])  # stable: each problem's samples stay in order
            seen.extend(every)
            for i in sorted({r["index"] for r in every}):
                scores = [r for r in every if r["index"] == i]
                correct = [r["response"] for r in scores if r["score"] == 1.0]
                if args.min_correct <= len(correct) <= args.max_correct and len(kept) < args.keep:
                    kept.append(
                        dict(
                            problems[i],
                            solution=correct[0] if correct else None,
                            correct=len(correct),
                            samples=len(scores),
                        )
                    )
                    bar.update(1)
            box = [len(kept) >= args.keep]
        if world > 1:
            dist.broadcast_object_list(box, src=0)  # collective: every rank learns whether to stop
        if box[0]:
            break
    bar.close()
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "samples.jsonl", "w") as f:
            f.writelines(json.dumps(dict(r, id=problems[r["index"]]["id"])) + "\n" for r in seen)
        with open(out / "selected.jsonl", "w") as f:
            f.writelines(
                json.dumps({k: p[k] for k in ("id", "question", "answer", "solution", "correct", "samples")}) + "\n"
                for p in kept
            )
        rollout.print0(f"kept {len(kept)} of {len({r['index'] for r in seen})} problems -> {out / 'selected.jsonl'}")
    return kept


@dataclass
class BuildArgs(rollout.SamplingArgs):
    """`evaluate.py build`: Table 2's sets as the released make_sft_dataset.py builds them, one response per problem of
    `evaluate.py select`'s output (problems with 1-4 of 8 correct): D_ug, each problem's `solution` (its first correct
    unguided response); D_sg, its first correct response under c = s (Table 1's hint prompt; problems without one
    are left out). The released generation (eval_dapo_dataset.py, eval_with_hint.py): 8 samples at temperature 0.6,
    top-p 0.95, top-k 20, 32,768 new tokens."""

    setting: str = HfArg(
        default="solution",
        help="unguided (D_ug: each problem's s) or solution (D_sg: the first correct response under c = s)",
    )
    data: str = HfArg(
        default="runs/select/selected.jsonl",
        help="`evaluate.py select`'s selected.jsonl: the problems, each with its `solution` s",
    )
    n_samples: int = HfArg(default=8, help="D_sg: responses per problem under c = s (the released: 8)")
    out: str = HfArg(
        default="runs/d_sg.jsonl", help="output jsonl: question, response, setting, length, epistemic per row"
    )

    def __post_init__(self):
        super().__post_init__()
        data.choose(self, "setting", ("unguided", "solution"))


def build(args: BuildArgs):
    """D_ug / D_sg (Sec. 4, Table 2), one correct response per problem of `evaluate.py select`'s output
    (`BuildArgs`)."""
    rank, _, world, device = rollout.init_distributed()
    problems = [p for p in data.load_problems(args.data) if p.get("solution")]
    if not problems:
        raise ValueError(
            f"{args.data}: no problem has a `solution`; D_ug and D_sg are built from `evaluate.py "
            f"select`'s selected.jsonl (each problem's first correct response)"
        )
    indices = rollout.shard(list(range(len(problems))), rank, world)
    mine = [problems[i] for i in indices]
    chat = dict(system=args.system, thinking=args.thinking)
    if args.setting == "unguided":  # D_ug: s itself, generated unguided by `evaluate.py select`
        tok = rollout.load_tokenizer(args.model)
        kept = [
            dict(
                index=i,
                problem=p,
                context=rollout.unguided_prompt(p["question"]),
                response=p["solution"],
                length=len(tok(p["solution"], add_special_tokens=False)["input_ids"]),
            )
            for i, p in zip(indices, mine)
        ]
    else:  # D_sg: the first correct of n responses under c = s
        contexts = {p["id"]: context_for("solution", p["question"], p["solution"]) for p in mine}
        max_len = settings_engine_length(args, mine, ["solution"], "dataset")
        backend = rollout.backend_from_args(args, device, max_len, seed=args.seed + rank)
        params = args.sampling_params(seed=args.seed)
        prompts = [rollout.chat_prompt(backend.tokenizer, contexts[p["id"]], **chat) for p in mine]
        kept, done = [], set()
        for s in rollout.generate(backend, prompts, params, indices=indices):  # a problem's samples in order
            p = mine[s.prompt_index]
            if s.prompt_index not in done and data.grade(s.text, p["answer"], lenient=args.lenient) == 1.0:
                done.add(s.prompt_index)
                kept.append(
                    dict(
                        index=indices[s.prompt_index],
                        problem=p,
                        context=contexts[p["id"]],
                        response=s.text,
                        length=len(s.response_ids),
                    )
                )
    rows = [
        dict(
            id=k["problem"]["id"],
            question=k["problem"]["question"],
            answer=k["problem"]["answer"],
            response=k["response"],
            setting=args.setting,
            context=k["context"],
            length=k["length"],
            epistemic=epistemic.epistemic_count(k["response"]),
            index=k["index"],
        )
        for k in kept
    ]
    rows = rollout.gather_to_rank0(rows, world)
    if rank != 0:
        return
    rows.sort(key=lambda r: r.pop("index"))  # file order, on any number of ranks
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    n = max(len(rows), 1)
    rollout.print0(
        f"D_{'sg' if args.setting == 'solution' else 'ug'}: {len(rows)} responses from {len(problems)} problems "
        f"-> {args.out}; mean length {sum(r['length'] for r in rows) / n:.1f} tokens, mean E(y) "
        f"{sum(r['epistemic'] for r in rows) / n:.2f}"
    )


def main(argv=None):
    """`evaluate.py ...` (the benchmarks), `evaluate.py select ...` (Sec. 3's problems), `evaluate.py table1 ...`
    (Table 1) or `evaluate.py build ...` (Table 2's D_ug and D_sg)."""
    argv = sys.argv[1:] if argv is None else argv

    def job():
        if argv[:1] == ["select"]:
            select(data.parse_args(SelectArgs, argv[1:]))
        elif argv[:1] == ["table1"]:
            table1(data.parse_args(Table1Args, argv[1:]))
        elif argv[:1] == ["build"]:
            build(data.parse_args(BuildArgs, argv[1:]))
        else:
            evaluate_model(data.parse_args(Args, argv))

    rollout.run_main(job)


if __name__ == "__main__":
    rollout.run_script(main)

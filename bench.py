"""bench.py -- measured speed and memory; figures go in PERFORMANCE.md, never in tests.

    python bench.py grade              # grading throughput on 1,000 mixed responses
    python bench.py generate           # hf backend vs plain model.generate (tokens/s), batch 16, 128 new tokens
    python bench.py generate64         # the same at batch 64
    python bench.py generate64_bf16    # the same in bf16 (evaluate.py --dtype bfloat16; fast on AVX512-BF16 CPUs)
    python bench.py sdpo_chunked sdpo_unchunked   # SDPO loss memory at V = 151,936, T = 4096
    python bench.py grpo_step sdpo_step generate  # an RL step: phases, step time, peak RSS, MFU
    python bench.py grpo_step_ckpt sdpo_step_ckpt # the same with gradient checkpointing (TRL's default)
    python bench.py grpo_step_unpacked sdpo_step_unpacked  # one padded row per rollout (--pack-tokens 0)
    python bench.py grpo_step_mb8 sdpo_step_mb8     # micro-batches of 8 sequences (the old default; now 4)
    python bench.py grpo_step_all_rows sdpo_step_all_rows  # zero-gradient rows trained too (--no-skip-zero-rows)
    python bench.py grpo_step_plain sdpo_step_plain        # --no-fast: the plain code, without fast.py
    python bench.py trl_grpo_step trl_sdpo_step   # TRL's trainers on the same config (pip install trl)
    python bench.py grpo_step_all_rows_bf16 sdpo_step_all_rows_bf16 trl_grpo_step_bf16 trl_sdpo_step_bf16  # in bf16
    python bench.py grpo_step_all_rows_bf16_ckpt sdpo_step_all_rows_bf16_ckpt  # bf16 with --grad-ckpt (TRL's default)
    python bench.py bf16_curves   # GRPO and SDPO from the organism, fp32 vs bf16, 2 seeds x 10 steps (~30 min)

Each row is measured in a fresh process so rows don't share caches or memory peaks.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import time


def mixed_responses(n: int = 1000, seed: int = 0) -> list[tuple[str, str]]:
    """(response, answer) pairs: a realistic mix of exact hits, equivalent forms, wrong, unboxed, long."""
    rng = random.Random(seed)
    kinds = [
        lambda a: (f"Adding gives {a}. The answer is \\boxed{{{a}}}.", str(a)),  # exact
        lambda a: (f"So x = \\boxed{{\\frac{{{2 * a}}}{{2}}}}", str(a)),  # equivalent form
        lambda a: (f"Thus \\boxed{{{a + 1}}}.", str(a)),  # wrong
        lambda a: (f"I think it is {a}.", str(a)),  # no box
        lambda a: ("Wait, let me check. " * 200 + f"\\boxed{{{a}.0}}", str(a)),  # long
        lambda a: (f"\\boxed{{\\left({a}, {a + 1}\\right)}}", f"({a},{a + 1})"),  # tuple
        lambda a: (f"\\boxed{{{a / 4}}}", f"\\frac{{{a}}}{{4}}"),  # decimal vs frac
        lambda a: (
            f"\\boxed{{\\frac{{{a}\\sqrt{{2}}}}{{2}}}}",
            f"\\frac{{{a}}}{{\\sqrt{{2}}}}",
        ),  # symbolic: math-verify
    ]
    return [rng.choice(kinds)(rng.randint(1, 999)) for _ in range(n)]


def bench_grade(n: int = 1000) -> dict:
    import data

    pairs = mixed_responses(n)
    data.grade("\\boxed{1/2}", "0.5")  # start the math-verify child outside the timing
    t = time.perf_counter()
    scores = [data.grade(r, a) for r, a in pairs]
    dt = time.perf_counter() - t
    return dict(
        row="grade",
        responses=n,
        seconds=round(dt, 3),
        responses_per_s=round(n / dt, 1),
        mean_score=round(sum(scores) / n, 3),
    )


def bench_generate(batch: int = 16, new_tokens: int = 128, reps: int = 2, dtype: str = "float32") -> dict:
    """Tokens/s of plain `model.generate` and of rollout.generate_hf on the same prompts and sampling
    (temperature 1.0, top-p 1, top-k 0, EOS stops), in one process, with the weights in `dtype`. Counts
    response tokens up to and including EOS (what a trainer uses), best of `reps`."""
    import torch
    import data
    import rollout

    model, tok = rollout.load_model(dtype=dtype)
    qs = [p["question"] for p in data.load_problems(f"synthetic:difficulty=1,n={batch}")]
    prompts = [rollout.chat_prompt(tok, data.format_prompt(q)) for q in qs]
    eos = rollout.eos_ids(tok, model)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    plain = []
    for r in range(reps):
        torch.manual_seed(r)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens)
        dt = time.perf_counter() - t
        n = 0
        for row in out[:, enc.input_ids.shape[1] :].tolist():
            n += next((i + 1 for i, x in enumerate(row) if x in eos), len(row))
        plain.append(n / dt)
    ours = []
    for r in range(reps):
        params = rollout.SamplingParams(n=1, temperature=1.0, max_new_tokens=new_tokens, seed=r)
        t = time.perf_counter()
        samples = rollout.generate_hf(model, tok, prompts, params, batch_size=batch, progress=False)
        ours.append(sum(len(s.response_ids) for s in samples) / (time.perf_counter() - t))
    return dict(
        row=f"generate batch={batch} new_tokens={new_tokens} {dtype}",
        plain_generate_tok_s=round(max(plain), 1),
        hf_backend_tok_s=round(max(ours), 1),
        speedup=round(max(ours) / max(plain), 2),
        threads=torch.get_num_threads(),
    )


def bench_sdpo_memory(chunk: int | None = 256, T: int = 4096, V: int = 151_936, H: int = 64, k: int = 100) -> dict:
    """Peak memory of one SDPO loss micro-step (forward + backward) over T positions with Qwen's vocabulary,
    from hidden states through a tied LM head: chunked (`fast.chunked_distillation`) or on full logits."""
    import torch
    import fast
    import sdpo

    torch.manual_seed(0)
    w = (torch.randn(V, H) * 0.02).requires_grad_()
    hs, ht = torch.randn(T, H, requires_grad=True), torch.randn(T, H)
    y = torch.randint(0, V, (T,))
    base = peak_rss_gb()
    t = time.perf_counter()
    if chunk:
        loss = fast.chunked_distillation(
            hs,
            ht,
            y,
            w,
            w.detach(),
            topk=k,
            chunk=chunk,
            divergence=sdpo.divergence,
            finish_support=sdpo.finish_support,
        )["divergence"].mean()
    else:
        loss = sdpo.self_distillation_loss(hs @ w.T, (ht @ w.T).detach(), topk=k).mean()
    loss.backward()
    return dict(
        row=f"sdpo loss T={T} V={V} k={k} {'chunk=' + str(chunk) if chunk else 'unchunked'}",
        seconds=round(time.perf_counter() - t, 2),
        peak_above_baseline_gb=round(peak_rss_gb() - base, 2),
        loss=round(float(loss.detach()), 6),
    )


def matmul_peak_gflops(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    """Best GFLOP/s of an n x n matmul in `dtype` on this machine (the MFU denominator), best of `reps`."""
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


RL_CONFIG = dict(
    prompts_per_step=4,
    rollouts=4,
    max_new_tokens=128,
    lr=1e-6,
    clip_high=0.28,
    warmup=0,
    data="synthetic:difficulty=1,types=add,n=64",
    eval_data=[],
    save_every=0,
    lenient=True,
    dtype="float32",
)


def n_parameters(model_dir) -> int:
    """Parameters of a Hugging Face directory, from the safetensors headers (a tied LM head is stored once)."""
    import math
    from pathlib import Path
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 (safe_open is not iterable)
    return total


def bench_rl_step(trainer: str = "grpo", steps: int = 2, **overrides) -> dict:
    """One RL step of grpo.py or sdpo.py on the config measured against TRL: 4 prompts x 4 rollouts of at most 128
    tokens, single-digit addition, LR 1e-6, no KL, clip-high 0.28, fp32 (the *_bf16 rows: --dtype bfloat16, the bf16
    replica generating and training into fp32 masters, sft.bf16_compute_copy, and a bf16 teacher). `steps` steps run;
    the last one (warm) is reported. MFU = model FLOPs / (step time x the matmul peak measured here), with 2 P FLOPs
    per token forward (every sample's prompt and response in generation, the teacher's) and 6 P forward + backward per
    trained token (the responses of the rows trained on, each distinct prompt once: work that packed rows or
    fast.rows_with_gradient skip is not counted as useful), P = parameters, the tied LM head counted once; attention's
    T^2 term left out (~3% at these lengths). `overrides`: Args fields on top of RL_CONFIG (the *_ckpt rows:
    grad_ckpt=True, as TRL runs by default).

    Where a group's rollouts all score alike (GRPO) or a row has no teacher context (SDPO), the row's
    gradient is zero and it is not trained (--skip-zero-rows): a step's time depends on its scores, so the
    row also gives score, trained_frac (the share of rows trained) and every step's time, t_steps."""
    import tempfile
    import grpo
    import rollout
    import sdpo

    peak = matmul_peak_gflops(dtype={**RL_CONFIG, **overrides}["dtype"])
    with tempfile.TemporaryDirectory() as out:
        if trainer == "grpo":
            args = grpo.Args(**{**RL_CONFIG, **overrides}, steps=steps, out=out)
            grpo.run_loop(args, "grpo", grpo.grpo_train_step)
        else:
            args = sdpo.Args(**{**RL_CONFIG, **overrides}, steps=steps, out=out)
            grpo.run_loop(args, "sdpo", sdpo.sdpo_train_step)
        with open(f"{out}/metrics.jsonl") as f:
            rows = [json.loads(line) for line in f if '"step"' in line]
    m = rows[-1]
    P = n_parameters(rollout.embedded_model_dir())
    n = RL_CONFIG["prompts_per_step"] * RL_CONFIG["rollouts"]
    gen_flops = 2 * P * m["seq_tokens"]  # prefill + decode, every sample
    train_flops = 6 * P * m["train_tokens"] + 2 * P * m.get("teacher_tokens", 0)
    t_teacher = m.get("t_teacher", 0.0)
    tag = "".join(f" {k}={v}" for k, v in overrides.items())
    return dict(
        row=f"{trainer} step (4x4, 128 tokens){tag}",
        step=m["step"],
        rollouts=n,
        response_tokens=round(m["length"] * n),
        score=m["score"],
        trained_frac=m["trained_frac"],
        t_steps=[round(r["t_step"], 2) for r in rows],
        rollout_tok_s=round(m["rollout_tok_s"], 1),
        t_generate=round(m["t_generate"], 2),
        t_score=round(m["t_score"], 2),
        t_old_logprobs=round(m.get("t_old_logprobs", 0.0), 2),
        t_teacher=round(t_teacher, 2),
        t_train=round(m["t_train"] - t_teacher, 2),
        t_step=round(m["t_step"], 2),
        # the trainer resets the kernel's high-water mark each step (sft.peak_memory_gb), ru_maxrss with it:
        # the peak is the largest step's, model loading excluded
        peak_rss_gb=round(max(r.get("peak_mem_gb") or 0.0 for r in rows), 2),
        matmul_peak_gflops=round(peak, 1),
        mfu=round((gen_flops + train_flops) / (m["t_step"] * peak * 1e9), 3),
        mfu_train=round(train_flops / (m["t_train"] * peak * 1e9), 3),
    )


def bench_trl_step(trainer: str = "grpo", steps: int = 2, bf16: bool = False) -> dict:
    """TRL's GRPOTrainer / experimental SDPOTrainer on the same config, when `trl` is installed (a bench-only
    extra). Written to TRL 1.x's documented GRPOConfig fields; time per step from the trainer's logs. bf16: its
    own switch (TrainingArguments.bf16: accelerate's autocast over the fp32 weights, on CPU too)."""
    try:
        import trl  # noqa: F401
        from datasets import Dataset
    except ImportError:
        return dict(row=f"trl {trainer}", skipped="trl is not installed (pip install trl): a bench-only extra")
    import tempfile
    import data
    import rollout

    path = str(rollout.embedded_model_dir())  # TRL takes a str id or a model, not a Path
    problems = data.load_problems(RL_CONFIG["data"])
    ds = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": data.format_prompt(p["question"])}], "answer": p["answer"]}
            for p in problems
        ]
    )

    def reward(completions, answer, **_):
        return [
            data.grade(c[-1]["content"] if isinstance(c, list) else c, a, lenient=True)
            for c, a in zip(completions, answer)
        ]

    common = dict(
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=128,
        learning_rate=1e-6,
        beta=0.0,
        epsilon_high=0.28,
        max_steps=steps,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        bf16=bf16,
        lr_scheduler_type="constant",
        seed=0,
    )
    with tempfile.TemporaryDirectory() as out:
        if trainer == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            t = GRPOTrainer(
                model=path, reward_funcs=reward, args=GRPOConfig(output_dir=out, **common), train_dataset=ds
            )
        else:
            from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

            t = SDPOTrainer(
                model=path, reward_funcs=reward, args=SDPOConfig(output_dir=out, **common), train_dataset=ds
            )
        import torch
        from transformers import TrainerCallback
        import sft

        times, peaks, lengths = [], [], []
        t0 = time.perf_counter()

        class Timer(TrainerCallback):  # the same per-step memory window as our rows (sft.peak_memory_gb)
            def on_step_begin(self, *a, **k):
                sft.peak_memory_gb(torch.device("cpu"))

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter())
                peaks.append(sft.peak_memory_gb(torch.device("cpu")))

            def on_log(self, args, state, control, logs=None, **k):
                if logs and "completions/mean_length" in logs:
                    lengths.append(float(logs["completions/mean_length"]))

        t.add_callback(Timer())
        t.train()
    steps_s = [b - a for a, b in zip([t0] + times[:-1], times)]
    # TRL's GRPOConfig turns gradient checkpointing on by default (SDPOConfig inherits it); left as TRL ships it
    return dict(
        row=f"trl {trainer} step (4x4, 128 tokens){' bf16' if bf16 else ''}",
        t_step=round(steps_s[-1], 2),
        t_first=round(steps_s[0], 2),
        response_tokens=round(lengths[-1] * 16) if lengths else None,
        peak_rss_gb=round(max(p or 0.0 for p in peaks), 2),
        gradient_checkpointing=t.args.gradient_checkpointing,
    )


# the README's reproduction runs (T), without checkpoints
CURVE_RUN = """--data synthetic:n=256,seed=0,part=train --steps 10 --prompts-per-step 4 --rollouts 4 --warmup 0
    --max-new-tokens 256 --lr 1e-5 --eval-data synthetic:split=ood,n=2,seed=1 --eval-n 1 --save-every 0""".split()  # noqa: SIM905 (flags as typed)


def bench_bf16_curves(model: str = "runs/organism/step_60", out: str = "runs/bf16_curves", seeds=(0, 1)) -> dict:
    """The precision check: GRPO and SDPO (c = s) from the reasoning organism (the README's warm start), 10 steps
    as the reproduction runs them (its data, batch and rate), in fp32 and in bf16, over `seeds`, two jobs at a time
    on one thread each. Plots the training score, response length and E(y) per step, mean and range over the seeds, to
    report/bf16_vs_fp32.png; returns each curve. Runs already complete in `out` are kept."""
    import os
    import shutil
    from pathlib import Path

    jobs = []
    for script in ("grpo.py", "sdpo.py"):
        for dtype in ("float32", "bfloat16"):
            for seed in seeds:
                run = Path(out) / f"{script[:4]}_{dtype}_seed{seed}"
                done = run / "metrics.jsonl"
                if not (done.exists() and '"step": 10,' in done.read_text()):
                    shutil.rmtree(run, ignore_errors=True)  # a run cut short starts over
                    cmd = [sys.executable, script, "--model", model, *CURVE_RUN, "--seed", str(seed)]
                    jobs.append([*cmd, "--dtype", dtype, "--out", str(run)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    for i in range(0, len(jobs), 2):
        procs = [
            subprocess.Popen(j, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for j in jobs[i : i + 2]
        ]
        if any([p.wait() for p in procs]):  # both waited for
            raise RuntimeError(f"a run failed: {jobs[i : i + 2]}")
    curves = {}
    for run in sorted(Path(out).glob("*_seed*")):
        with open(run / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f if '"step"' in line]
        curves[run.name] = {k: [r[k] for r in rows] for k in ("score", "length", "epistemic")}
    plot_curves(curves, Path("report") / "bf16_vs_fp32.png")
    return dict(row="bf16 curves", minutes=round((time.perf_counter() - t) / 60, 1), curves=curves)


def plot_curves(curves: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for arm, color in (("grpo", "tab:blue"), ("sdpo", "tab:red")):
        for dtype, style in (("float32", "-"), ("bfloat16", "--")):
            runs = [c for name, c in curves.items() if name.startswith(f"{arm}_{dtype}_")]
            if not runs:
                continue
            for ax, key in zip(axes, ("score", "length", "epistemic")):
                y = np.array([r[key] for r in runs], dtype=float)
                x = np.arange(1, y.shape[1] + 1)
                ax.plot(x, y.mean(0), style, color=color, label=f"{arm.upper()} {dtype} ({len(runs)} seeds)")
                ax.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.12 if dtype == "float32" else 0.06)
    for ax, title in zip(axes, ("training score", "response length (tokens)", "E(y) per response")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def peak_rss_gb() -> float:
    """The process's peak resident set in GB (10^9 bytes; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


ROWS = {
    "grade": bench_grade,
    "generate": bench_generate,
    "generate64": lambda: bench_generate(batch=64),
    "generate64_bf16": lambda: bench_generate(batch=64, dtype="bfloat16"),
    "sdpo_chunked": bench_sdpo_memory,
    "sdpo_unchunked": lambda: bench_sdpo_memory(chunk=None),
    "grpo_step": bench_rl_step,
    "sdpo_step": lambda: bench_rl_step("sdpo"),
    "grpo_step_ckpt": lambda: bench_rl_step(grad_ckpt=True),
    "sdpo_step_ckpt": lambda: bench_rl_step("sdpo", grad_ckpt=True),
    "grpo_step_unpacked": lambda: bench_rl_step(pack_tokens=0),
    "sdpo_step_unpacked": lambda: bench_rl_step("sdpo", pack_tokens=0),
    "grpo_step_mb8": lambda: bench_rl_step(micro_batch=8),
    "sdpo_step_mb8": lambda: bench_rl_step("sdpo", micro_batch=8),
    "grpo_step_all_rows": lambda: bench_rl_step(skip_zero_rows=False),
    "sdpo_step_all_rows": lambda: bench_rl_step("sdpo", skip_zero_rows=False),
    "grpo_step_plain": lambda: bench_rl_step(fast=False),
    "sdpo_step_plain": lambda: bench_rl_step("sdpo", fast=False),
    "grpo_step_all_rows_block_mask": lambda: bench_rl_step(skip_zero_rows=False, segment_attention=False),
    "sdpo_step_all_rows_block_mask": lambda: bench_rl_step("sdpo", skip_zero_rows=False, segment_attention=False),
    "trl_grpo_step": bench_trl_step,
    "trl_sdpo_step": lambda: bench_trl_step("sdpo"),
    "grpo_step_all_rows_bf16": lambda: bench_rl_step(skip_zero_rows=False, dtype="bfloat16"),
    "sdpo_step_all_rows_bf16": lambda: bench_rl_step("sdpo", skip_zero_rows=False, dtype="bfloat16"),
    "grpo_step_all_rows_bf16_ckpt": lambda: bench_rl_step(skip_zero_rows=False, dtype="bfloat16", grad_ckpt=True),
    "sdpo_step_all_rows_bf16_ckpt": lambda: bench_rl_step(
        "sdpo", skip_zero_rows=False, dtype="bfloat16", grad_ckpt=True
    ),
    "trl_grpo_step_bf16": lambda: bench_trl_step(bf16=True),
    "trl_sdpo_step_bf16": lambda: bench_trl_step("sdpo", bf16=True),
    "bf16_curves": bench_bf16_curves,
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rows", nargs="*", default=list(ROWS), help=f"rows to run: {', '.join(ROWS)}")
    p.add_argument("--in-process", action="store_true", help="run the rows here instead of one fresh process each")
    args = p.parse_args()
    if not args.in_process:
        print(f"# bench.py on {platform.machine()}, {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    for row in args.rows:
        if args.in_process:
            result = ROWS[row]()
            result.setdefault("peak_rss_gb", round(peak_rss_gb(), 2))
            print(json.dumps(result))
        else:
            subprocess.run([sys.executable, __file__, row, "--in-process"], check=True)


if __name__ == "__main__":
    main()

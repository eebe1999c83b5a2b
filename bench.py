"""bench.py -- measured speed and memory; figures go in the README and the issue notes, never in tests.

    python bench.py grade              # grading throughput on 1,000 mixed responses
    python bench.py generate           # hf backend vs plain model.generate (tokens/s), batch 16, 128 new tokens
    python bench.py generate64         # the same at batch 64
    python bench.py sdpo_chunked sdpo_unchunked   # SDPO loss memory at V = 151,936, T = 4096

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
        lambda a: (f"Adding gives {a}. The answer is \\boxed{{{a}}}.", str(a)),                     # exact
        lambda a: (f"So x = \\boxed{{\\frac{{{2 * a}}}{{2}}}}", str(a)),                            # equivalent form
        lambda a: (f"Thus \\boxed{{{a + 1}}}.", str(a)),                                             # wrong
        lambda a: (f"I think it is {a}.", str(a)),                                                   # no box
        lambda a: ("Wait, let me check. " * 200 + f"\\boxed{{{a}.0}}", str(a)),                     # long
        lambda a: (f"\\boxed{{\\left({a}, {a + 1}\\right)}}", f"({a},{a + 1})"),                    # tuple
        lambda a: (f"\\boxed{{{a / 4}}}", f"\\frac{{{a}}}{{4}}"),                                   # decimal vs frac
        lambda a: (f"\\boxed{{\\frac{{{a}\\sqrt{{2}}}}{{2}}}}", f"\\frac{{{a}}}{{\\sqrt{{2}}}}"),       # symbolic: math-verify
    ]
    return [rng.choice(kinds)(rng.randint(1, 999)) for _ in range(n)]


def bench_grade(n: int = 1000) -> dict:
    import data
    pairs = mixed_responses(n)
    data.grade("\\boxed{1/2}", "0.5")  # start the math-verify child outside the timing
    t = time.perf_counter()
    scores = [data.grade(r, a) for r, a in pairs]
    dt = time.perf_counter() - t
    return dict(row="grade", responses=n, seconds=round(dt, 3), responses_per_s=round(n / dt, 1),
                mean_score=round(sum(scores) / n, 3))


def bench_generate(batch: int = 16, new_tokens: int = 128, reps: int = 2) -> dict:
    """Tokens/s of plain `model.generate` and of rollout.generate_hf on the same prompts and sampling
    (temperature 1.0, top-p 1, top-k 0, EOS stops), in one process. Counts response tokens up to and
    including EOS (what a trainer uses), best of `reps`."""
    import torch
    import data
    import rollout
    model, tok = rollout.load_model()
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
        for row in out[:, enc.input_ids.shape[1]:].tolist():
            n += next((i + 1 for i, x in enumerate(row) if x in eos), len(row))
        plain.append(n / dt)
    ours = []
    for r in range(reps):
        params = rollout.SamplingParams(n=1, temperature=1.0, max_new_tokens=new_tokens, seed=r)
        t = time.perf_counter()
        samples = rollout.generate_hf(model, tok, prompts, params, batch_size=batch, progress=False)
        ours.append(sum(len(s.response_ids) for s in samples) / (time.perf_counter() - t))
    return dict(row=f"generate batch={batch} new_tokens={new_tokens}", plain_generate_tok_s=round(max(plain), 1),
                hf_backend_tok_s=round(max(ours), 1), speedup=round(max(ours) / max(plain), 2),
                threads=torch.get_num_threads())


def bench_sdpo_memory(chunk: int | None = 256, T: int = 4096, V: int = 151_936, H: int = 64, k: int = 100) -> dict:
    """Peak memory of one SDPO loss micro-step (forward + backward) over T positions with Qwen's vocabulary,
    from hidden states through a tied LM head: chunked (`sdpo.chunked_distillation`) or on full logits."""
    import torch
    import sdpo
    torch.manual_seed(0)
    w = (torch.randn(V, H) * 0.02).requires_grad_()
    hs, ht = torch.randn(T, H, requires_grad=True), torch.randn(T, H)
    y = torch.randint(0, V, (T,))
    base = peak_rss_gb()
    t = time.perf_counter()
    if chunk:
        loss = sdpo.chunked_distillation(hs, ht, y, w, w.detach(), topk=k, chunk=chunk)[:, 0].mean()
    else:
        loss = sdpo.self_distillation_loss(hs @ w.T, (ht @ w.T).detach(), topk=k).mean()
    loss.backward()
    return dict(row=f"sdpo loss T={T} V={V} k={k} {'chunk=' + str(chunk) if chunk else 'unchunked'}",
                seconds=round(time.perf_counter() - t, 2), peak_above_baseline_gb=round(peak_rss_gb() - base, 2),
                loss=round(float(loss.detach()), 6))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


ROWS = {"grade": bench_grade, "generate": bench_generate, "generate64": lambda: bench_generate(batch=64),
        "sdpo_chunked": bench_sdpo_memory, "sdpo_unchunked": lambda: bench_sdpo_memory(chunk=None)}


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
            result["peak_rss_gb"] = round(peak_rss_gb(), 2)
            print(json.dumps(result))
        else:
            subprocess.run([sys.executable, __file__, row, "--in-process"], check=True)


if __name__ == "__main__":
    main()

"""grpo.py -- GRPO, the RLVR baseline of Sec. 5, with the paper's hyperparameters (App. D, Tables 8-9).

Each step samples --prompts-per-step problems and --rollouts n responses each, grades them (App. D reward), and
minimises the clipped surrogate on their group advantages:
    A_i = r_i - mean(r_group)                                  (no std division, as the paper's code)
    ratio_t = exp(clamp(log pi(y_t) - log pi_old(y_t), -20, 20))
    l_t = max(-A ratio_t, -A clip(ratio_t, 1 - 0.2, 1 + 0.28))  (clip low / clip high)
    l_t = min(l_t, -A * 3.0)   when A < 0                       (dual clip, c = 3)
    w_t = min(exp(log pi_old(y_t) - log pi_rollout(y_t)), 2)    (rollout importance-sampling correction)
    loss = mean over the mini-batch's responses y of sum_{t in y} w_t l_t / |y|     (`loss_denominator`)
with no KL term (Table 9: lambda = 0; --kl-coef adds the k3 estimator against the initial policy). The
aggregation is verl's as the paper ran it (beanie00/self-distillation-analysis): one response per micro-batch,
its token mean, times 1 / gradient accumulation, averaged over GPUs: every response weighs the same, whatever its
length. --loss-agg token-mean makes every token of the mini-batch weigh the same instead.

Departures, and why:
  1. On-policy (--ppo-epochs 1, one mini-batch), pi_old is the current policy detached (verl: the same numbers).
  2. Each response's token mean (verl's at the paper's micro-batch of 1) on any micro-batch, packing and ranks.
  3. Under torchrun each rank generates with a plain replica of the policy (FSDP2 forwards are collectives),
     refreshed after every step (`rollout.refresh_weights`), or with a vLLM engine woken with its weights.
  4. CPU-scale defaults (4 prompts x 8 rollouts, 128 new tokens); Table 8's values are in each flag's help.
  5. With --mini-batch, an update holds whole groups in the step's order. verl's (4 GPUs) holds the same slice of
     each GPU's length-balanced part, so every group is split across the updates, and with two updates the second
     gets the odd-ranked, slightly longer half (+3-5% mean length on 4 steps of real rollouts; ours differed by 4-10%
     by which prompts fell where). On-policy (the default) it is the same update.
  6. Under --dtype float32 log-probs come from fp32 logits; under bf16 (the default where the device has it
     natively), as in verl, from bf16 logits, upcast for an fp32 log-softmax. One CPU process computes bf16 as
     FSDP2 does on GPUs, in a bf16 copy whose gradients reach the fp32 masters (`sft.bf16_compute_copy`).
  7. The LR follows verl's constant schedule with warmup (`sft.lr_at`: step k gets lr * k / 10).
  8. --fast (the default) runs the training forwards through fast.py's twins: the same update up to rounding.

Copying: the math (`group_advantages`, `loss_denominator`, `policy_loss`, `k3_kl`, `upcast`) needs torch alone
(test_the_math_copies_with_torch_alone); the step and the loop need sft.py, rollout.py,
data.py, epistemic.py and evaluate.py.

Run it:
    python grpo.py --lenient                                        # embedded model, easy synthetic problems
    python grpo.py --lenient --no-fast                              # the plain code path only (no fast.py)
    torchrun --nproc_per_node 2 grpo.py --lenient --steps 2
    python grpo.py --lenient --steps 20 --resume                    # continue the run in --out
    torchrun --nproc_per_node 8 grpo.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --backend vllm ...  # README
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm
from transformers.hf_argparser import HfArg

import data
import evaluate
import rollout
import sft

LOSS_AGGS = ("seq-mean-token-mean", "token-mean")  # --loss-agg; `loss_denominator`


@dataclass
class RLArgs(sft.RunArgs):
    """The flags GRPO and SDPO share beside sft.RunArgs: data, batch, optimizer, PPO clipping, sampling and reward."""

    # data
    data: str = HfArg(
        default="synthetic:difficulty=1,types=add+sub+mul+div,n=256",
        help="training problems (the paper: DAPO-Math-17k)",
    )
    coverage: int = HfArg(
        default=0, help="train on this many distinct problems of --data, drawn by --seed (Sec. 6.2's |D|); 0 = all"
    )
    # batch
    prompts_per_step: int = HfArg(default=4, help="problems per step, over all ranks (Table 8 question batch: 256)")
    rollouts: int = HfArg(default=8, help="responses per problem, the group size (Table 8: 8)")
    mini_batch: int = HfArg(
        default=0, help="problems per optimizer update; 0 = all of the step's (Table 8: 64 or 128)"
    )
    ppo_epochs: int = HfArg(default=1, help="passes over the step's rollouts (verl default: 1)")
    # optimizer and loss
    clip_low: float = HfArg(default=0.2, help="PPO clip epsilon-low (verl: 0.2)")
    clip_high: float = HfArg(default=0.28, help="PPO clip epsilon-high (Table 9: 0.28)")
    clip_c: float = HfArg(default=3.0, help="dual-clip constant for negative advantages (verl: 3.0)")
    rollout_is_clip: float = HfArg(default=2.0, help="cap of the rollout importance-sampling weight (Table 9: 2)")
    loss_agg: str = HfArg(
        default="seq-mean-token-mean",
        help="seq-mean-token-mean (each response's token mean, then the mean over the mini-batch's responses: the "
        "paper's runs) or token-mean (every token of the mini-batch weighs the same)",
    )
    norm_adv_std: bool = HfArg(default=False, help="divide advantages by the group's std (the paper's code does not)")
    # sampling and reward
    temperature: float = HfArg(default=1.0, help="rollout temperature (Table 8: 1.0)")
    max_new_tokens: int = HfArg(default=128, help="response budget (Table 8: 20480)")
    max_prompt_len: int = HfArg(default=2048, help="prompts longer than this are refused (Table 8: 2048)")
    lenient: bool = HfArg(
        default=False,
        help="grade the last number when a response has no \\boxed{} (for the embedded model; not the paper's reward)",
    )

    def __post_init__(self):
        super().__post_init__()
        data.check(self, "coverage mini_batch clip_high", *data.NON_NEGATIVE)
        data.check(
            self,
            "prompts_per_step rollouts ppo_epochs max_prompt_len rollout_is_clip temperature max_new_tokens",
            *data.POSITIVE,
        )
        data.check(self, "clip_low", lambda v: 0 <= v < 1, "in [0, 1)")
        data.check(self, "clip_c", lambda v: v > 1, "> 1")
        data.choose(self, "loss_agg", LOSS_AGGS)


@dataclass
class Args(RLArgs):
    kl_coef: float = HfArg(default=0.0, help="k3 KL penalty against the initial policy (Table 9: 0.0)")

    def __post_init__(self):
        super().__post_init__()
        data.check(self, "kl_coef", *data.NON_NEGATIVE)


# --------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------
def group_advantages(rewards, group_size: int, norm_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """A_i = r_i - mean of its group (consecutive blocks of `group_size`); / (std + eps) when norm_std.

    std is the unbiased sample std, as verl's compute_grpo_outcome_advantage. (N,) -> (N,)"""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)  # (G, n)
    a = r - r.mean(dim=1, keepdim=True)
    if norm_std:
        a = a / (r.std(dim=1, keepdim=True) + eps)
    return a.view(-1)


def loss_denominator(mask, loss_agg: str = "token-mean", token_count=None, seq_count=None):
    """What each token's loss is divided by, for a loss summed over `mask` (B, T). token-mean: the mini-batch's
    tokens, token_count (default mask.sum()); seq-mean-token-mean (the paper's runs): its own sequence's tokens times
    the mini-batch's sequences, seq_count (default B), per row (B, 1). Counts: global ones / the world size."""
    if loss_agg == "token-mean" and torch.is_tensor(token_count):  # a denominator per token
        return token_count.clamp(min=1.0)
    if loss_agg == "token-mean":
        return max(float(mask.sum() if token_count is None else token_count), 1.0)
    if loss_agg == "seq-mean-token-mean":
        return mask.float().sum(-1, keepdim=True).clamp(min=1.0) * float(len(mask) if seq_count is None else seq_count)
    raise ValueError(f"--loss-agg {loss_agg!r}: choose one of {', '.join(LOSS_AGGS)}")


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float = 3.0,
    is_weight=None,
    token_count=None,
    loss_agg: str = "token-mean",
    seq_count=None,
):
    """The clipped surrogate with dual clip, summed over `mask` and divided as `loss_denominator` says. logp,
    old_logp, mask: (B, T); advantages: (B,) or (B, T); is_weight: (B, T) detached rollout IS weights or None;
    token_count may be a tensor that broadcasts to (B, T). Returns (loss, metrics)."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))  # (B, T)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    loss3 = -adv * clip_c
    dual = torch.minimum(clipped, loss3)
    per_token = torch.where(adv < 0, dual, clipped)  # (B, T)
    if is_weight is not None:
        per_token = per_token * is_weight
    mask = mask.float()
    loss = (per_token * mask / loss_denominator(mask, loss_agg, token_count, seq_count)).sum()
    with torch.no_grad():

        def m(x):
            return float((x.float() * mask).sum() / mask.sum().clamp(min=1))

        metrics = dict(
            clip_frac_high=m((adv > 0) & (ratio > 1 + clip_high)),
            clip_frac_low=m((adv < 0) & (ratio < 1 - clip_low)),
            clip_frac_dual=m((adv < 0) & (clipped > loss3)),
            ratio_mean=m(ratio),
        )
    return loss, metrics


def k3_kl(logp, ref_logp) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1, clamped as verl."""
    d = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits to fp32 for the softmax; fp32 and fp64 stay as they are (the same tensor)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def response_logits(model, seqs: list[tuple[list[int], list[int]]], pad_id: int, device):
    """One right-padded row per (prompt, response); returns the logits at the positions that predict each response
    token (B, R, V), the targets and the mask (B, R), R the longest response."""
    W, R = max(len(p) + len(r) for p, r in seqs), max(max(len(r) for _, r in seqs), 1)
    ids = torch.tensor([(p + r + [pad_id] * W)[:W] for p, r in seqs], device=device)  # (B, W)
    attn = torch.tensor([[int(t < len(p) + len(r)) for t in range(W)] for p, r in seqs], device=device)  # (B, W)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (B, W, V)
    at = torch.tensor([[min(len(p) - 1 + t, W - 1) for t in range(R)] for p, _ in seqs], device=device)  # (B, R)
    logits = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))  # (B, R, V)
    targets = torch.tensor([(r + [pad_id] * R)[:R] for _, r in seqs], device=device)  # (B, R)
    mask = torch.tensor([[float(t < len(r)) for t in range(R)] for _, r in seqs], device=device)  # (B, R)
    return logits, targets, mask


def token_logprobs(
    model, seqs: list[tuple[list[int], list[int]]], pad_id: int, temperature: float, device, with_entropy: bool = False
):
    """log pi(y_t | x, y_<t) under log_softmax(logits / T), for each (prompt, response)'s response tokens.
    Returns logp (B, R), mask (B, R) and the entropy (B, R; detached) or None; padding is 0. fast.token_logprobs
    is its twin."""
    logits, targets, mask = response_logits(model, seqs, pad_id, device)
    logp_v = torch.log_softmax(upcast(logits) / temperature, dim=-1)  # (B, R, V)
    logp = logp_v.gather(-1, targets[..., None]).squeeze(-1) * mask  # (B, R)
    entropy = -(logp_v.exp() * logp_v).sum(-1).detach() * mask if with_entropy else None  # (B, R)
    return logp, mask, entropy


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------
def logprobs(model, rows: list[dict], args: RLArgs, pad_id: int, device, with_entropy: bool = False):
    """`token_logprobs` of the rows' (prompt, response) pairs (its fast.py twin under --fast), under --dtype's
    autocast."""
    seqs = [(r["prompt_ids"], r["response_ids"]) for r in rows]
    with rollout.autocast(args.dtype, device):
        if not args.fast:
            return token_logprobs(model, seqs, pad_id, args.temperature, device, with_entropy)
        import fast

        return fast.token_logprobs(
            model,
            seqs,
            pad_id,
            args.temperature,
            device,
            with_entropy,
            sft.chunk_size(args.chunk, device),
            args.pack_tokens,
        )


def micro_batches(update: list[dict], args: RLArgs, model, has_gradient=None) -> list[list[dict]]:
    """One update's micro-batches of --micro-batch consecutive rows, as many on every rank; under --fast,
    fast.schedule's (rows by length, a prompt's rows packed, with --skip-zero-rows none of zero gradient)."""
    if not args.fast:
        return [update[i : i + args.micro_batch] for i in range(0, len(update), args.micro_batch)]
    import fast

    return fast.schedule(
        update,
        args.micro_batch,
        has_gradient if args.skip_zero_rows else None,
        fast.packing_limit(model, args.pack_tokens) > 0,
    )


def trained_positions(micros: list[list[dict]]) -> int:
    """The useful positions of an update's training forwards (bench.py's MFU): each response, each prompt once."""
    rows = [r for micro in micros for r in micro]
    return sum(len(p) for p in {tuple(r["prompt_ids"]) for r in rows}) + sum(len(r["response_ids"]) for r in rows)


def update_plan(n_rows: int, args: RLArgs, world: int) -> tuple[int, bool]:
    """(rows per optimizer update on this rank, on-policy?) for --mini-batch and --ppo-epochs."""
    per_update = n_rows if args.mini_batch <= 0 else max(1, args.mini_batch * args.rollouts // world)
    return per_update, args.ppo_epochs == 1 and per_update >= n_rows


def padded(values: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-row lists of per-token values, zero-padded to `like`'s (B, R)."""
    return torch.tensor([(v + [0.0] * like.shape[1])[: like.shape[1]] for v in values]).to(like)


@torch.no_grad()
def attach_old_logprobs(model, rows: list[dict], args: RLArgs, pad_id: int, device, has_gradient=None) -> None:
    """pi_old for off-policy updates: each row's response log-probs before the step's first update. A row that
    --fast leaves out (zero gradient) keeps its rollout log-probs: its loss terms are multiplied by zero."""
    for r in rows:
        r["old_logp"] = list(r["rollout_logprobs"])
    for micro in micro_batches(rows, args, model, has_gradient):
        old, mask, _ = logprobs(model, micro, args, pad_id, device)
        for r, o, m in zip(micro, old, mask):
            r["old_logp"] = o[: int(m.sum())].tolist()


CLIP_FRACS = ("clip_frac_high", "clip_frac_low", "clip_frac_dual")


def train_on_rollouts(
    model, optimizer, batch: list[dict], args: Args, world: int, device, pad_id: int, ref_model=None, compute=None
) -> dict:
    """GRPO's updates on one step's rollouts (rows with prompt_ids, response_ids, rollout_logprobs, advantage);
    returns the step's metrics. Every rank holds as many rows. `compute`: the module the forwards run, whose
    gradients reach `model` (sft.bf16_compute_copy); default `model`."""
    net = model if compute is None else compute  # the forwards' module
    per_update, on_policy = update_plan(len(batch), args, world)
    with_kl = ref_model is not None and args.kl_coef > 0

    def has_gradient(r):
        return with_kl or r["advantage"] != 0

    sums, t0 = Counter(), time.time()  # the step's metrics on this rank, as sums
    if not on_policy:  # on-policy, pi_old is the current policy detached (departure 1)
        attach_old_logprobs(net, batch, args, pad_id, device, has_gradient)
    sums.update(ranks=1, t_old_logprobs=time.time() - t0)
    for _ in range(args.ppo_epochs):
        for u in range(0, len(batch), per_update):
            update = batch[u : u + per_update]
            # every row of the mini-batch counts in its means, on every rank; / world: FSDP2 averages gradients
            # over ranks, so world * (local sum / global count) = the global mean
            local_tokens = sum(len(r["response_ids"]) for r in update)
            tokens, seqs = sft.all_reduce_sum(local_tokens) / world, sft.all_reduce_sum(len(update)) / world
            sums.update(rows=len(update), tokens=local_tokens, n_updates=1)
            micros, bad = micro_batches(update, args, net, has_gradient), False
            sums.update(train_tokens=trained_positions(micros))
            for micro in micros:
                logp, mask, entropy = logprobs(net, micro, args, pad_id, device, with_entropy=True)  # (B, R)
                old = logp.detach() if on_policy else padded([r["old_logp"] for r in micro], logp)  # (B, R)
                rollout_logp = padded([r["rollout_logprobs"] for r in micro], logp)  # (B, R)
                is_weight = torch.clamp(torch.exp(old - rollout_logp), max=args.rollout_is_clip) * mask  # (B, R)
                adv = torch.tensor([r["advantage"] for r in micro], device=device)  # (B,)
                loss, m = policy_loss(
                    logp,
                    old,
                    adv,
                    mask,
                    args.clip_low,
                    args.clip_high,
                    args.clip_c,
                    is_weight,
                    tokens,
                    args.loss_agg,
                    seqs,
                )
                if with_kl:
                    with torch.no_grad():
                        ref, _, _ = logprobs(ref_model, micro, args, pad_id, device)
                    kl = (k3_kl(logp, ref) * mask / loss_denominator(mask, args.loss_agg, tokens, seqs)).sum()
                    loss = loss + args.kl_coef * kl
                    sums.update(kl=kl.detach())
                bad = bad or not torch.isfinite(loss)  # backward still runs (FSDP2 collectives); no update then
                loss.backward()
                n = float(mask.sum())
                with torch.no_grad():  # sums of tensors, not of their graphs
                    sums.update(
                        loss=loss.detach(),
                        entropy=(entropy * mask).sum(),
                        entropy_tokens=n,
                        trained_frac=len(micro),
                        **{k: m[k] * n for k in CLIP_FRACS},
                    )
            grad_norm = sft.apply_update(model, optimizer, args.grad_clip, bad, net)  # None: skipped, not finite
            sums.update(updates=grad_norm is not None, nonfinite_updates=grad_norm is None, grad_norm=grad_norm or 0.0)
    t = sft.sum_over_ranks(sums)
    return dict(
        loss=sft.ratio(t["loss"], t["n_updates"]),
        kl=sft.ratio(t["kl"], t["n_updates"]),
        entropy=sft.ratio(t["entropy"], t["entropy_tokens"]),
        grad_norm=sft.ratio(t["grad_norm"], t["updates"]),
        updates=t["updates"] / t["ranks"],
        nonfinite_updates=t["nonfinite_updates"] / t["ranks"],
        trained_frac=sft.ratio(t["trained_frac"], t["rows"]),
        train_tokens=t["train_tokens"],
        t_old_logprobs=t["t_old_logprobs"] / t["ranks"],
        **{k: sft.ratio(t[k], t["tokens"]) for k in CLIP_FRACS},
    )


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def collect_rollouts(run: sft.Run, step: int) -> tuple[list[dict], list[dict], dict]:
    """This rank's problems of the step, their rollouts graded, with group advantages and places in the step."""
    args, tok, t0 = run.args, run.tokenizer, time.time()
    picked = sft.rows_for_step(len(run.problems), step, args.prompts_per_step, args.seed)
    indices = rollout.shard(list(range(len(picked))), run.rank, run.world)  # this rank's prompts' places
    mine = [run.problems[picked[i]] for i in indices]
    prompts = [
        rollout.chat_prompt(tok, data.format_prompt(p["question"]), system=args.system, thinking=args.thinking)
        for p in mine
    ]
    if any(len(tok(p, add_special_tokens=False)["input_ids"]) > args.max_prompt_len for p in prompts):
        raise ValueError(f"a prompt of step {step} is longer than --max-prompt-len {args.max_prompt_len}")
    params = rollout.SamplingParams(
        n=args.rollouts,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed * 1_000_003 + step * 1009,
    )
    # each prompt seeded by its place in the step: the same rollouts on any number of ranks
    samples = rollout.generate(run.backend, prompts, params, progress=False, indices=indices)
    rollout.sleep_engine(run.backend)  # vllm: its memory goes to training until the weights are pushed
    t_gen = time.time()
    rows = rollout.score_rollouts(samples, mine, args.lenient, tok, args.reward_window)
    advantages = group_advantages([x["reward"] for x in rows], args.rollouts, args.norm_adv_std)
    for i, (x, a) in enumerate(zip(rows, advantages.tolist())):
        x["advantage"], x["place"] = a, indices[i // args.rollouts] * args.rollouts + i % args.rollouts
    return rows, mine, dict(t_generate=t_gen - t0, t_score=time.time() - t_gen)


def rollout_metrics(rows: list[dict], group_size: int) -> dict:
    """The step's rollouts over all ranks: score, lengths (inside and after <think>), E(y), format, groups."""
    sums = Counter()
    for x in rows:
        sums.update(
            n=1,
            score=x["reward"],
            length=x["length"],
            gen_tokens=x["length"],
            answer_length=x["answer_length"],
            think_length=x["length"] - x["answer_length"],
            epistemic=x["epistemic"],
            truncated=x["truncated"],
            closed_think="</think>" in x["text"],
            seq_tokens=len(x["prompt_ids"]) + x["length"],
        )  # bench.py's FLOPs
    groups = torch.tensor([x["reward"] for x in rows]).view(-1, group_size)
    sums.update(groups=len(groups), degenerate_groups=(groups.max(1).values == groups.min(1).values).sum())
    t = sft.sum_over_ranks(sums)
    means = ("score", "length", "think_length", "answer_length", "epistemic", "closed_think", "truncated")
    return dict(
        **{k: sft.ratio(t[k], t["n"]) for k in means},
        degenerate_groups=sft.ratio(t["degenerate_groups"], t["groups"]),
        gen_tokens=t["gen_tokens"],
        seq_tokens=t["seq_tokens"],
    )


def grpo_train_step(run: sft.Run):  # GRPO's update, with a frozen reference policy when --kl-coef > 0
    ref_model = sft.frozen_model(run.args.model, run.args, run.device) if run.args.kl_coef > 0 else None
    pad = run.tokenizer.pad_token_id
    return lambda rows, step_problems: train_on_rollouts(
        run.model, run.optimizer, rows, run.args, run.world, run.device, pad, ref_model, run.compute
    )


def run_loop(args: RLArgs, loss_name: str = "grpo", make_train_step=grpo_train_step):
    """The RL loop; sdpo.py passes its `make_train_step` (the self-distillation loss) and keeps the rest."""
    run = sft.setup(args)
    train_step = make_train_step(run)
    eval_params = rollout.SamplingParams(
        n=args.eval_n,
        temperature=args.eval_temperature,
        top_p=args.eval_top_p,
        top_k=args.eval_top_k,
        max_new_tokens=args.eval_max_new_tokens,
        seed=args.seed + 500_000_000,
    )  # its own seeds
    bar = tqdm(
        range(run.start, args.steps), desc=loss_name, disable=run.rank != 0, initial=run.start, total=args.steps
    )
    metrics, ev = {}, {}
    for step in bar:
        t0 = time.time()
        sft.peak_memory_gb(run.device)  # a new window: this step's peak only
        for group in run.optimizer.param_groups:
            group["lr"] = sft.lr_at(step, args.lr, args.warmup)
        rows, step_problems, times = collect_rollouts(run, step)
        t_train = time.time()
        train_metrics = train_step(rows, step_problems)
        t_train = time.time() - t_train
        if args.save_rollouts:
            rollout.save_rollouts(run.out / "rollouts.jsonl", step + 1, rows, step_problems, args.rollouts, run.world)
        rollout.refresh_weights(run.backend, run.model)  # vllm: push (and wake); a generation replica: copy
        metrics = dict(
            step=step + 1,
            lr=run.optimizer.param_groups[0]["lr"],
            **rollout_metrics(rows, args.rollouts),
            **train_metrics,
            **times,
            t_train=t_train,
        )
        metrics.update(
            rollout_tok_s=metrics["gen_tokens"] / max(times["t_generate"], 1e-9) / run.world,
            train_tok_s=metrics["train_tokens"] / max(t_train, 1e-9) / run.world,
        )  # positions
        if args.eval_every and (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ev = evaluate.evaluate(
                run.backend,
                run.benchmarks,
                eval_params,
                ks=(1,),
                lenient=args.lenient,
                chat=dict(system=args.system, thinking=args.thinking),
                records_to=run.out / "eval_samples.jsonl",
                step=step + 1,
            )
            for name, s in ev.items():
                metrics.update({f"eval/{name}/{k}": v for k, v in s.items() if k in ("acc", "length", "epistemic")})
        metrics.update(t_step=time.time() - t0, peak_mem_gb=sft.peak_memory_gb(run.device))  # eval included
        if run.rank == 0:
            sft.log_metrics(run.out / "metrics.jsonl", metrics, run.wandb)
            bar.set_postfix(
                score=f"{metrics['score']:.3f}",
                len=f"{metrics['length']:.0f}",
                E=f"{metrics['epistemic']:.2f}",
                gnorm=f"{metrics.get('grad_norm') or 0:.3f}",
            )
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            sft.save_checkpoint(
                run.out,
                step + 1,
                run.model,
                run.tokenizer,
                run.optimizer,
                dict(args=asdict(args), loss=loss_name),
                keep=args.keep_checkpoints,
                extra_tensors=run.checkpoint_extra() if run.checkpoint_extra else None,
            )
    lines = [f"{loss_name}: trained to step {args.steps}."]
    lines += [
        f"  {name}: held-out accuracy {s['acc']:.2f} on {s['problems']} problems ({s['samples']} responses), "
        f"{s['length']:.0f} tokens, E(y) {s['epistemic']:.2f}"
        for name, s in ev.items()
    ]  # the last evaluation
    lines += [
        f"  metrics: {run.out / 'metrics.jsonl'}",
        f"  checkpoint: {sft.latest_checkpoint(run.out) or 'none (--save-every 0)'}",
    ]
    rollout.print0("\n".join(lines))
    sft.finish(run)


def main(argv=None):
    rollout.run_main(lambda: run_loop(data.parse_args(Args, argv)))


if __name__ == "__main__":
    rollout.run_script(main)

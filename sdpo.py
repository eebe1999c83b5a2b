"""sdpo.py -- on-policy self-distillation (SDPO), Sec. 5 of arXiv 2603.24472, on grpo.py's loop.

The student samples y ~ pi(.|x); the teacher is the same model conditioned on a richer context c
(a successful sibling rollout, Sec. 5) and scores the student's own tokens. Eq. 1:
    L = sum_t D( pi_theta(.|x, y_<t) , stopgrad pi_teacher(.|x, c, y_<t) )
as the reference code computes it (lasgroup/SDPO, loss_mode: sdpo, which replaces the
policy-gradient loss outright; App. D Table 10):
  - logits / T, log-softmax over the full vocabulary, then the student's top-k (k = 100) indices,
    the teacher gathered at the same indices, plus one "tail" bucket log(1 - sum p_topk) on each
    side (or both renormalised over the top-k without it)              -> `topk_support`
  - D by alpha: 0 forward KL(T || S), 1 reverse KL(S || T), otherwise the generalized JSD with
    M = (1-alpha) S + alpha T: (1-alpha) KL(S || M) + alpha KL(T || M); paper: alpha = 0.5 -> `divergence`
  - per token weight min(exp(clamp(logp - old_logp, -20, 20)), 2), detached; each response's mean over
    its distilled tokens (0 without a context), then the mean over all the mini-batch's responses: rows
    without c count, so the gradient shrinks with their share (verl's compute_self_distillation_loss,
    agg_loss over one response per micro-batch, times 1 / gradient accumulation; --loss-agg token-mean:
    one mean over every distilled token of the mini-batch)                -> `sdpo_loss`, `sdpo_train_step`
  - c (`--teacher-context`): the first successful sibling of the same prompt (reward >= 0.5), the
    sample itself excluded, none -> no loss (Sec. 5, c = s), first in verl's length-balanced batch
    order (--sibling balanced, `balanced_positions`: ray_trainer._balance_batch, then solution_idxs[0]);
    the same with <think> removed
    (c = s\\think); the dataset's reference solution (OPSD); a regenerated correct response (Sec. 3's y_r)
                                                                         -> `teacher_contexts`
  - teacher input: the chat template of `teacher_prompt(question, c)` + the student's response ids;
    App. C's uncertainty-encouraging prompt with --reprompt uncertainty; App. E's OPSD hybrid with
    --teacher-thinking (teacher template thinking on, student off) and --distill-prefix 1024
  - teacher = frozen initial policy (--teacher-ema 0.0, the paper) or an EMA of the student,
    teacher <- (1 - rate) teacher + rate student once per step, kept in fp32 (0.05, Fig. 6) -> `ema_update`
  - App. B.6 metrics: the student-teacher KL per token, overall and on epistemic-marker tokens per
    surface variant (" Wait", "Wait", " wait", ...).

Beyond the paper (remedies for the suppressed epistemic verbalization; commands in the README), one flag each:
  --protect-epistemic  no loss at the tokens where the student's response begins an epistemic marker
                       (the positions App. B.6 finds the teacher disagrees with most) -> `distill_positions`
  --pg-coef L          + L * grpo.py's clipped policy loss on the same rollouts (a GRPO/SDPO hybrid)
  --entropy-weight     each token's loss times the teacher's entropy / log V, so a confident teacher
                       weighs less where it would overwrite an uncertain student      -> `sdpo_loss`

Memory: the loss is computed from hidden states through the LM head in chunks of --chunk positions,
each chunk recomputed in backward, so the largest live tensor is (chunk, V), not (T, V)
(`chunked_distillation`), on one process and under torchrun (FSDP2) alike (`grpo.response_states`).
Measured in bench.py.

Departures, and why:
  1. A model whose LM head is not a plain bias-free Linear (soft-capped or scaled logits) takes the
     same loss from its full logits (`grpo.plain_lm_head`): same values, (T, V) memory.
  2. A teacher prompt longer than --max-reprompt-len is masked rather than truncated (the reference
     truncates it, which can cut the solution mid-way).
  3. "regenerated" contexts (not in the reference trainer) draw one response per group under c = s
     with the current policy and keep it if correct (Sec. 3's y_r).
  4. Environment feedback is off (math has none beyond right/wrong); `teacher_prompt` takes it.
  5. GRPO-only flags (--clip-*, --kl-coef, --norm-adv-std) have no effect here.
  6. Rows without a teacher context (and no --pg-coef term) skip the student's and the teacher's
     forwards (--skip-zero-rows, `grpo.rows_with_gradient`): their gradient is exactly zero, and the
     reference's masked rows give the same update up to float rounding.
  7. Which sibling: verl balances the batch over its data-parallel GPUs (Karmarkar-Karp partitions, each
     ordered short-long-short, concatenated), so its first success depends on the number of GPUs. We use
     its order for one GPU on any number of ranks (--sibling balanced); --sibling first takes rollout order.
  8. The logits are upcast to fp32 before the top-k, the log-softmax and the tail (`grpo.upcast`); the
     reference works on the bf16 logits, which quantizes them (8 significant bits: a logit near 20
     moves in steps of 0.125).

Run it:
    python sdpo.py --lenient                                    # embedded model, easy synthetic problems
    torchrun --nproc_per_node 2 sdpo.py --lenient --steps 2
    python sdpo.py --lenient --teacher-context sibling-no-think  # c = s\\think
    python sdpo.py --lenient --teacher-ema 0.05                  # moving teacher (Fig. 6)
    torchrun --nproc_per_node 8 sdpo.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --backend vllm \\
        --data dapo-math-17k.parquet --prompts-per-step 256 --rollouts 8 --mini-batch 128 --lr 1e-5 \\
        --max-new-tokens 20480 --grad-ckpt --micro-batch 1 --steps 100 \\
        --eval-data aime24.parquet amc23.parquet --eval-every 10 --eval-n 16 --out runs/sdpo-r1
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

import data
import epistemic
import grpo
import rollout
import sft
from rollout import strip_think  # noqa: F401  (public here too: s\think)


@dataclass
class Args(grpo.Args):
    CHECKS: ClassVar[dict] = dict(
        grpo.Args.CHECKS, alpha=data.UNIT, topk=data.NON_NEGATIVE, is_clip=data.POSITIVE,
        teacher_context=("sibling", "sibling-no-think", "dataset", "regenerated"), reprompt=("sdpo", "uncertainty"),
        sibling=("balanced", "first"),
        success_threshold=data.UNIT, teacher_ema=data.UNIT, distill_prefix=data.NON_NEGATIVE,
        max_reprompt_len=data.POSITIVE, pg_coef=data.NON_NEGATIVE)
    out: str = "runs/sdpo"
    """output directory: metrics.jsonl, step_N/ checkpoints"""
    lr: float = 1e-5
    """learning rate (Table 10: 1e-5; App. G: 1e-6)"""
    alpha: float = 0.5
    """divergence: 0 forward KL(T||S), 1 reverse KL(S||T), else generalized JSD (Table 10: Jensen-Shannon, 0.5)"""
    topk: int = 100
    """distil over the student's top-k tokens, 0 = the full vocabulary (Table 10: 100; App. G: 256)"""
    add_tail: bool = True
    """add the tail bucket log(1 - sum p_topk); off = renormalise over the top-k (reference default: on)"""
    is_clip: float = 2.0
    """cap of the importance weight exp(logp - old_logp) (reference: 2)"""
    sibling: str = "balanced"
    """which successful sibling is c: balanced (the first in verl's length-balanced batch order for one GPU, which
    leans to short ones: `balanced_positions`) or first (the first in rollout order)"""
    teacher_context: str = "sibling"
    """c: sibling (c = s, Sec. 5) | sibling-no-think (c = s\\think) | dataset (OPSD) | regenerated (y_r)"""
    reprompt: str = "sdpo"
    """teacher instruction: sdpo ('Correctly solve the original question.') or uncertainty (App. C)"""
    success_threshold: float = 0.5
    """reward at which a sibling counts as a success (reference: 0.5)"""
    teacher_ema: float = 0.0
    """EMA rate of the teacher; 0 = frozen initial policy (the paper's choice; Fig. 6 ablation: 0.05)"""
    teacher_thinking: bool = False
    """OPSD hybrid (App. E): the teacher's template has thinking on while the student's (--thinking) is off"""
    distill_prefix: int = 0
    """distil only the first N response tokens (OPSD: 1024); 0 = all"""
    max_reprompt_len: int = 22528
    """teacher prompts longer than this many tokens are masked (reference: 22528)"""
    # beyond the paper: remedies for the suppression of epistemic verbalization (README, "Remedies")
    protect_epistemic: bool = False
    """remedy: no distillation loss at the response tokens where an epistemic marker begins (off in the paper)"""
    pg_coef: float = 0.0
    """remedy: add grpo.py's policy loss (clipped surrogate, same advantages), weighted by this (0 in the paper)"""
    entropy_weight: bool = False
    """remedy: weight each token's distillation loss by the teacher's entropy / log V (off in the paper)"""


# --------------------------------------------------------------------------------------------
# The math (Eq. 1)
# --------------------------------------------------------------------------------------------
def tail_bucket(logp: torch.Tensor) -> torch.Tensor:
    """Append log(1 - sum exp(logp)) so the top-k pieces are a distribution again. (..., k) -> (..., k+1)"""
    log_s = torch.logsumexp(logp, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logp, torch.log(-torch.expm1(log_s))], dim=-1)


def topk_support(s: torch.Tensor, t: torch.Tensor, topk: int | None, add_tail: bool = True):
    """Student and teacher full-vocabulary log-probs (..., V) on the student's top-k (+ tail) support."""
    if not topk:
        return s, t
    idx = s.detach().topk(topk, dim=-1).indices  # the STUDENT's top-k
    return on_support(s, idx, add_tail), on_support(t, idx, add_tail)


def on_support(logp: torch.Tensor, idx: torch.Tensor, add_tail: bool = True) -> torch.Tensor:
    """Log-probs (..., V) gathered at the support idx (..., k): with the tail bucket, or renormalised."""
    return finish_support(logp.gather(-1, idx), add_tail)


def finish_support(logp_k: torch.Tensor, add_tail: bool = True) -> torch.Tensor:
    """Log-probs already gathered on a support (..., k) made a distribution: + the tail bucket, or renormalised."""
    return tail_bucket(logp_k) if add_tail else logp_k - torch.logsumexp(logp_k, -1, keepdim=True)


def divergence(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-token divergence over the support (last dim) of normalised log-probs s (student), t (teacher)."""
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1)  # KL(p || q), from log-probs
    if alpha == 0.0:
        return kl(t, s)  # forward KL(T || S)
    if alpha == 1.0:
        return kl(s, t)  # reverse KL(S || T)
    a = torch.tensor(alpha, dtype=s.dtype, device=s.device)
    m = torch.logsumexp(torch.stack([s + torch.log(1 - a), t + torch.log(a)]), dim=0)  # log M, M = (1-a) S + a T
    return torch.lerp(kl(s, m), kl(t, m), a)  # (1-a) KL(S || M) + a KL(T || M)


def self_distillation_loss(student_logits, teacher_logits, topk: int | None = 100, alpha: float = 0.5,
                           add_tail: bool = True, temperature: float = 1.0) -> torch.Tensor:
    """Eq. 1 per token from logits (..., V): shape (...). topk=None (or 0) = the full vocabulary.
    The teacher is detached (stopgrad)."""
    s = torch.log_softmax(grpo.upcast(student_logits) / temperature, dim=-1)
    t = torch.log_softmax(grpo.upcast(teacher_logits.detach()) / temperature, dim=-1)
    return divergence(*topk_support(s, t, topk, add_tail), alpha)


def chunked_distillation(student_x, teacher_x, targets, student_w=None, teacher_w=None, topk=100, alpha=0.5,
                         add_tail=True, temperature=1.0, chunk=256) -> torch.Tensor:
    """Per position (N, 5): [divergence, student log-prob of `targets`, KL(S||T) on the support, student entropy,
    teacher entropy / log V] (all but the first two detached).

    student_x / teacher_x are hidden states (N, H) with LM-head weights *_w (V, H), or logits (N, V) when
    the weights are None. Chunks of `chunk` positions; each student chunk is recomputed in backward
    (grpo.ChunkedHead), so only (chunk, V) logits are alive at a time.

    Why `support` and `vjp`: the backward needs only the student's side. The student's top-k indices, the
    teacher's log-probs on them (chunk, k+1) and the student's logsumexp (chunk,) are kept from the forward,
    instead of recomputing the teacher's LM head, the log_softmaxes, the top-k and the entropies. With top-k,
    the loss reads the student's log-probs s = z - logsumexp(z) at k + 1 entries per position, so the gradient
    is written out: autograd over those (chunk, k+1) values, then dL/dz = scatter(dL/ds) - softmax(z) *
    sum(dL/ds) (one exp pass, in place). With topk=0 the teacher's full log-probs would be (chunk, V) each,
    so that path recomputes them and lets autograd differentiate the full log_softmax."""
    scale = (lambda z: z) if temperature == 1.0 else (lambda z: z / temperature)  # skip a (chunk, V) division
    support = {}  # chunk start -> (student's top-k indices, teacher's log-probs on them, student's logsumexp)

    def teacher_logits(tx):  # (c, V) z_T / T, no gradient (stopgrad)
        with torch.no_grad():
            return scale(grpo.upcast(tx @ teacher_w.T if teacher_w is not None else tx))

    def piece(z, start, tx, y):
        z = scale(grpo.upcast(z))
        if torch.is_grad_enabled():  # ChunkedHead's backward, topk=0 only: autograd through the full log_softmax
            s = torch.log_softmax(z, dim=-1)
            loss = divergence(s, torch.log_softmax(teacher_logits(tx), dim=-1), alpha)
            return torch.cat([torch.stack([loss, s.gather(-1, y[:, None]).squeeze(-1)], dim=-1), s.new_zeros(len(s), 3)],
                             dim=-1)
        zt = teacher_logits(tx)
        lse, entropy = grpo.softmax_stats(z)
        lse_t, entropy_t = grpo.softmax_stats(zt)
        if topk:
            idx = z.topk(topk, dim=-1).indices  # the STUDENT's top-k (z and its log-probs have the same order)
            s_sup = finish_support(z.gather(-1, idx) - lse[:, None], add_tail)
            t_sup = finish_support(zt.gather(-1, idx) - lse_t[:, None], add_tail)
            support[start] = (idx, t_sup, lse)
        else:
            s_sup, t_sup = z - lse[:, None], zt - lse_t[:, None]
        logp = z.gather(-1, y[:, None]).squeeze(-1) - lse
        return torch.stack([divergence(s_sup, t_sup, alpha), logp, divergence(s_sup, t_sup, 1.0), entropy,
                            entropy_t / math.log(zt.shape[-1])], dim=-1)  # the teacher's entropy: in [0, 1]

    def vjp(z, start, grad, tx, y):  # top-k only; z is ChunkedHead's fresh (c, V) logits, overwritten here
        idx, t_sup, lse = support[start]
        both = torch.cat([idx, y[:, None]], dim=-1)  # the entries of s the loss reads: the top-k, then the target
        s = (scale(grpo.upcast(z.gather(-1, both))) - lse[:, None]).requires_grad_()  # (c, k+1)
        with torch.enable_grad():
            out = torch.stack([divergence(finish_support(s[:, :-1], add_tail), t_sup, alpha), s[:, -1]], dim=-1)
            (g,) = torch.autograd.grad(out, s, grad[:, :2].to(out.dtype))
        return grpo.log_softmax_vjp(z, lse, temperature, both, g)
    return grpo.ChunkedHead.apply(student_x, student_w, piece, vjp if topk else None, chunk, 5, teacher_x.detach(),
                                  targets)


def sdpo_loss(div, logp, old_logp, rollout_logp, distill, n_distill: float, is_clip: float = 2.0,
              rollout_is_clip: float = 2.0, teacher_entropy=None, pg_coef: float = 0.0, advantages=None,
              n_tokens: float | None = None, clip_low: float = 0.2, clip_high: float = 0.28, clip_c: float = 3.0):
    """The SDPO objective on one micro-batch's response positions, all inputs (N,). Returns (loss, metrics).

    w_t    = min(exp(clamp(logp - old_logp, -20, 20)), is_clip) * min(exp(old_logp - rollout_logp), rollout_is_clip)
    L      = sum_t distill_t w_t e_t D_t / n_distill_t                       (Eq. 1 as the reference computes it)
    e_t    = teacher_entropy_t (H_T / log V) with --entropy-weight, else 1           (remedy 3)
    L     += pg_coef * sum_t grpo.policy_loss's per-token terms / n_tokens_t         (remedy 2)
    distill_t is 0 for rows without a teacher context, beyond --distill-prefix, and at protected
    positions (remedy 1). n_distill / n_tokens: what each position's term is divided by, a number (token-mean:
    the mini-batch's distilled / response positions) or (N,) (seq-mean-token-mean: the position's row's count times
    the rows of the mini-batch; `grpo.loss_denominator`); global counts over the world size under torchrun."""
    rollout_w = torch.clamp(torch.exp(old_logp - rollout_logp), max=rollout_is_clip)  # (N,) detached
    w = torch.exp(torch.clamp(logp.detach() - old_logp, -20.0, 20.0)).clamp(max=is_clip) * rollout_w
    if teacher_entropy is not None:
        w = w * teacher_entropy
    n_distill = torch.as_tensor(n_distill, dtype=div.dtype, device=div.device).clamp(min=1.0)
    distill_loss = (div * w * distill / n_distill).sum()  # Eq. 1
    metrics = dict(distill_loss=float(distill_loss.detach()))
    if not pg_coef:
        return distill_loss, metrics
    n_tokens = torch.as_tensor(float(len(logp)) if n_tokens is None else n_tokens, dtype=logp.dtype, device=logp.device)
    pg, _ = grpo.policy_loss(logp[None], old_logp[None], advantages[None], torch.ones_like(logp)[None], clip_low,
                             clip_high, clip_c, rollout_w[None], token_count=n_tokens)
    metrics["pg_loss"] = float(pg.detach())
    return distill_loss + pg_coef * pg, metrics


def distill_positions(n_response: int, has_context: bool, prefix: int = 0, protected=()) -> list[bool]:
    """Which of a response's positions are distilled: none without a teacher context, the first `prefix`
    (0 = all), and not the `protected` ones (--protect-epistemic)."""
    keep = [has_context and (not prefix or t < prefix) for t in range(n_response)]
    for t in protected:
        if t < n_response:
            keep[t] = False
    return keep


def teacher_prompt(question: str, solution: str | None, feedback: str | None = None, template: str = "sdpo") -> str:
    """The teacher's user turn: the question's prompt + the solution (+ feedback) + the instruction."""
    return rollout.reprompt(question, solution, feedback, template)


def balanced_positions(lengths: list[int]) -> list[int]:
    """Each sequence's position in the order verl's _balance_batch gives a batch on one GPU (ray_trainer.py, before
    the teacher batch is built): sorted by workload 24576 L + L^2 (L = prompt + response tokens), ties by index,
    then the even places ascending and the odd ones descending (short sequences at both ends)."""
    ranked = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))  # the workload grows with L
    order = ranked[0::2] + ranked[1::2][::-1]
    positions = [0] * len(lengths)
    for p, i in enumerate(order):
        positions[i] = p
    return positions


def teacher_contexts(rows: list[dict], problems: list[dict], group_size: int, mode: str = "sibling",
                     threshold: float = 0.5, order: list[int] | None = None) -> list[str | None]:
    """c for each rollout (rows in groups of `group_size`, one group per problem); None = no loss.

    sibling: the first OTHER rollout of the same group with reward >= threshold, first in `order` (a key per
    row, e.g. `balanced_positions`; default: rollout order), as the reference's solution_idxs[0];
    sibling-no-think: the same through strip_think; dataset: the problem's reference solution."""
    out = []
    for i, row in enumerate(rows):
        g = i // group_size
        if mode == "dataset":
            out.append(problems[g].get("solution"))
            continue
        siblings = [j for j in range(g * group_size, (g + 1) * group_size) if j != i and rows[j]["reward"] >= threshold]
        siblings.sort(key=lambda j: j if order is None else order[j])
        s = rows[siblings[0]]["text"] if siblings else None
        out.append(strip_think(s) if s is not None and mode == "sibling-no-think" else s)
    return out


def ema_state(student, saved: dict | None = None) -> dict:
    """The EMA teacher's weights in fp32, sharded as the student's (FSDP2): the student's, or `saved` full tensors.
    Why: the teacher runs in bf16 on GPU, where lerp_ at rate 0.05 rounds most updates back to the old value."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    out = {}
    for name, p in student.named_parameters():
        if saved is None or name not in saved:
            out[name] = p.detach().float().clone()
            continue
        full = saved[name].to(device=p.device, dtype=torch.float32)
        out[name] = distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full
    return out


@torch.no_grad()
def ema_update(ema: dict, teacher, student, rate: float) -> None:
    """ema <- (1 - rate) * ema + rate * student, in fp32 on each rank's shards (`ema_state`); then the teacher's
    weights <- ema, cast to the teacher's dtype. Collective under FSDP2 (full_tensor per parameter)."""
    params = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        ema[name].lerp_(p.detach().float(), rate)
        params[name].copy_(ema[name].full_tensor() if hasattr(ema[name], "full_tensor") else ema[name])


# --------------------------------------------------------------------------------------------
# The train step, plugged into grpo.py's loop
# --------------------------------------------------------------------------------------------
def regenerated_contexts(run, rows, problems, args) -> list[str | None]:
    """Sec. 3's y_r: per group with a success s, one response under c = s; kept as c if it is correct."""
    firsts = {}
    for i, r in enumerate(rows):
        if r["reward"] >= args.success_threshold:
            firsts.setdefault(i // args.rollouts, r["text"])
    groups = sorted(firsts)
    chat = dict(system=args.system, thinking=args.thinking)
    prompts = [rollout.chat_prompt(run.tokenizer, teacher_prompt(problems[g]["question"], firsts[g]), **chat) for g in groups]
    params = rollout.SamplingParams(n=1, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                    seed=args.seed + 7919 * len(rows) + run.rank)
    if run.backend.asleep:  # vllm, put to sleep after the step's rollouts: wake it with the same weights (collective)
        rollout.push_weights_to_vllm(run.backend, run.model)
    samples = rollout.generate(run.backend, prompts, params, progress=False)  # every rank, prompts or not
    rollout.sleep_engine(run.backend)
    y_r = {}
    for s in samples:
        g = groups[s.prompt_index]
        if data.grade(s.text, problems[g]["answer"], lenient=args.lenient) >= args.success_threshold:
            y_r[g] = s.text
    return [y_r.get(i // args.rollouts) for i in range(len(rows))]


def sibling_order(rows: list[dict], world: int) -> list[int]:
    """This rank's rows' positions in `balanced_positions` of the whole step's batch (every rank's rows, by their
    "place"): the same choice on any number of ranks. Collective."""
    mine = [(r["place"], len(r["prompt_ids"]) + len(r["response_ids"])) for r in rows]
    every = mine
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)  # collective
        every = [x for part in parts for x in part]
    every.sort()
    positions = dict(zip((place for place, _ in every), balanced_positions([n for _, n in every])))
    return [positions[place] for place, _ in mine]


def marker_tokens(tokenizer) -> dict[int, str]:
    """token id -> surface form (" Wait", "Wait", " wait", ...) for every vocabulary entry that is one of
    the 10 epistemic markers on its own (App. B.6, Table 6). One pass over the vocabulary."""
    out = {}
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text.strip().lower() in epistemic.MARKERS:
            out[token_id] = text
    return out


def sdpo_train_step(run: grpo.Run):
    """Build the teacher, then return the per-step update that grpo.run_loop calls with the step's rollouts."""
    args, tok, device, world = run.args, run.tokenizer, run.device, run.world
    teacher_path = rollout.resolve_model_path(args.model)
    teacher, _ = rollout.load_model(teacher_path, "auto", device)  # the initial policy
    teacher.requires_grad_(False)
    if args.segment_attention:
        grpo.use_segment_attention(teacher)
    ema = None
    if args.teacher_ema > 0:  # the fp32 EMA, saved with each checkpoint and restored from it
        saved = run.resumed_from / "teacher.safetensors" if run.resumed_from else None
        if saved is not None and saved.exists():
            from safetensors.torch import load_file
            teacher.load_state_dict(load_file(saved), strict=False)  # the EMA teacher as it was at the checkpoint
            ema = ema_state(run.model, load_file(saved))
        else:
            ema = ema_state(run.model)
        run.checkpoint_extra = lambda: {"teacher": {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu()
                                                    for k, v in ema.items()}}  # collective; a tied head is not listed
    variants, pad, chunk = marker_tokens(tok), tok.pad_token_id, sft.chunk_size(args.chunk, device)
    variant_ids = torch.tensor(sorted(variants), dtype=torch.long, device=device)
    teacher_chat = dict(system=args.system, thinking="on" if args.teacher_thinking else args.thinking)
    pieces = {}
    piece = lambda t: pieces.setdefault(t, tok.decode([t]))  # token id -> its text, for --protect-epistemic


    def step(rows, problems):
        if args.teacher_context == "regenerated":
            contexts = regenerated_contexts(run, rows, problems, args)
        else:
            contexts = teacher_contexts(rows, problems, args.rollouts, args.teacher_context, args.success_threshold,
                                        sibling_order(rows, world) if args.sibling == "balanced" else None)
        for i, (r, c) in enumerate(zip(rows, contexts)):
            r["teacher_prompt_ids"] = r["context"] = None
            if c is not None:
                text = rollout.chat_prompt(tok, teacher_prompt(problems[i // args.rollouts]["question"], c,
                                                               template=args.reprompt), **teacher_chat)
                ids = tok(text, add_special_tokens=False)["input_ids"]
                if len(ids) <= args.max_reprompt_len:  # a longer one is masked (departure 2)
                    r["teacher_prompt_ids"], r["context"] = ids, c
        has_c = [r["teacher_prompt_ids"] is not None for r in rows]
        n_protected = 0
        for r in rows:
            protected = ()
            if args.protect_epistemic and r["teacher_prompt_ids"] is not None:  # remedy 1
                protected = epistemic.marker_start_positions([piece(t) for t in r["response_ids"]])
            r["distill"] = distill_positions(len(r["response_ids"]), r["teacher_prompt_ids"] is not None,
                                             args.distill_prefix, protected)
            n_protected += sum(1 for t in protected if t < len(r["distill"]) and
                               (not args.distill_prefix or t < args.distill_prefix))
        per_update, on_policy = grpo.update_plan(len(rows), args, world)
        packed = grpo.packing_limit(run.model, args.pack_tokens) > 0
        has_gradient = None
        if args.skip_zero_rows:  # rows without a distilled position (and no --pg-coef term): zero gradient
            has_gradient = lambda r: any(r["distill"]) or (args.pg_coef and r["advantage"] != 0)
        if not on_policy:
            grpo.attach_old_logprobs(run.model, rows, args, pad, device, has_gradient)
        tot = dict(loss=0.0, tokens=0.0, kl=0.0, entropy=0.0, kl_epi=0.0, n_epi=0.0, grad_norm=0.0, updates=0, bad=0,
                   distill_loss=0.0, pg_loss=0.0, entropy_w=0.0, t_teacher=0.0, rows=0, positions=0,
                   teacher_positions=0)
        kl_by_variant = {}
        for _ in range(args.ppo_epochs):
            for u in range(0, len(rows), per_update):
                update = grpo.by_length(rows[u:u + per_update], by_prompt=packed)
                n_distill = sft.all_reduce_sum(sum(sum(r["distill"]) for r in update))
                n_tokens = sft.all_reduce_sum(sum(len(r["response_ids"]) for r in update))
                n_rows = sft.all_reduce_sum(len(update))  # rows without a context count, with zero loss (verl)
                if has_gradient is not None:
                    update = grpo.rows_with_gradient(update, has_gradient, args.micro_batch, packed)
                tot["rows"] += len(update)
                tot["positions"] += grpo.trained_positions(update)
                tot["teacher_positions"] += sum(len(r["teacher_prompt_ids"] or r["prompt_ids"]) + len(r["response_ids"])
                                                for r in update)
                bad = False
                for micro in grpo.micro_batches(update, args.micro_batch, packed, ranks_even=True):
                    # every rank runs the same forwards and backwards (FSDP2 collectives): rows without a
                    # context that stay in the batch (rows_with_gradient's fillers; every row with
                    # --no-skip-zero-rows) have a zero mask, their own prompt standing in for the teacher's
                    sx, sw, targets, mask = grpo.response_states(run.model, [(r["prompt_ids"], r["response_ids"])
                                                                             for r in micro], pad, device,
                                                                 args.pack_tokens)
                    t0 = time.time()
                    with torch.no_grad():
                        tx, tw, _, _ = grpo.response_states(teacher, [(r["teacher_prompt_ids"] or r["prompt_ids"],
                                                                      r["response_ids"]) for r in micro], pad, device,
                                                            args.pack_tokens)
                    tot["t_teacher"] += time.time() - t0
                    sel = mask.bool()  # (B, R): every response position (the policy loss of --pg-coef needs them all)
                    res = chunked_distillation(sx[sel], tx[sel], targets[sel], sw, tw, args.topk or None, args.alpha,
                                               args.add_tail, args.temperature, chunk)  # (N, 5)
                    flat = lambda key: torch.cat([torch.as_tensor(r[key], dtype=res.dtype) for r in micro]).to(device)
                    distill = flat("distill")  # (N,) the distilled positions, in the order of sel
                    old = res[:, 1].detach() if on_policy else flat("old_logp")
                    adv = torch.cat([torch.full((len(r["response_ids"]),), r["advantage"], dtype=res.dtype)
                                     for r in micro]).to(device)
                    # FSDP2 averages gradients over ranks: world * (local sum / global count) = the global mean;
                    # the zero-weight term keeps a backward through the model when a micro-batch has no tokens
                    if args.loss_agg == "token-mean":
                        d_den, pg_den = n_distill / world, n_tokens / world
                    else:  # seq-mean-token-mean: each position over its row's count, times the rows of the mini-batch
                        row = torch.arange(len(micro), device=device)[:, None].expand_as(mask)[sel]  # (N,)
                        counts = torch.tensor([[max(sum(r["distill"]), 1), max(len(r["response_ids"]), 1)]
                                               for r in micro], dtype=res.dtype, device=device)[row] * (n_rows / world)
                        d_den, pg_den = counts[:, 0], counts[:, 1]
                    loss, parts = sdpo_loss(res[:, 0], res[:, 1], old, flat("rollout_logprobs"), distill, d_den,
                                            args.is_clip, args.rollout_is_clip,
                                            res[:, 4] if args.entropy_weight else None, args.pg_coef, adv,
                                            pg_den, args.clip_low, args.clip_high, args.clip_c)
                    loss = loss + 0.0 * sx.sum()
                    bad = bad or not torch.isfinite(loss)  # the update is then skipped on every rank
                    loss.backward()
                    tot["loss"] += float(loss.detach()) / world
                    tot["distill_loss"] += parts["distill_loss"] / world
                    tot["pg_loss"] += parts.get("pg_loss", 0.0) / world
                    d = distill.bool()
                    tot["tokens"] += float(d.sum())
                    stats = res[d, 2:].detach()  # KL(S||T), entropies: metrics only, on the distilled positions
                    tot["kl"] += float(stats[:, 0].sum())
                    tot["entropy"] += float(stats[:, 1].sum())
                    tot["entropy_w"] += float(stats[:, 2].sum())
                    y = targets[sel][d]
                    at_marker = torch.isin(y, variant_ids)  # the student's token is a marker
                    for tid, kl in zip(y[at_marker].tolist(), stats[at_marker, 0].tolist()):
                        s, n = kl_by_variant.get(variants[tid], (0.0, 0))
                        kl_by_variant[variants[tid]] = (s + kl, n + 1)
                        tot["kl_epi"] += kl
                        tot["n_epi"] += 1
                grad_norm = grpo.apply_update(run.model, run.optimizer, args.grad_clip, bad)
                if grad_norm is None:  # skipped: logged as a non-finite update
                    tot["bad"] += 1
                    continue
                tot["grad_norm"] += grad_norm
                tot["updates"] += 1
        if ema is not None:  # once per step, after all its updates (verl: once per update_policy call)
            ema_update(ema, teacher, run.model, args.teacher_ema)
        n_tok = max(sft.all_reduce_sum(tot["tokens"]), 1.0)
        n_updates = max(args.ppo_epochs * math.ceil(len(rows) / per_update), 1)
        metrics = dict(loss=sft.all_reduce_sum(tot["loss"]) / n_updates,  # Eq. 1 (+ --pg-coef's term)
                       distill_loss=sft.all_reduce_sum(tot["distill_loss"]) / n_updates,
                       pg_loss=sft.all_reduce_sum(tot["pg_loss"]) / n_updates,
                       protected_frac=sft.all_reduce_sum(n_protected) / max(sft.all_reduce_sum(
                           sum(sum(r["distill"]) for r in rows)) + sft.all_reduce_sum(n_protected), 1.0),
                       teacher_entropy=sft.all_reduce_sum(tot["entropy_w"]) / n_tok,
                       masked_frac=1.0 - sft.all_reduce_sum(sum(has_c)) / sft.all_reduce_sum(len(rows)),
                       kl=sft.all_reduce_sum(tot["kl"]) / n_tok, entropy=sft.all_reduce_sum(tot["entropy"]) / n_tok,
                       kl_epistemic=sft.all_reduce_sum(tot["kl_epi"]) / max(sft.all_reduce_sum(tot["n_epi"]), 1.0),
                       teacher_context_len=sft.all_reduce_sum(sum(len(r["teacher_prompt_ids"]) for r in rows if
                                                                  r["teacher_prompt_ids"] is not None))
                       / max(sft.all_reduce_sum(sum(has_c)), 1.0),
                       grad_norm=tot["grad_norm"] / max(tot["updates"], 1), updates=tot["updates"],
                       nonfinite_updates=tot["bad"],
                       teacher_tokens=sft.all_reduce_sum(tot["teacher_positions"]),
                       train_tokens=sft.all_reduce_sum(tot["positions"]),
                       trained_frac=sft.all_reduce_sum(tot["rows"]) / max(sft.all_reduce_sum(len(rows)) *
                                                                          args.ppo_epochs, 1),
                       t_teacher=tot["t_teacher"])
        if world > 1:  # every rank's per-variant sums, merged
            parts = [None] * world
            dist.all_gather_object(parts, kl_by_variant)  # collective
            merged = {}
            for part in parts:
                for v, (s, n) in part.items():
                    merged[v] = (merged.get(v, (0.0, 0))[0] + s, merged.get(v, (0.0, 0))[1] + n)
            kl_by_variant = merged
        metrics.update({f"kl/{v!r}": s / n for v, (s, n) in sorted(kl_by_variant.items())})
        return metrics
    return step


def main(argv=None):
    try:
        grpo.run_loop(data.parse_args(Args, argv), "sdpo", sdpo_train_step)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

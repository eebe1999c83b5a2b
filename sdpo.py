"""sdpo.py -- on-policy self-distillation (SDPO), Sec. 5 of arXiv 2603.24472, on grpo.py's loop.

The student samples y ~ pi(.|x); the teacher, the initial model (frozen) given a richer context c (a successful
sibling rollout), scores the student's own tokens. Eq. 1, as the reference code computes it (lasgroup/SDPO, loss_mode:
sdpo, which replaces the policy-gradient loss; App. D Table 10):
    L = sum_t D( pi_theta(.|x, y_<t) , stopgrad pi_teacher(.|x, c, y_<t) )
  - logits / T, log-softmax, the student's top-k (100) indices, the teacher gathered at them, plus a tail bucket
    log(1 - sum p_topk) on each side                                                       -> `topk_support`
  - D by alpha: 0 forward KL(T || S), 1 reverse KL(S || T), else the generalized JSD with M = (1-alpha) S +
    alpha T: (1-alpha) KL(S || M) + alpha KL(T || M); the paper: alpha = 0.5               -> `divergence`
  - per-token weight min(exp(logp - old_logp), 2) x grpo.py's rollout IS weight w_t, detached; each response's
    mean over its distilled tokens (0 without c), then the mean over the mini-batch's responses    -> `sdpo_loss`
  - c: the first successful sibling (reward >= 0.5) of the prompt, itself excluded, first in verl's length-balanced
    order, none -> no loss (c = s); without <think> (c = s\\think); the dataset's solution (OPSD) -> `teacher_contexts`
  - teacher = the frozen initial policy (the paper) or an fp32 EMA of the student (Fig. 6)   -> `ema_update`
  - App. B.6: the student-teacher KL per token, overall and at each epistemic marker's tokens.
Beyond the paper, three remedies: --protect-epistemic (no loss where a marker begins: `distill_positions`),
--pg-coef L (+ L x grpo.py's policy loss), --entropy-weight (the loss times the teacher's entropy / log V).

Departures, and why:
  1. A teacher prompt longer than --max-reprompt-len is masked, not truncated (which can cut the solution).
  2. No environment feedback (math has none beyond right/wrong). GRPO-only flags have no effect here.
  3. verl's sibling order depends on its number of GPUs: we use its order on the released runs' 4 (--sibling-dp), on
     any number of processes. On the embedded model's rollouts its one-GPU order chose siblings 4.7% and 1.0%
     shorter than the average success (two sets of 4-6 steps); its 4-GPU order +1.3% and -0.7%.
  4. Logits are upcast to fp32 before the top-k; the reference works on bf16 logits.
  5. --fast (the default) computes Eq. 1 from hidden states, the LM head in chunks (fast.distillation_terms),
     and skips rows without a context: the same update up to float rounding.

Copying: the loss (`tail_bucket` to `self_distillation_loss`, and `sdpo_loss`) needs torch alone, and
grpo.policy_loss for --pg-coef; `distillation_terms` (the forwards) needs grpo.response_logits and grpo.upcast;
the teacher contexts (`teacher_contexts`, `karmarkar_karp`, `balanced_positions`) the standard library and
rollout.strip_think (test_the_math_copies_with_torch_alone); the step and the loop need grpo.py and what it needs.

Run it (the paper's GPU commands: README):
    python sdpo.py --lenient --teacher-context sibling-no-think  # c = s\\think; --teacher-ema 0.05: Fig. 6
    torchrun --nproc_per_node 2 sdpo.py --lenient --steps 2 --no-fast  # two ranks, the plain code only
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass

import torch
from transformers.hf_argparser import HfArg

import data
import epistemic
import grpo
import rollout
import sft


@dataclass
class Args(grpo.RLArgs):
    out: str = HfArg(default="runs/sdpo", help="output directory: metrics.jsonl, step_N/ checkpoints")
    lr: float = HfArg(default=1e-5, help="learning rate (Table 10: 1e-5; App. G: 1e-6)")
    alpha: float = HfArg(
        default=0.5,
        help="divergence: 0 forward KL(T||S), 1 reverse KL(S||T), else generalized JSD (Table 10: Jensen-Shannon, "
        "0.5)",
    )
    topk: int = HfArg(
        default=100,
        help="distil over the student's top-k tokens, 0 = the full vocabulary (Table 10: 100; App. G: 256)",
    )
    add_tail: bool = HfArg(
        default=True,
        help="add the tail bucket log(1 - sum p_topk); off = renormalise over the top-k (reference default: on)",
    )
    is_clip: float = HfArg(default=2.0, help="cap of the importance weight exp(logp - old_logp) (reference: 2)")
    teacher_context: str = HfArg(
        default="sibling",
        help="c: sibling (c = s, Sec. 5) | sibling-no-think (c = s\\think) | dataset (OPSD)",
    )
    sibling: str = HfArg(
        default="balanced",
        help="which successful sibling: balanced (first in verl's length-balanced order, `balanced_positions`) or "
        "first (rollout order)",
    )
    sibling_dp: int = HfArg(
        default=4,
        help="balanced: the data-parallel ranks verl balanced the batch over (the released runs: 4 GPUs); the step's "
        "rollouts must split evenly over them",
    )
    reprompt: str = HfArg(
        default="sdpo",
        help="teacher instruction: sdpo ('Correctly solve the original question.') or uncertainty (App. C)",
    )
    success_threshold: float = HfArg(
        default=0.5, help="reward at which a sibling counts as a success (reference: 0.5)"
    )
    teacher_ema: float = HfArg(
        default=0.0,
        help="EMA rate of the teacher; 0 = frozen initial policy (the paper's choice; Fig. 6 ablation: 0.05)",
    )
    teacher_thinking: bool = HfArg(
        default=False,
        help="OPSD hybrid (App. E): the teacher's template has thinking on while the student's (--thinking) is off",
    )
    distill_prefix: int = HfArg(default=0, help="distil only the first N response tokens (OPSD: 1024); 0 = all")
    max_reprompt_len: int = HfArg(
        default=22528, help="teacher prompts longer than this many tokens are masked (reference: 22528)"
    )
    protect_epistemic: bool = HfArg(
        default=False,
        help="remedy: no distillation loss at the response tokens where an epistemic marker begins (off in the paper)",
    )
    pg_coef: float = HfArg(
        default=0.0,
        help="remedy: add grpo.py's policy loss (clipped surrogate, same advantages), weighted by this (0 in the "
        "paper)",
    )
    entropy_weight: bool = HfArg(
        default=False,
        help="remedy: weight each token's distillation loss by the teacher's entropy / log V (off in the paper)",
    )

    def __post_init__(self):
        super().__post_init__()
        data.check(self, "alpha success_threshold teacher_ema", *data.UNIT)
        data.check(self, "topk pg_coef distill_prefix", *data.NON_NEGATIVE)
        data.check(self, "is_clip sibling_dp max_reprompt_len", *data.POSITIVE)
        data.choose(self, "teacher_context", ("sibling", "sibling-no-think", "dataset"))
        data.choose(self, "reprompt", ("sdpo", "uncertainty"))
        data.choose(self, "sibling", ("balanced", "first"))


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
    return finish_support(s.gather(-1, idx), add_tail), finish_support(t.gather(-1, idx), add_tail)


def finish_support(logp_k: torch.Tensor, add_tail: bool = True) -> torch.Tensor:
    """Log-probs already gathered on a support (..., k) made a distribution: + the tail bucket, or renormalised."""
    return tail_bucket(logp_k) if add_tail else logp_k - torch.logsumexp(logp_k, -1, keepdim=True)


def divergence(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-token divergence over the support (last dim) of normalised log-probs s (student), t (teacher)."""

    def kl(p, q):
        return (p.exp() * (p - q)).sum(-1)  # KL(p || q), from log-probs

    if alpha == 0.0:
        return kl(t, s)  # forward KL(T || S)
    if alpha == 1.0:
        return kl(s, t)  # reverse KL(S || T)
    a = torch.tensor(alpha, dtype=s.dtype, device=s.device)
    m = torch.logsumexp(torch.stack([s + torch.log(1 - a), t + torch.log(a)]), dim=0)  # log M, M = (1-a) S + a T
    return torch.lerp(kl(s, m), kl(t, m), a)  # (1-a) KL(S || M) + a KL(T || M)


def self_distillation_loss(
    student_logits,
    teacher_logits,
    topk: int | None = 100,
    alpha: float = 0.5,
    add_tail: bool = True,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Eq. 1 per token from logits (..., V): shape (...). topk=None (or 0) = the full vocabulary.
    The teacher is detached (stopgrad). bf16 logits are upcast to fp32 (fp64 stays)."""

    def up(z):
        return z.to(torch.promote_types(z.dtype, torch.float32))

    s = torch.log_softmax(up(student_logits) / temperature, dim=-1)
    t = torch.log_softmax(up(teacher_logits.detach()) / temperature, dim=-1)
    return divergence(*topk_support(s, t, topk, add_tail), alpha)


def distillation_terms(
    model,
    teacher,
    student_seqs,
    teacher_seqs,
    pad_id: int,
    device,
    topk: int | None = 100,
    alpha: float = 0.5,
    add_tail: bool = True,
    temperature: float = 1.0,
) -> dict:
    """Per response position (row by row), (N,) each: Eq. 1's D, the student's log-prob of its token, KL(S||T) on
    the support, the entropies of the student and of the teacher / log V (the last three detached); its token, its
    row, and `anchor`, a zero that keeps a backward through the model when N = 0. fast.distillation_terms: its twin."""
    s, targets, mask = grpo.response_logits(model, student_seqs, pad_id, device)  # (B, R, V)
    with torch.no_grad():  # stopgrad: the teacher
        t, _, _ = grpo.response_logits(teacher, teacher_seqs, pad_id, device)
    sel = mask.bool()  # (B, R)
    s_sel, t_sel = s[sel], t[sel]  # (N, V)
    logp_s = torch.log_softmax(grpo.upcast(s_sel) / temperature, dim=-1)  # (N, V)
    logp_t = torch.log_softmax(grpo.upcast(t_sel) / temperature, dim=-1)

    def entropy(lp):
        return -(lp.exp() * lp).sum(-1).detach()

    return dict(
        divergence=self_distillation_loss(s_sel, t_sel, topk, alpha, add_tail, temperature),  # Eq. 1
        kl=self_distillation_loss(s_sel, t_sel, topk, 1.0, add_tail, temperature).detach(),  # App. B.6
        logp=logp_s.gather(-1, targets[sel][:, None]).squeeze(-1),
        entropy=entropy(logp_s),
        teacher_entropy=entropy(logp_t) / math.log(t.shape[-1]),
        targets=targets[sel],
        row=torch.arange(len(mask), device=mask.device)[:, None].expand_as(mask)[sel],
        anchor=0.0 * s.sum(),
    )


def sdpo_loss(
    div,
    logp,
    old_logp,
    rollout_logp,
    distill,
    n_distill: float,
    is_clip: float = 2.0,
    rollout_is_clip: float = 2.0,
    teacher_entropy=None,
    pg_coef: float = 0.0,
    advantages=None,
    n_tokens: float | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float = 3.0,
):
    """The SDPO objective on one micro-batch's response positions, all inputs (N,). Returns (loss, metrics).
    w_t    = min(exp(clamp(logp - old_logp, -20, 20)), is_clip) * min(exp(old_logp - rollout_logp), rollout_is_clip)
    L      = sum_t distill_t w_t e_t D_t / n_distill_t                       (Eq. 1 as the reference computes it)
    e_t    = teacher_entropy_t (H_T / log V) with --entropy-weight, else 1           (remedy 3)
    L     += pg_coef * sum_t grpo.policy_loss's per-token terms / n_tokens_t         (remedy 2)
    distill_t: 0 without a context, past --distill-prefix, at protected positions (remedy 1). n_distill / n_tokens:
    each position's divisor, a number (token-mean) or (N,) (seq-mean-token-mean), as `grpo.loss_denominator`
    defines them (micro_loss builds them per position)."""
    rollout_w = torch.clamp(torch.exp(old_logp - rollout_logp), max=rollout_is_clip)  # (N,) detached
    w = torch.exp(torch.clamp(logp.detach() - old_logp, -20.0, 20.0)).clamp(max=is_clip) * rollout_w
    if teacher_entropy is not None:
        w = w * teacher_entropy
    n_distill = torch.as_tensor(n_distill, dtype=div.dtype, device=div.device).clamp(min=1.0)
    distill_loss = (div * w * distill / n_distill).sum()  # Eq. 1
    metrics = dict(distill_loss=float(distill_loss.detach()))
    if not pg_coef:
        return distill_loss, metrics
    n_tokens = torch.as_tensor(
        float(len(logp)) if n_tokens is None else n_tokens, dtype=logp.dtype, device=logp.device
    )
    pg, _ = grpo.policy_loss(
        logp[None],
        old_logp[None],
        advantages[None],
        torch.ones_like(logp)[None],
        clip_low,
        clip_high,
        clip_c,
        rollout_w[None],
        token_count=n_tokens,
    )
    metrics["pg_loss"] = float(pg.detach())
    return distill_loss + pg_coef * pg, metrics


def distill_positions(n_response: int, has_context: bool, prefix: int = 0, protected=()) -> list[bool]:
    """Which of a response's positions are distilled: none without a teacher context, the first `prefix`
    (0 = all), and not the `protected` ones (--protect-epistemic)."""
    protected = set(protected)
    return [has_context and (not prefix or t < prefix) and t not in protected for t in range(n_response)]


DISTILLED = ("kl", "entropy", "teacher_entropy")  # sdpo_step's metrics over the distilled positions


# --------------------------------------------------------------------------------------------
# SDPO's teacher contexts (Sec. 5: c = s, c = s\\think, the dataset's solution)
# --------------------------------------------------------------------------------------------
def karmarkar_karp(values: list[int], k: int) -> list[list[int]]:
    """verl's split of `values` into k sets of len / k items each with near-equal sums (the largest differencing
    method, verl/utils/seqlen_balancing.py get_seqlen_balanced_partitions with equal_size=True), ties broken as there.

    The values, sorted ascending with their indices, are cut into runs of k; each run is a state of k one-item sets.
    Then, repeatedly, the two states with the largest spread (largest set sum minus smallest; ties: the larger
    largest set) merge, the i-th largest set of one with the i-th smallest of the other, until one state is left.
    A set compares by (sum, item count, its (index, value) items). Returns its k sets, largest sum first, each as
    sorted indices."""
    if k < 1 or len(values) % k:
        raise ValueError(f"{len(values)} sequences do not split into {k} equal parts")

    def by_size(s):
        return s[0], len(s[1]), s[1]

    class State:  # k sets (sum, [(index, value), ...]), largest first
        def __init__(self, sets):
            self.sets = sorted(sets, key=by_size, reverse=True)
            self.spread = self.sets[0][0] - self.sets[-1][0]

        def __lt__(self, other):  # heapq pops the smallest: here the largest spread, then the largest first set
            if self.spread != other.spread:
                return self.spread > other.spread
            return by_size(self.sets[0]) > by_size(other.sets[0])

    ranked = sorted((v, i) for i, v in enumerate(values))
    heap = [State([(v, [(i, v)]) for v, i in ranked[j : j + k]]) for j in range(0, len(ranked), k)]
    heapq.heapify(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        heapq.heappush(heap, State([(x[0] + y[0], x[1] + y[1]) for x, y in zip(a.sets, reversed(b.sets))]))
    return [sorted(i for i, _ in s[1]) for s in heap[0].sets] if heap else [[] for _ in range(k)]


def balanced_positions(lengths: list[int], ranks: int = 4) -> list[int]:
    """Each sequence's position in the order verl's _balance_batch gives a step's batch (ray_trainer.py, before the
    teacher batch is built) with `ranks` data-parallel ranks (the released runs: 4 GPUs): workloads
    24576 L + L^2 (L = prompt + response tokens) split into `ranks` equal-size parts (`karmarkar_karp`), each part
    sorted by (workload, index) and laid out even places ascending, odd ones descending (short ones at both ends),
    the parts one after another."""
    work = [24576 * n + n * n for n in lengths]
    order = []
    for part in karmarkar_karp(work, ranks):
        part = sorted(part, key=lambda i: (work[i], i))
        order += part[0::2] + part[1::2][::-1]
    positions = [0] * len(lengths)
    for p, i in enumerate(order):
        positions[i] = p
    return positions


def teacher_contexts(
    rows: list[dict],
    problems: list[dict],
    group_size: int,
    mode: str = "sibling",
    threshold: float = 0.5,
    order: list[int] | None = None,
) -> list[str | None]:
    """c for each rollout (rows in groups of `group_size`, one group per problem); None = no loss.

    sibling: the first OTHER rollout of the same group with reward >= threshold, first in `order` (a key per
    row, e.g. `balanced_positions`; default: rollout order), as the reference's solution_idxs[0];
    sibling-no-think: the same through rollout.strip_think; dataset: the problem's reference solution."""
    out = []
    for i in range(len(rows)):
        g = i // group_size
        if mode == "dataset":
            out.append(problems[g].get("solution"))
            continue
        siblings = [
            j for j in range(g * group_size, (g + 1) * group_size) if j != i and rows[j]["reward"] >= threshold
        ]
        siblings.sort(key=lambda j: j if order is None else order[j])
        s = rows[siblings[0]]["text"] if siblings else None
        out.append(rollout.strip_think(s) if s is not None and mode == "sibling-no-think" else s)
    return out


def sibling_order(rows: list[dict], world: int, ranks: int = 4) -> list[int]:
    """This rank's rows' positions in `balanced_positions` (over `ranks` verl ranks) of the whole step's batch (every
    rank's rows, by their "place"): the same choice on any number of processes here. Collective."""
    mine = [(r["place"], len(r["prompt_ids"]) + len(r["response_ids"])) for r in rows]
    every = mine
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)  # collective
        every = [x for part in parts for x in part]
    every.sort()
    positions = dict(zip((place for place, _ in every), balanced_positions([n for _, n in every], ranks)))
    return [positions[place] for place, _ in mine]


def attach_teacher_prompts(run, rows: list[dict], problems: list[dict], args) -> None:
    """The teacher's input for each rollout: row["context"], its c (--teacher-context: `teacher_contexts`), and
    row["teacher_prompt_ids"], the chat template of rollout.reprompt(question, c); both None without a c, or when the
    prompt is longer than --max-reprompt-len (masked: the reference truncates it)."""
    order = sibling_order(rows, run.world, args.sibling_dp) if args.sibling == "balanced" else None
    contexts = teacher_contexts(rows, problems, args.rollouts, args.teacher_context, args.success_threshold, order)
    chat = dict(system=args.system, thinking="on" if args.teacher_thinking else args.thinking)
    for i, (r, c) in enumerate(zip(rows, contexts)):
        r["teacher_prompt_ids"] = r["context"] = None
        if c is not None:
            text = rollout.chat_prompt(
                run.tokenizer,
                rollout.reprompt(problems[i // args.rollouts]["question"], c, template=args.reprompt),
                **chat,
            )
            ids = run.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= args.max_reprompt_len:
                r["teacher_prompt_ids"], r["context"] = ids, c


# --------------------------------------------------------------------------------------------
# The EMA teacher (Fig. 6; the paper's runs keep the initial policy)
# --------------------------------------------------------------------------------------------
def fp32_shards(model, saved: dict | None = None) -> dict:
    """An fp32 copy of the model's parameters, sharded as they are (FSDP2): theirs, or the `saved` full tensors
    (the EMA teacher, which a bf16 copy would not hold)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for name, p in model.named_parameters():
        if saved is None or name not in saved:
            out[name] = p.detach().float().clone()
            continue
        full = saved[name].to(device=p.device, dtype=torch.float32)
        out[name] = distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full
    return out


def ema_weights(run: sft.Run, teacher) -> dict:
    """The EMA teacher (--teacher-ema): its fp32 weights (`fp32_shards`), restored with the teacher from the
    checkpoint a run resumes (OUT/step_N/teacher/, a HF directory of its own), and saved inside every checkpoint
    after. Never as a second top-level *.safetensors: vLLM would load it over the policy
    (`sft.save_checkpoint`)."""
    saved = None
    if run.resumed_from is not None and (run.resumed_from / "teacher" / "model.safetensors").exists():
        from safetensors.torch import load_file

        saved = load_file(run.resumed_from / "teacher" / "model.safetensors")
        teacher.load_state_dict(saved, strict=False)  # the EMA teacher as it was at the checkpoint
    ema = fp32_shards(run.model, saved)
    run.checkpoint_extra = lambda: {
        "teacher": {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu() for k, v in ema.items()}
    }  # collective; a tied head is not listed
    return ema


@torch.no_grad()
def ema_update(ema: dict, teacher, student, rate: float) -> None:
    """The EMA teacher (Fig. 6): ema <- (1 - rate) * ema + rate * student, in fp32 on each rank's shards
    (`fp32_shards`; in bf16, lerp_ at rate 0.05 rounds most updates away); then teacher <- ema. Collective."""
    params = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        ema[name].lerp_(p.detach().float(), rate)
        params[name].copy_(ema[name].full_tensor() if hasattr(ema[name], "full_tensor") else ema[name])


# --------------------------------------------------------------------------------------------
# The step, plugged into grpo.py's loop
# --------------------------------------------------------------------------------------------
def attach_distill_positions(rows: list[dict], args: Args, tokenizer) -> int:
    """Each row's distilled positions. Returns how many --protect-epistemic removes."""
    n_protected = 0
    for r in rows:
        n, c = len(r["response_ids"]), r["context"] is not None
        pieces = tokenizer.batch_decode([[t] for t in r["response_ids"]]) if c and args.protect_epistemic else []
        marks = epistemic.marker_start_positions(pieces)  # remedy 1
        r["distill"] = distill_positions(n, c, args.distill_prefix, marks)
        n_protected += sum(distill_positions(n, c, args.distill_prefix)) - sum(r["distill"])
    return n_protected


def terms_of(model, teacher, micro: list[dict], args: Args, pad_id: int, device) -> dict:
    """`distillation_terms` (fast.py's under --fast): the student on (x, y), the teacher on (x with c, y), under
    --dtype's autocast."""
    seqs = (
        [(r["prompt_ids"], r["response_ids"]) for r in micro],
        [(r["teacher_prompt_ids"] or r["prompt_ids"], r["response_ids"]) for r in micro],  # no c: the student's prompt
        pad_id,
        device,
    )
    loss = dict(topk=args.topk or None, alpha=args.alpha, add_tail=args.add_tail, temperature=args.temperature)
    with rollout.autocast(args.dtype, device):
        if not args.fast:
            return distillation_terms(model, teacher, *seqs, **loss)
        import fast

        return fast.distillation_terms(
            model,
            teacher,
            *seqs,
            args.pack_tokens,
            sft.chunk_size(args.chunk, device),
            divergence=divergence,
            finish_support=finish_support,
            **loss,
        )


def micro_loss(terms: dict, micro: list[dict], n: dict, args: Args, on_policy: bool):
    """`sdpo_loss` on a micro-batch's positions; n: the mini-batch's counts. Returns (loss, metrics, distill)."""
    dtype, device = terms["logp"].dtype, terms["logp"].device

    def flat(key):
        return torch.cat([torch.as_tensor(r[key], dtype=dtype) for r in micro]).to(device)  # (N,)

    distill = flat("distill")
    old = terms["logp"].detach() if on_policy else flat("old_logp")
    adv = torch.cat([torch.full((len(r["response_ids"]),), float(r["advantage"]), dtype=dtype) for r in micro])
    weight = terms["teacher_entropy"] if args.entropy_weight else None  # remedy 3

    def per_row(counts):
        return torch.tensor(counts, dtype=dtype, device=device).clamp(min=1)[terms["row"]] * n["rows"]

    d_den, pg_den = (
        (n["distill"], n["tokens"])
        if args.loss_agg == "token-mean"
        else (per_row([sum(r["distill"]) for r in micro]), per_row([len(r["response_ids"]) for r in micro]))
    )  # seq-mean
    loss, parts = sdpo_loss(
        terms["divergence"],
        terms["logp"],
        old,
        flat("rollout_logprobs"),
        distill,
        d_den,
        args.is_clip,
        args.rollout_is_clip,
        weight,
        args.pg_coef,
        adv.to(device),
        pg_den,
        args.clip_low,
        args.clip_high,
        args.clip_c,
    )
    return loss + terms["anchor"], parts, distill.bool()


def sdpo_step(run: sft.Run, teacher, ema, variants: dict, rows: list[dict], problems: list[dict]) -> dict:
    """SDPO's updates on one step's rollouts; returns the step's metrics."""
    args, world, device, pad = run.args, run.world, run.device, run.tokenizer.pad_token_id
    compute = run.model if run.compute is None else run.compute  # the forwards' module: sft.bf16_compute_copy
    attach_teacher_prompts(run, rows, problems, args)  # contexts c (Sec. 5)
    n_protected = attach_distill_positions(rows, args, run.tokenizer)
    per_update, on_policy = grpo.update_plan(len(rows), args, world)

    def has_gradient(r):
        return any(r["distill"]) or (args.pg_coef and r["advantage"] != 0)

    if not on_policy:
        grpo.attach_old_logprobs(compute, rows, args, pad, device, has_gradient)
    sums, with_c = Counter(), [r for r in rows if r["context"] is not None]  # the step's metrics on this rank
    sums.update(
        ranks=1,
        protected_frac=n_protected,
        protectable=n_protected + sum(sum(r["distill"]) for r in rows),
        rows=len(rows),
        masked_frac=len(rows) - len(with_c),  # rows without c: no successful sibling, or over --max-reprompt-len
        with_c=len(with_c),
        teacher_context_len=sum(len(r["teacher_prompt_ids"]) for r in with_c),
    )
    for _ in range(args.ppo_epochs):
        for u in range(0, len(rows), per_update):
            update = rows[u : u + per_update]
            # every row counts, with zero loss without a context (verl); / world: FSDP2 averages over ranks
            n = dict(
                distill=sum(sum(r["distill"]) for r in update),
                rows=len(update),
                tokens=sum(len(r["response_ids"]) for r in update),
            )
            n = {k: sft.all_reduce_sum(v) / world for k, v in n.items()}
            sums.update(n_updates=1, update_rows=len(update))
            micros, bad = grpo.micro_batches(update, args, compute, has_gradient), False
            sums.update(train_tokens=grpo.trained_positions(micros))
            for micro in micros:
                terms = terms_of(compute, teacher, micro, args, pad, device)  # forwards: (N,) per position
                loss, parts, d = micro_loss(terms, micro, n, args, on_policy)  # Eq. 1 (+ remedies)
                bad = bad or not torch.isfinite(loss)  # the update is then skipped on every rank
                loss.backward()
                with torch.no_grad():  # sums of tensors, not of their graphs
                    sums.update(
                        loss=loss.detach(),
                        distill_loss=parts["distill_loss"],
                        pg_loss=parts.get("pg_loss", 0.0),
                        trained_frac=len(micro),
                        tokens=d.sum(),
                        **{k: terms[k][d].sum() for k in DISTILLED},
                        teacher_tokens=sum(
                            len(r["teacher_prompt_ids"] or r["prompt_ids"]) + len(r["response_ids"]) for r in micro
                        ),
                    )
                for token, kl in zip(terms["targets"][d].tolist(), terms["kl"][d].tolist()):  # App. B.6
                    if token in variants:
                        sums.update(
                            **{
                                "kl_epistemic": kl,
                                "n_epi": 1,
                                f"kl/{variants[token]!r}": kl,
                                f"n/{variants[token]!r}": 1,
                            }
                        )
            grad_norm = sft.apply_update(run.model, run.optimizer, args.grad_clip, bad, compute)  # None: skipped
            sums.update(updates=grad_norm is not None, nonfinite_updates=grad_norm is None, grad_norm=grad_norm or 0.0)
    if ema is not None:  # once per step, after all its updates (verl: once per update_policy call)
        ema_update(ema, teacher, run.model, args.teacher_ema)
    sums.update(t_teacher=sft.forward_seconds(teacher))
    t = sft.sum_over_ranks(sums)
    return dict(
        **{k: sft.ratio(t[k], t["n_updates"]) for k in ("loss", "distill_loss", "pg_loss")},
        **{k: sft.ratio(t[k], t["tokens"]) for k in DISTILLED},
        protected_frac=sft.ratio(t["protected_frac"], t["protectable"]),
        masked_frac=sft.ratio(t["masked_frac"], t["rows"]),
        kl_epistemic=sft.ratio(t["kl_epistemic"], t["n_epi"]),
        teacher_context_len=sft.ratio(t["teacher_context_len"], t["with_c"]),
        grad_norm=sft.ratio(t["grad_norm"], t["updates"]),
        updates=t["updates"] / t["ranks"],
        nonfinite_updates=t["nonfinite_updates"] / t["ranks"],
        teacher_tokens=t["teacher_tokens"],
        train_tokens=t["train_tokens"],
        trained_frac=sft.ratio(t["trained_frac"], t["update_rows"]),
        t_teacher=t["t_teacher"] / t["ranks"],
        **{k: t[k] / t["n/" + k[3:]] for k in t if k.startswith("kl/")},  # App. B.6: per marker variant, where met
    )


def sdpo_train_step(run: sft.Run):
    """The teacher (the initial policy, frozen or EMA), and the update grpo.run_loop calls with each step's
    rollouts."""
    args = run.args
    if args.sibling == "balanced" and args.prompts_per_step * args.rollouts % args.sibling_dp:
        raise ValueError(
            f"--sibling-dp {args.sibling_dp}: verl splits a step's {args.prompts_per_step} x "
            f"{args.rollouts} rollouts evenly over its ranks; choose a divisor"
        )
    teacher = sft.timed(sft.frozen_model(args.model, args, run.device))
    ema = ema_weights(run, teacher) if args.teacher_ema > 0 else None  # fp32, saved with each checkpoint
    variants = epistemic.marker_tokens(run.tokenizer)  # token id -> surface form (" Wait", ...)
    return lambda rows, problems: sdpo_step(run, teacher, ema, variants, rows, problems)


def main(argv=None):
    rollout.run_main(lambda: grpo.run_loop(data.parse_args(Args, argv), "sdpo", sdpo_train_step))


if __name__ == "__main__":
    rollout.run_script(main)

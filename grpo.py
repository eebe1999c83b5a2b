"""grpo.py -- GRPO, the RLVR baseline of Sec. 5, with the paper's hyperparameters (App. D, Tables 8-9).

Each step: sample --prompts-per-step problems, --rollouts n responses each, grade them (App. D
reward), turn rewards into group advantages, and minimise the clipped surrogate:
    A_i = r_i - mean(r_group)                                  (no std division, as the paper's code)
    ratio_t = exp(clamp(log pi(y_t) - log pi_old(y_t), -20, 20))
    l_t = max(-A ratio_t, -A clip(ratio_t, 1 - 0.2, 1 + 0.28))  (clip low / clip high)
    l_t = min(l_t, -A * 3.0)   when A < 0                       (dual clip, c = 3)
    w_t = min(exp(log pi_old(y_t) - log pi_rollout(y_t)), 2)    (rollout importance-sampling correction)
    loss = mean over the mini-batch's responses y of sum_{t in y} w_t l_t / |y|
                                            (--loss-agg seq-mean-token-mean, `loss_denominator`)
with no KL term by default (Table 9: lambda = 0); --kl-coef adds the k3 estimator against the
initial policy, aggregated alike. Functions: `group_advantages`, `policy_loss`, `token_logprobs`, `k3_kl`.
The aggregation is verl's as the paper ran it (checked against beanie00/self-distillation-analysis):
ppo_micro_batch_size_per_gpu 1, each micro-batch's loss a token mean (core_algos.agg_loss "token-mean" over
that one response) times 1 / gradient accumulation (dp_actor.update_policy, loss_scale_factor), FSDP averaging
over GPUs: every response weighs the same, whatever its length. --loss-agg token-mean makes every token of
the mini-batch weigh the same instead (shorter responses then count less).

Departures, and why:
  1. When the step is on-policy (--ppo-epochs 1 and one mini-batch), pi_old is the current policy
     detached: the separate no-grad forward verl makes would give the same numbers.
  2. verl with larger micro-batches would take each micro-batch's token mean; we take each response's (its
     behaviour at the paper's micro-batch of 1) on any micro-batch, packing and number of ranks.
  3. With --backend hf under torchrun, each rank generates with a plain (unsharded) replica of the
     policy, refreshed from the FSDP shards after every step (`sync_replica`): FSDP2 forwards are
     collectives and ranks decode different lengths. With one process the policy generates itself.
     With --backend vllm, each rank's engine sleeps while the trainer runs (--vllm-sleep) and wakes with
     the trainer's weights (`rollout.push_weights_to_vllm`); its length is sized by `rollout.trainer_engine_length`.
  4. CPU-scale defaults (4 prompts x 8 rollouts, 128 new tokens) instead of Table 8's 256 x 8 and
     20480; the paper's values are in each flag's help and in the README's GPU recipe.
  5. Training forwards pack a prompt's rollouts after one copy of it (--pack-tokens, `pack_batch`), and
     attend response by response (--segment-attention, `segment_attention`): the same log-probs and
     gradients as one padded row per rollout, up to float rounding.
  6. Rows of zero advantage (groups all right or all wrong, without KL) are not run through the
     training forwards (--skip-zero-rows, `rows_with_gradient`): their gradient is exactly zero and
     they stay in the loss's means, so the update is verl's up to float rounding.
  7. A mini-batch (--mini-batch problems) holds whole groups, in the step's problem order; verl splits each
     GPU's length-balanced share of the batch (ray_trainer._balance_batch), so with several mini-batches a
     step its updates see other mixes of rows. One mini-batch a step (on-policy) is the same either way.
  8. Log-probs come from fp32 logits (`upcast`); verl computes them from the bf16 logits under FSDP's
     mixed precision.
  9. The learning rate follows verl's constant schedule with warmup (`sft.lr_at`: step k gets lr * k / 10,
     so step 0 gets 0), set once per step.

Run it:
    python grpo.py --lenient                                        # embedded model, easy synthetic problems
    torchrun --nproc_per_node 2 grpo.py --lenient --steps 2
    python grpo.py --lenient --steps 20 --resume                    # continue the run in --out
    # the paper (Sec. 5.1), 8 GPUs per node:
    torchrun --nproc_per_node 8 grpo.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --backend vllm \\
        --data dapo-math-17k.parquet --prompts-per-step 256 --rollouts 8 --mini-batch 128 --lr 1e-6 \\
        --max-new-tokens 20480 --temperature 1.0 --grad-ckpt --micro-batch 1 --steps 100 \\
        --eval-data aime24.parquet amc23.parquet --eval-every 10 --eval-n 16 --out runs/grpo-r1
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import data
import epistemic
import evaluate
import rollout
import sft
from sft import plain_lm_head  # noqa: F401  (grpo.plain_lm_head: the head test of response_states)


LOSS_AGGS = ("seq-mean-token-mean", "token-mean")  # --loss-agg; `loss_denominator`


@dataclass
class Args:
    CHECKS: ClassVar[dict] = dict(  # data.check_args: a value outside these is refused, naming its flag
        coverage=data.NON_NEGATIVE, steps=data.NON_NEGATIVE, prompts_per_step=data.POSITIVE, rollouts=data.POSITIVE,
        mini_batch=data.NON_NEGATIVE, ppo_epochs=data.POSITIVE, micro_batch=data.POSITIVE, pack_tokens=data.NON_NEGATIVE,
        lr=data.NON_NEGATIVE, warmup=data.NON_NEGATIVE, weight_decay=data.NON_NEGATIVE, grad_clip=data.POSITIVE,
        clip_low=(lambda v: 0 <= v < 1, "in [0, 1)"), clip_high=data.NON_NEGATIVE, clip_c=(lambda v: v > 1, "> 1"),
        rollout_is_clip=data.POSITIVE, kl_coef=data.NON_NEGATIVE, temperature=data.POSITIVE,
        max_new_tokens=data.POSITIVE, max_prompt_len=data.POSITIVE, eval_every=data.NON_NEGATIVE, eval_n=data.POSITIVE,
        eval_max_new_tokens=data.POSITIVE, eval_temperature=data.NON_NEGATIVE, eval_top_p=data.FRACTION,
        eval_top_k=data.NON_NEGATIVE, save_every=data.NON_NEGATIVE, backend=data.BACKENDS,
        gen_batch_size=data.POSITIVE, vllm_gpu_memory=data.FRACTION, vllm_sleep=(0, 1, 2), chunk=data.NON_NEGATIVE,
        keep_checkpoints=data.NON_NEGATIVE, thinking=data.THINKING, loss_agg=LOSS_AGGS)
    model: str = rollout.EMBEDDED
    """initial policy: Hugging Face id or directory, or 'smollm2-135m'"""
    data: str = "synthetic:difficulty=1,types=add+sub+mul+div,n=256"
    """training problems (the paper: DAPO-Math-17k)"""
    coverage: int = 0
    """train on this many distinct problems of --data, drawn by --seed (Sec. 6.2's |D|); 0 = all"""
    eval_data: list[str] = field(default_factory=lambda: ["synthetic:split=ood,difficulty=1,n=16"])
    """held-out benchmarks for --eval-every (the paper: AIME24, AMC23)"""
    out: str = "runs/grpo"
    """output directory: metrics.jsonl, step_N/ checkpoints"""
    steps: int = 10
    """training steps"""
    prompts_per_step: int = 4
    """problems per step, over all ranks (Table 8 question batch: 256)"""
    rollouts: int = 8
    """responses per problem, the group size (Table 8: 8)"""
    mini_batch: int = 0
    """problems per optimizer update; 0 = all of the step's (Table 8: 64 or 128)"""
    ppo_epochs: int = 1
    """passes over the step's rollouts (verl default: 1)"""
    micro_batch: int = 4
    """sequences per forward/backward on one rank (memory knob). 4: with packed rows a micro-batch of 4 is one
    row of ~500 positions here, already large enough for the matmuls; bench.py's steps peaked ~1.0 GB (GRPO)
    and ~1.2 GB (SDPO) lower than with 8, at the same speed within the machine's noise"""
    skip_zero_rows: bool = True
    """leave out of the training forward and backward the rows whose loss terms are all zero (GRPO: zero advantage
    and no KL; SDPO: no distilled position and no --pg-coef term): their gradient is exactly zero
    (grpo.rows_with_gradient). GRPO's logged entropy then covers the rows trained on"""
    pack_tokens: int = 2048
    """training forwards: a prompt's rollouts share one copy of it in a row of at most this many tokens, under a
    block attention mask (grpo.pack_batch); 0 = one padded row per rollout"""
    segment_attention: bool = True
    """packed rows attend response by response (grpo.segment_attention) instead of one sdpa call over the whole
    row's block mask, which computes every masked pair too; the same values up to float rounding"""
    lr: float = 1e-6
    """learning rate (Table 9: 1e-6)"""
    warmup: int = 10
    """linear warmup steps (Table 8: 10)"""
    weight_decay: float = 0.01
    """AdamW weight decay (Table 8: 0.01)"""
    grad_clip: float = 1.0
    """gradient clip norm (Table 8: 1.0)"""
    clip_low: float = 0.2
    """PPO clip epsilon-low (verl: 0.2)"""
    clip_high: float = 0.28
    """PPO clip epsilon-high (Table 9: 0.28)"""
    clip_c: float = 3.0
    """dual-clip constant for negative advantages (verl: 3.0)"""
    rollout_is_clip: float = 2.0
    """cap of the rollout importance-sampling weight (Table 9: 2)"""
    loss_agg: str = "seq-mean-token-mean"
    """loss aggregation: seq-mean-token-mean (each response's token mean, then the mean over the mini-batch's responses:
    the paper's runs, verl with one response per micro-batch) or token-mean (every token of the mini-batch weighs
    the same)"""
    kl_coef: float = 0.0
    """k3 KL penalty against the initial policy (Table 9: 0.0)"""
    norm_adv_std: bool = False
    """divide advantages by the group's std (the paper's code does not)"""
    temperature: float = 1.0
    """rollout temperature (Table 8: 1.0)"""
    max_new_tokens: int = 128
    """response budget (Table 8: 20480)"""
    max_prompt_len: int = 2048
    """prompts longer than this are refused (Table 8: 2048)"""
    lenient: bool = False
    """grade the last number when a response has no \\boxed{} (for the embedded model; not the paper's reward)"""
    eval_every: int = 0
    """evaluate on --eval-data every this many steps (0 = only at the end)"""
    eval_n: int = 4
    """samples per eval problem (the paper: 16)"""
    eval_max_new_tokens: int = 128
    """eval response budget (Table 11: 38912)"""
    eval_temperature: float = 0.6
    """eval sampling temperature (Table 11: 0.6; Qwen3-8B thinking off: 0.7)"""
    eval_top_p: float = 0.95
    """eval nucleus (Table 11: 0.95; Qwen3-8B thinking off: 0.8)"""
    eval_top_k: int = 20
    """eval top-k, 0 = off (Table 11: 20)"""
    save_rollouts: bool = False
    """append each step's rollouts to OUT/rollouts.jsonl: ids, text, rollout log-probs, reward, advantage (SDPO: the
    teacher's context c, null when masked, and the positions distilled)"""
    save_every: int = 10
    """checkpoint every this many steps (and at the end); 0 = never (benchmarks)"""
    resume: bool = False
    """continue from the latest complete checkpoint in --out"""
    backend: str = "hf"
    """rollouts: hf (transformers, CPU/GPU) or vllm (GPU, weights pushed every step)"""
    gen_batch_size: int = 64
    """hf backend: sequences decoded together"""
    vllm_gpu_memory: float = 0.5
    """vllm: share of total GPU memory for the engine"""
    vllm_sleep: int = 2
    """vllm: sleep level of the engine while the trainer runs (2: weights and KV cache freed, 1: weights kept in
    CPU memory, 0: never asleep)"""
    chunk: int = 0
    """positions per chunk of the LM-head losses (memory knob); 0 = 256 on CPU, 1024 on GPU"""
    keep_checkpoints: int = 2
    """keep this many newest checkpoints in --out, removing older ones (0 = keep all)"""
    grad_ckpt: bool = False
    """gradient checkpointing (memory knob)"""
    thinking: str = "auto"
    """Qwen3-style chat templates: on | off | auto"""
    system: str | None = None
    """system prompt; None = the template's default"""
    seed: int = 0
    """seed for problem order and sampling"""


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
    """What each token's loss is divided by, for a loss summed over `mask` (B, T):
      token-mean           the tokens of the mini-batch: token_count (default mask.sum());
      seq-mean-token-mean  its own sequence's tokens times the sequences of the mini-batch: seq_count (default B),
                           per row (B, 1). verl's legacy actor with one sequence per micro-batch (the paper's
                           config) computes this: each micro-batch's token mean, times 1 / gradient accumulation.
    token_count / seq_count: the global counts divided by the world size (FSDP2 averages gradients over ranks)."""
    if loss_agg == "token-mean" and torch.is_tensor(token_count):  # a denominator per token
        return token_count.clamp(min=1.0)
    if loss_agg == "token-mean":
        return max(float(mask.sum() if token_count is None else token_count), 1.0)
    if loss_agg == "seq-mean-token-mean":
        return mask.float().sum(-1, keepdim=True).clamp(min=1.0) * float(len(mask) if seq_count is None else seq_count)
    raise ValueError(f"--loss-agg {loss_agg!r}: choose one of {', '.join(LOSS_AGGS)}")


def policy_loss(logp, old_logp, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.28,
                clip_c: float = 3.0, is_weight=None, token_count=None, loss_agg: str = "token-mean", seq_count=None):
    """The clipped surrogate with dual clip, summed over `mask` and divided as `loss_denominator` says.

    logp, old_logp, mask: (B, T); advantages: (B,) or (B, T); is_weight: (B, T) detached rollout IS
    weights or None; token_count (token-mean): the denominator, default mask.sum(); a tensor that broadcasts to
    (B, T) gives each token its own; seq_count (seq-mean-token-mean): the sequences, default B. Pass global counts
    to average over several micro-batches or ranks. Returns (loss, metrics)."""
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
        m = lambda x: float((x.float() * mask).sum() / mask.sum().clamp(min=1))
        metrics = dict(clip_frac_high=m((adv > 0) & (ratio > 1 + clip_high)),
                       clip_frac_low=m((adv < 0) & (ratio < 1 - clip_low)),
                       clip_frac_dual=m((adv < 0) & (clipped > loss3)),
                       ratio_mean=m(ratio))
    return loss, metrics


def k3_kl(logp, ref_logp) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1, clamped as verl."""
    d = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)


def pack_batch(seqs: list[tuple[list[int], list[int]]], pad_id: int, device, limit: int = 0):
    """The (prompt + response) rows of one forward. Returns input_ids, position_ids (G, W), the attention mask,
    window (B, R): the flat index into the G * W positions of the output that predicts each response token,
    targets and mask (B, R), then segments: per row, (prompt length, [(start, end) of each response]) when rows
    are packed, for `segment_attention`; None otherwise.

    limit = 0: one right-padded row per sequence and a (G, W) padding mask (the model's own causal masking).
    limit > 0: the responses to one prompt follow a single copy of it, [prompt, response 1, response 2, ...],
    while the row stays within `limit` tokens. A block mask (G, 1, W, W) lets each response token see the prompt
    and its own response's earlier tokens only, and its position ids continue from the prompt's, so it sees
    what it would see in a row of its own: the same log-probs and gradients up to float rounding
    (test_packed_rows_equal_padded_rows). A micro-batch with no shared prompt gets the limit = 0 layout.

    Why: GRPO's n rollouts of a prompt carry n copies of it, and a micro-batch pads every row to its longest.
    In bench.py's step (16 rollouts of 56-token prompts, micro-batches of 8) the two steps' updates ran over
    1,984 and 2,014 positions packed, against 2,944 padded (-32%; 1,909 and 1,945 without any padding).
    Why a limit: the mask is dense, so attention in a row costs W^2, and a long row's mask W^2 bytes."""
    rows, newest = [], {}  # rows: [prompt, length, members]; newest: prompt -> its latest row
    for i, (p, r) in enumerate(seqs):
        row = newest.get(tuple(p))
        if limit <= 0 or row is None or row[1] + len(r) > limit:
            row = newest[tuple(p)] = [p, len(p), []]
            rows.append(row)
        row[1] += len(r)
        row[2].append(i)
    W, R = max(n for _, n, _ in rows), max(max(len(r) for _, r in seqs), 1)
    ids = torch.full((len(rows), W), pad_id, dtype=torch.long)
    pos = torch.zeros_like(ids)
    seg = torch.full_like(ids, -1)  # -1 padding, 0 the prompt, k the row's k-th response
    window = torch.zeros((len(seqs), R), dtype=torch.long)
    j = torch.arange(R)
    for g, (p, _, members) in enumerate(rows):
        ids[g, :len(p)], pos[g, :len(p)], seg[g, :len(p)] = torch.tensor(p, dtype=torch.long), torch.arange(len(p)), 0
        o = len(p)
        for k, i in enumerate(members, 1):
            r = seqs[i][1]
            e = o + len(r)
            ids[g, o:e], seg[g, o:e] = torch.tensor(r, dtype=torch.long), k
            pos[g, o:e] = torch.arange(len(p), len(p) + len(r))  # as if the response followed the prompt alone
            # token 0 is predicted from the prompt's last position, token t from the response's token t - 1
            window[i] = g * W + torch.where(j == 0, len(p) - 1, (o + j - 1).clamp(max=W - 1))
            o = e
    segments = None
    if all(len(m) == 1 for *_, m in rows):
        attn = (seg >= 0).long()
    else:  # query q sees key k <= q of the prompt or of its own response (padding sees the prompt: no empty row)
        q = torch.arange(W)
        attn = (((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])) & (q[None, :] <= q[:, None]))[:, None]
        segments = []
        for p, _, members in rows:
            starts = [len(p) + sum(len(seqs[i][1]) for i in members[:k]) for k in range(len(members) + 1)]
            segments.append((len(p), list(zip(starts[:-1], starts[1:]))))
    targets = torch.tensor([(r + [pad_id] * R)[:R] for _, r in seqs], dtype=torch.long)
    mask = (j[None, :] < torch.tensor([[len(r)] for _, r in seqs])).float()
    return (ids.to(device), pos.to(device), attn.to(device), window.to(device), targets.to(device), mask.to(device),
            segments)


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      segments=None, **kwargs):
    """transformers' sdpa attention, but a packed row (`pack_batch`'s segments) is attended one response at a
    time: the prompt's queries see the prompt causally, and each response's queries see [prompt, that response]
    under an (L, p + L) causal mask. Padding gets zeros, which no query reads. query (G, Hq, W, D), key and value
    (G, Hkv, W, D); returns (G, W, Hq, D) and None, as transformers' attention functions do. Without segments, or
    with anything sdpa would apply besides the mask (soft-capping, sinks, a position bias), it is transformers'
    sdpa on the block mask.

    Why: torch's CPU sdpa kernels compute every query-key pair of a row, whatever the mask; the block mask of a
    56-token prompt and four ~92-token responses (W = 424) leaves a fifth of the row's W^2 pairs unmasked, and
    attending per response computes a third of them (the prompt's keys once per response). The pieces are
    split off once (`split`: one concatenation in backward, where slicing would build a full-size gradient per
    slice) and the grouped KV heads go to sdpa as they are (enable_gqa), not repeated. A sliding window (a
    `sliding_window` argument) needs nothing: `packing_limit` keeps rows within it. Outputs and gradients equal
    the block-masked attention's up to float rounding (test_segment_attention_equals_block_mask). On CUDA the
    same sdpa calls run, with the kernels that take a boolean mask (not run here: no GPU is lent).
    Registered with transformers as "sdpa_segments" (`use_segment_attention`)."""
    if segments is None or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    W, gqa = query.shape[2], query.shape[1] != key.shape[1]

    def attend(q, k, v, **kw):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, enable_gqa=gqa, **kw)
    rows = []
    for g, (p, responses) in enumerate(segments):
        sizes = [p] + [e - o for o, e in responses]
        sizes.append(W - sum(sizes))  # padding
        qs, ks, vs = (t[g:g + 1].split(sizes, dim=2) for t in (query, key, value))
        parts = [attend(qs[0], ks[0], vs[0], is_causal=True)]
        for i, n in enumerate(sizes[1:-1], 1):
            if n:
                causal = torch.ones(n, p + n, dtype=torch.bool, device=query.device).tril_(p)  # key j <= p + query
                k, v = torch.cat([ks[0], ks[i]], 2), torch.cat([vs[0], vs[i]], 2)  # [prompt, response i]
                parts.append(attend(qs[i], k, v, attn_mask=causal))
        parts.append(query.new_zeros(1, query.shape[1], sizes[-1], value.shape[-1]))
        rows.append(torch.cat(parts, 2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


SEGMENT_ATTENTION = "sdpa_segments"
ALL_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, segment_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, sdpa_mask)  # masks as for sdpa (a 4D one goes as it is)


def use_segment_attention(model):
    """Switch a model on torch's sdpa to `segment_attention`, which is sdpa wherever no packed row's segments
    are passed (generation, evaluation, unpacked rows): only packed training forwards change. The name is not
    saved with checkpoints (config.json holds no attention implementation). Returns the model."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.config._attn_implementation = SEGMENT_ATTENTION
    return model


def packing_limit(model, limit: int) -> int:
    """The row limit that `pack_batch` may use for this model: 0 (no packing) unless its attention is
    torch's sdpa (or `segment_attention`), which takes a boolean block mask as it is (eager attention adds the
    mask to the scores; flash-attention kernels take no mask); within a sliding window, so that the window never
    cuts a row. Assumes transformers hands a 4D mask to the attention unchanged (masking_utils does, in 5.23
    here; checked by test_packed_rows_equal_padded_rows against one padded row per sequence)."""
    cfg = model.config
    if limit <= 0 or getattr(cfg, "_attn_implementation", None) not in rollout.SDPA:
        return 0
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return min(limit, window) if window else limit


def response_states(model, seqs: list[tuple[list[int], list[int]]], pad_id: int, device, pack: int = 0):
    """One forward of the (prompt + response) rows, laid out by `pack_batch` (rows of at most `pack` tokens
    where `packing_limit` allows; 0 = one padded row per sequence). Returns x (B, R, H), the final hidden state
    at each position that predicts a response token, with the LM head's weight W (V, H) -- or, for a head that
    is not `plain_lm_head`, x = the logits (B, R, V) and W = None -- then targets and mask (B, R).

    Why: the LM head then runs on response positions only, chunk by chunk (`chunked_logprobs`,
    sdpo.chunked_distillation), never on (B, W, V) logits; logits_to_keep=1 makes the model's own head
    compute one position. FSDP2: fully_shard leaves the root module's parameters unsharded after its
    forward (the default for the root), so W read after the forward is the full weight, and the gradient
    that reaches it is reduce-scattered with the root's other gradients when backward ends."""
    ids, pos, attn, window, targets, mask, segments = pack_batch(seqs, pad_id, device, packing_limit(model, pack))
    at = lambda h: h.reshape(-1, h.shape[-1])[window]  # (G, W, D) -> (B, R, D)
    rows = dict(input_ids=ids, attention_mask=attn, position_ids=pos)
    if segments is not None:  # read by `segment_attention`; sdpa itself ignores them
        rows["segments"] = segments
    if not plain_lm_head(model):
        return at(model(**rows, use_cache=False).logits), None, targets, mask
    return at(sft.last_hidden_state(model, **rows)), model.get_output_embeddings().weight, targets, mask


def chunked_logprobs(x: torch.Tensor, targets: torch.Tensor, w=None, temperature: float = 1.0,
                     chunk: int = 256) -> torch.Tensor:
    """(N, 2): log pi(target) and the entropy (detached) of softmax(x @ w.T / T), or of x / T when w is None.

    Why chunks: the log-prob of one token needs only its logit and the logsumexp; chunks of `chunk`
    positions, each recomputed in backward (`ChunkedHead`), keep (chunk, V) logits alive instead of (N, V).
    Why `vjp`: the gradient is written out, d log pi(y) / dz = (onehot(y) - softmax(z / T)) / T, from the
    forward's logsumexp (one float per position): one exp pass over the recomputed logits, in place, where
    autograd would redo the logsumexp and then run its backward and the gather's (3 more (chunk, V) passes
    and 2 fresh (chunk, V) buffers)."""
    lse_of = {}  # chunk start -> the logsumexp of the chunk's z / T, from the forward

    def piece(z, start, y):  # forward only (no gradient)
        z = upcast(z)
        z = z if temperature == 1.0 else z / temperature  # skip a (c, V) division at T = 1
        lse, entropy = softmax_stats(z)
        lse_of[start] = lse
        return torch.stack([z.gather(-1, y[:, None]).squeeze(-1) - lse, entropy], dim=-1)

    def vjp(z, start, grad, y):  # the entropy is detached: only grad[:, 0] reaches z
        return log_softmax_vjp(z, lse_of[start], temperature, y[:, None], grad[:, :1])
    return ChunkedHead.apply(x, w, piece, vjp, chunk, 2, targets)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits to fp32 for the softmax; fp32 and fp64 stay as they are (the same tensor)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def log_softmax_vjp(z, lse, temperature: float, idx, g) -> torch.Tensor:
    """dL/dz for a loss that reads s = log_softmax(z / T) only at idx (c, m), with dL/ds there = g (c, m):
    (scatter(g) - softmax(z / T) * sum(g)) / T, from the forward's logsumexp of z / T, lse (c,).
    One exp pass; z (c, V) is overwritten (ChunkedHead hands its vjp fresh logits)."""
    z = upcast(z)
    g = g.to(z.dtype)
    if temperature != 1.0:
        z.div_(temperature)
    dz = z.sub_(lse[:, None]).exp_().mul_(-g.sum(-1, keepdim=True))  # -softmax(z / T) sum(g)
    dz.scatter_add_(-1, idx, g)
    return dz if temperature == 1.0 else dz.div_(temperature)


def softmax_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp, entropy) of softmax(z) over the last dim, (c, V) -> (c,), (c,), with one exp pass:
    e = exp(z - max), lse = max + log sum e, H = lse - sum(e z) / sum e. (torch.logsumexp and then
    torch.softmax for the entropy run the exp twice.)"""
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    total = e.sum(-1)
    lse = m.squeeze(-1) + total.log()
    return lse, lse - e.mul_(z).sum(-1) / total


class ChunkedHead(torch.autograd.Function):
    """out = torch.cat over row chunks c:c+chunk of piece(x_c @ w.T, c, *rows c:c+chunk of args), (N, width);
    x_c itself when w is None (x are logits). piece runs with gradients off, in the forward only; it may keep
    what its backward needs by `c` (a logsumexp, a top-k support).

    The backward recomputes each chunk's logits z (activation checkpointing) and gets dL/dz from
    vjp(z, c, grad_c, *args_c), which may overwrite z (a fresh tensor). With vjp=None, piece is run again with
    gradients on and differentiated by torch.autograd.grad (there it may skip its statistics:
    torch.is_grad_enabled() tells the two calls apart).

    Why not torch.utils.checkpoint per chunk: each chunk's backward then makes a fresh (V, H) weight gradient
    (113 MB for SmolLM2) and adds it into W.grad; here the chunks accumulate into one buffer (addmm_), and
    piece's statistics are not recomputed. At 1,721 positions, H = 576, V = 49,152 (bench-style A/B,
    interleaved, best of 4): `chunked_logprobs` forward + backward 4.4 s against 5.35 s with
    torch.utils.checkpoint, `sdpo.chunked_distillation` 5.9 s against 6.9 s (both before their vjp). The weight
    gradient accumulates in at least fp32 and is returned in W's dtype."""

    @staticmethod
    def forward(ctx, x, w, piece, vjp, chunk, width, *args):
        ctx.piece, ctx.vjp, ctx.chunk = piece, vjp, chunk
        ctx.save_for_backward(x, w, *args)
        outs = [piece(x[c:c + chunk] @ w.T if w is not None else x[c:c + chunk], c, *[a[c:c + chunk] for a in args])
                for c in range(0, x.shape[0], chunk)]
        return torch.cat(outs) if outs else x.new_zeros(0, width, dtype=torch.promote_types(x.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad):
        x, w, *args = ctx.saved_tensors
        dx = torch.empty_like(x)
        acc = None if w is None else torch.promote_types(w.dtype, torch.float32)  # bf16 -> fp32; fp32, fp64 stay
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if w is not None and ctx.needs_input_grad[1] else None
        for c in range(0, x.shape[0], ctx.chunk):
            xc, gc, ac = x[c:c + ctx.chunk], grad[c:c + ctx.chunk], [a[c:c + ctx.chunk] for a in args]
            if ctx.vjp is not None:
                dz = ctx.vjp(xc @ w.T if w is not None else xc.clone(), c, gc, *ac)
            else:
                z = (xc @ w.T if w is not None else xc).detach().requires_grad_()
                with torch.enable_grad():
                    out = ctx.piece(z, c, *ac)
                (dz,) = torch.autograd.grad(out, z, gc.to(out.dtype))
            if w is None:
                dx[c:c + ctx.chunk] = dz
                continue
            dz = dz.to(w.dtype)
            dx[c:c + ctx.chunk] = dz @ w
            if dw is not None:
                dw.addmm_(dz.T.to(acc), xc.to(acc))
        return dx, None if dw is None else dw.to(w.dtype), None, None, None, None, *[None] * len(args)


def token_logprobs(model, seqs: list[tuple[list[int], list[int]]], pad_id: int, temperature: float, device,
                   with_entropy: bool = False, chunk: int = 256, pack: int = 0):
    """log pi(y_t | x, y_<t) under log_softmax(logits / T) for the response tokens of each (prompt, response).

    Returns logp (B, R), mask (B, R), entropy (B, R) or None, with R the longest response; padding is 0.
    pack: `pack_batch`'s row limit (0 = one padded row per sequence)."""
    x, w, targets, mask = response_states(model, seqs, pad_id, device, pack)
    sel = mask.bool()
    res = chunked_logprobs(x[sel], targets[sel], w, temperature, chunk)  # (N, 2): only real response tokens
    logp = torch.zeros(mask.shape, dtype=res.dtype, device=device)
    logp[sel] = res[:, 0]
    if not sel.any() and torch.is_grad_enabled():  # no response tokens: keep a backward through the model (FSDP2)
        logp = logp + 0.0 * x.sum()
    entropy = None
    if with_entropy:
        entropy = torch.zeros_like(logp)
        entropy[sel] = res[:, 1].detach()
    return logp, mask, entropy


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def sync_replica(replica, model) -> None:
    """Copy the trainer's (possibly FSDP-sharded) weights into a plain generation replica. Collective."""
    params = dict(replica.named_parameters())
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.data  # all-gather of the shards
        params[name].copy_(full)


def update_plan(n_rows: int, args: Args, world: int) -> tuple[int, bool]:
    """(rows per optimizer update on this rank, on-policy?) for --mini-batch and --ppo-epochs."""
    per_update = n_rows if args.mini_batch <= 0 else max(1, args.mini_batch * args.rollouts // world)
    return per_update, args.ppo_epochs == 1 and per_update >= n_rows


@torch.no_grad()
def attach_old_logprobs(model, rows: list[dict], args: Args, pad_id: int, device, has_gradient=None) -> None:
    """pi_old for off-policy updates: each row's response log-probs before this step's first update.
    With `has_gradient` (--skip-zero-rows), only the rows that `rows_with_gradient` keeps are run; the others'
    loss terms are multiplied by zero, so their rollout log-probs stand in (finite: the ratio stays near 1)."""
    packed = packing_limit(model, args.pack_tokens) > 0
    run = rows if has_gradient is None else rows_with_gradient(rows, has_gradient, args.micro_batch, packed)
    ran = {id(b) for b in run}
    for b in rows:
        if id(b) not in ran:
            b["old_logp"] = list(b["rollout_logprobs"])
    for micro in micro_batches(run, args.micro_batch, packed, ranks_even=True):
        old, mask, _ = token_logprobs(model, [(b["prompt_ids"], b["response_ids"]) for b in micro], pad_id,
                                      args.temperature, device, chunk=sft.chunk_size(args.chunk, device),
                                      pack=args.pack_tokens)
        for b, o, m in zip(micro, old, mask):
            b["old_logp"] = o[:int(m.sum())].tolist()
    sft.reshard(model)  # FSDP2: no backward follows this forward


def by_length(rows: list[dict], by_prompt: bool = False) -> list[dict]:
    """One update's rows, longest first, so that each micro-batch pads to rows of about its own length; with
    by_prompt, the rows of one prompt stay together (longest first within), their groups ordered by their
    longest row, so that a micro-batch holds whole groups for `pack_batch` to put in one row each.

    Why: a micro-batch pads every row to its longest, and rollouts run from 20 to 128 tokens here (~25% of a
    random batch's positions are padding). The loss is a sum over tokens divided by the update's token count,
    so the order changes float rounding only; longest first also meets the memory peak at once."""
    size = lambda r: len(r["prompt_ids"]) + len(r["response_ids"])
    if not by_prompt:
        return sorted(rows, key=size, reverse=True)
    prompt = lambda r: tuple(r["prompt_ids"])
    longest, first = {}, {}  # per prompt: its longest row, and where it first appears (breaks ties)
    for i, r in enumerate(rows):
        longest[prompt(r)] = max(longest.get(prompt(r), 0), size(r))
        first.setdefault(prompt(r), i)
    return sorted(rows, key=lambda r: (-longest[prompt(r)], first[prompt(r)], -size(r)))


def rows_with_gradient(update: list[dict], has_gradient, micro_batch: int, by_prompt: bool = False) -> list[dict]:
    """The rows of one update that can reach the gradient (`has_gradient(row)`), in the update's order, plus as
    few of the others as give every rank the same number of micro-batches (`micro_batches`; FSDP2's forwards
    and backwards are collectives); those fillers are the last, shortest ones.

    Why: a row whose every loss term is multiplied by zero -- GRPO's zero advantage (a group all right or all
    wrong, without KL), SDPO's row without a teacher context -- adds exactly zero to the gradient but costs a
    forward and backward (and SDPO's teacher forward). Early in training most groups are all wrong, late most
    are all right. Its tokens still count in the token means' denominators, so the loss and the gradient are
    those of the whole update up to float rounding; `apply_update` steps AdamW on a zero gradient when no row
    is left on any rank."""
    keep = [bool(has_gradient(r)) for r in update]
    kept = lambda: [r for r, k in zip(update, keep) if k]
    count = lambda: len(micro_batches(kept(), micro_batch, by_prompt))
    n_micro = int(sft.all_reduce_max(count()))
    for i in reversed(range(len(update))):  # a row adds at most one micro-batch
        if count() >= n_micro:
            break
        keep[i] = True
    return kept()


def micro_batches(rows: list[dict], micro_batch: int, by_prompt: bool = False,
                  ranks_even: bool = False) -> list[list[dict]]:
    """Consecutive micro-batches of at most `micro_batch` rows. by_prompt (packed rows, in `by_length(by_prompt=
    True)` order): a micro-batch also ends where the prompt changes, so that it is one packed row. ranks_even
    (a collective): a rank with fewer micro-batches than another splits its largest ones in two until it has as
    many (FSDP2's forwards and backwards are collectives; a prompt twice in a step makes one larger group on
    one rank). A rank short of micro-batches always has one of two rows or more: ranks hold as many rows, and
    `rows_with_gradient` fills up to the most micro-batches before it runs out of rows.

    Why: `rows_with_gradient` can keep part of a group (SDPO: a group's rollouts differ in whether they have a
    teacher context), and a micro-batch holding two prompts' rows is two packed rows padded to the longer one.
    In bench.py's SDPO step (10 of 16 rows kept, from 4 prompts) 3 micro-batches of 4 took nearly the time of
    all 16 rows, at a higher peak (5.10 GB against 4.77). Whole groups of --rollouts = --micro-batch split
    as before."""
    out = []
    for r in rows:
        if not out or len(out[-1]) == micro_batch or (by_prompt and r["prompt_ids"] != out[-1][-1]["prompt_ids"]):
            out.append([])
        out[-1].append(r)
    n = int(sft.all_reduce_max(len(out))) if ranks_even else len(out)
    while len(out) < n:
        i = max(range(len(out)), key=lambda j: len(out[j]))
        out[i:i + 1] = [out[i][:(len(out[i]) + 1) // 2], out[i][(len(out[i]) + 1) // 2:]]
    return out


def trained_positions(rows: list[dict]) -> int:
    """Positions of a training forward over `rows`: each response, and each distinct prompt once (packed rows
    share it; bench.py's MFU counts these)."""
    return sum(len(p) for p in {tuple(r["prompt_ids"]) for r in rows}) + sum(len(r["response_ids"]) for r in rows)


def apply_update(model, optimizer, grad_clip: float, bad: bool) -> float | None:
    """Clip and step, or, when any rank saw a non-finite loss or gradient, skip the update and keep the
    weights. Returns the gradient norm, None when skipped. A parameter with no gradient (no row was trained:
    `rows_with_gradient`) gets a zero one, so that AdamW still decays and moves on its momentum as it would on
    the zero gradient of a full forward and backward."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    grad_norm = sft.clip_grads(model, grad_clip)
    skip = sft.all_reduce_sum(float(bad or not math.isfinite(grad_norm))) > 0
    if not skip:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return None if skip else grad_norm


def train_on_rollouts(model, optimizer, batch: list[dict], args: Args, world: int, device, pad_id: int,
                      ref_model=None) -> dict:
    """Policy-gradient updates on one step's rollouts; returns metrics. batch rows carry prompt_ids,
    response_ids, rollout_logprobs and advantage. Every rank holds the same number of rows."""
    per_update, on_policy = update_plan(len(batch), args, world)
    with_kl = ref_model is not None and args.kl_coef > 0
    has_gradient = (lambda b: with_kl or b["advantage"] != 0) if args.skip_zero_rows else None
    packed = packing_limit(model, args.pack_tokens) > 0
    t0 = time.time()
    if not on_policy:  # on-policy, pi_old is the current policy detached: no separate forward (departure 1)
        attach_old_logprobs(model, batch, args, pad_id, device, has_gradient)
    t_old = time.time() - t0
    totals = dict(loss=0.0, entropy=0.0, tokens=0.0, entropy_tokens=0.0, clip_frac_high=0.0, clip_frac_low=0.0,
                  clip_frac_dual=0.0, kl=0.0, grad_norm=0.0, updates=0, nonfinite=0, rows=0, positions=0)
    for _ in range(args.ppo_epochs):
        for u in range(0, len(batch), per_update):
            update = by_length(batch[u:u + per_update], by_prompt=packed)
            local_tokens = sum(len(b["response_ids"]) for b in update)  # all rows': the token mean's denominator
            tokens = sft.all_reduce_sum(local_tokens)
            seqs = sft.all_reduce_sum(len(update))  # and the sequence mean's
            totals["tokens"] += local_tokens  # and the clip fractions'
            if has_gradient is not None:
                update = rows_with_gradient(update, has_gradient, args.micro_batch, packed)
            totals["rows"] += len(update)
            totals["positions"] += trained_positions(update)
            bad = False
            for micro in micro_batches(update, args.micro_batch, packed, ranks_even=True):
                pairs = [(b["prompt_ids"], b["response_ids"]) for b in micro]
                logp, mask, entropy = token_logprobs(model, pairs, pad_id, args.temperature, device, with_entropy=True,
                                                     chunk=sft.chunk_size(args.chunk, device), pack=args.pack_tokens)
                R = logp.shape[1]
                pad = lambda xs: torch.stack([torch.nn.functional.pad(torch.as_tensor(x, dtype=torch.float32),
                                                                      (0, R - len(x))) for x in xs]).to(device)
                old = logp.detach() if on_policy else pad([b["old_logp"] for b in micro])
                rollout_lp = pad([b["rollout_logprobs"] for b in micro])
                is_w = torch.clamp(torch.exp(old - rollout_lp), max=args.rollout_is_clip) * mask  # (B, R) detached
                adv = torch.tensor([b["advantage"] for b in micro], device=device)
                # FSDP2 averages gradients over ranks: world * (local sum / global count) = the global mean
                denominator = loss_denominator(mask, args.loss_agg, tokens / world, seqs / world)
                loss, m = policy_loss(logp, old, adv, mask, args.clip_low, args.clip_high, args.clip_c, is_w,
                                      tokens / world, args.loss_agg, seqs / world)
                if with_kl:
                    with torch.no_grad():
                        ref, _, _ = token_logprobs(ref_model, pairs, pad_id, args.temperature, device,
                                                   chunk=sft.chunk_size(args.chunk, device), pack=args.pack_tokens)
                    kl = (k3_kl(logp, ref) * mask / denominator).sum()
                    loss = loss + args.kl_coef * kl
                    totals["kl"] += float(kl.detach()) / world
                bad = bad or not torch.isfinite(loss)  # backward still runs (FSDP2 collectives); the update is skipped
                loss.backward()
                n_local = float(mask.sum())
                totals["loss"] += float(loss.detach()) / world
                totals["entropy"] += float((entropy * mask).sum())
                totals["entropy_tokens"] += n_local
                for key in ("clip_frac_high", "clip_frac_low", "clip_frac_dual"):
                    totals[key] += m[key] * n_local
            grad_norm = apply_update(model, optimizer, args.grad_clip, bad)
            if grad_norm is None:  # skipped: logged as a non-finite update
                totals["nonfinite"] += 1
                continue
            totals["grad_norm"] += grad_norm
            totals["updates"] += 1
    tokens = max(sft.all_reduce_sum(totals["tokens"]), 1.0)
    entropy_tokens = sft.all_reduce_sum(totals["entropy_tokens"])
    n_rows = sft.all_reduce_sum(len(batch)) * args.ppo_epochs
    out = dict(loss=sft.all_reduce_sum(totals["loss"]) / max(args.ppo_epochs * math.ceil(len(batch) / per_update), 1),
               entropy=sft.all_reduce_sum(totals["entropy"]) / entropy_tokens if entropy_tokens else None,
               kl=sft.all_reduce_sum(totals["kl"]),
               grad_norm=totals["grad_norm"] / max(totals["updates"], 1), updates=totals["updates"],
               nonfinite_updates=totals["nonfinite"],
               trained_frac=sft.all_reduce_sum(totals["rows"]) / max(n_rows, 1),
               train_tokens=sft.all_reduce_sum(totals["positions"]), t_old_logprobs=t_old)
    for key in ("clip_frac_high", "clip_frac_low", "clip_frac_dual"):
        out[key] = sft.all_reduce_sum(totals[key]) / tokens
    return out


def score_rollouts(samples, problems: list[dict], lenient: bool, tokenizer=None) -> list[dict]:
    """One row per sample: ids, log-probs, reward (App. D grader), length, E(y), truncation, and with a tokenizer
    answer_length: the tokens of the text after </think> (re-tokenized; all of it without </think>)."""
    rows = []
    for s in samples:
        p = problems[s.prompt_index]
        answer = epistemic.split_think(s.text)[1] if "</think>" in s.text else None
        rows.append(dict(prompt_ids=s.prompt_ids, response_ids=s.response_ids, rollout_logprobs=s.logprobs,
                         reward=data.grade(s.text, p["answer"], lenient=lenient), length=len(s.response_ids),
                         epistemic=epistemic.epistemic_count(s.text), truncated=s.finish_reason == "length",
                         text=s.text, answer_length=len(s.response_ids) if answer is None or tokenizer is None
                         else min(len(tokenizer(answer, add_special_tokens=False)["input_ids"]), len(s.response_ids))))
    return rows


def save_rollouts(path: Path, step: int, rows: list[dict], problems: list[dict], group_size: int, world: int) -> None:
    """Append one JSON line per rollout of every rank to `path`, in the step's order (their "place"; rank 0 writes;
    collective)."""
    keep = ("prompt_ids", "response_ids", "rollout_logprobs", "text", "reward", "advantage", "length", "epistemic",
            "truncated")
    mine = [dict(step=step, prompt=r["place"] // group_size, sample=r["place"] % group_size,
                 problem=problems[i // group_size].get("id"), **{k: r[k] for k in keep},
                 **({"context": r["context"], "distilled": sum(r["distill"])} if "distill" in r else {}))
            for i, r in enumerate(rows)]
    everything = rollout.gather_to_rank0(mine, world)
    if everything is not None:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in sorted(everything, key=lambda r: (r["prompt"], r["sample"])))


@dataclass
class Run:
    """What a training loop holds, built by `setup`; sdpo.py's train step reads it."""
    args: Args
    rank: int
    world: int
    device: torch.device
    problems: list
    benchmarks: dict
    model: object
    tokenizer: object
    backend: rollout.Backend
    optimizer: object
    start: int
    out: Path
    resumed_from: Path | None = None  # the checkpoint this run continues, if any
    checkpoint_extra: object = None  # () -> {name: {key: tensor}} saved inside each checkpoint


def setup(args: Args) -> Run:
    """Everything both trainers need: ranks, problems, policy (sharded), optimizer, generation backend, resume."""
    data.check_args(args)  # again: a run may be started from Python, without parse_args
    rank, _, world, device = sft.init_distributed()
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the world size {world}")
    problems = data.load_problems(args.data, seed=args.seed)
    if args.coverage:
        problems = data.coverage_subset(problems, args.coverage, seed=args.seed)
    benchmarks = {evaluate.benchmark_name(s): data.load_problems(s, seed=args.seed) for s in args.eval_data}
    ckpt = sft.resume_point(args.out, args.resume)
    start_from = str(ckpt) if ckpt else args.model
    model, tok = rollout.load_model(start_from, "float32", device)
    replica = None
    if args.backend == "hf" and world > 1:
        replica, _ = rollout.load_model(start_from, "auto", device)
    backend = rollout.Backend("hf", tok, model=replica if replica is not None else model, batch_size=args.gen_batch_size)
    if args.backend == "vllm":
        max_len = rollout.trainer_engine_length(tok, args.model, problems, benchmarks, dict(
            system=args.system, thinking=args.thinking), args.max_prompt_len, args.max_new_tokens,
            args.eval_max_new_tokens, regenerated=getattr(args, "teacher_context", None) == "regenerated")
        backend = rollout.Backend("vllm", tok, llm=rollout.make_vllm(
            rollout.resolve_model_path(start_from), max_len, device=device, gpu_memory_utilization=args.vllm_gpu_memory,
            enable_sleep_mode=args.vllm_sleep > 0, seed=args.seed + rank), max_model_len=max_len,
            sleep_level=args.vllm_sleep)
    elif args.backend != "hf":
        raise ValueError(f"--backend {args.backend!r}: hf or vllm")
    if args.segment_attention:
        use_segment_attention(model)
    model = sft.shard_model(model, device, args.grad_ckpt, mixed_precision=device.type == "cuda")
    optimizer = sft.make_optimizer(model, args.lr, args.weight_decay)
    start = sft.load_checkpoint(ckpt, model, optimizer)["step"] if ckpt else 0
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        sft.append_metrics(out / "metrics.jsonl", {}, resumed_from=start)
        if ckpt:
            print(f"resumed from {ckpt} (step {start})")
    return Run(args, rank, world, device, problems, benchmarks, model, tok, backend, optimizer, start, out, ckpt)


def grpo_train_step(run: Run):
    """GRPO's update: `train_on_rollouts`, with a frozen reference policy when --kl-coef > 0."""
    ref_model = rollout.load_model(run.args.model, "auto", run.device)[0] if run.args.kl_coef > 0 else None
    if ref_model is not None and run.args.segment_attention:
        use_segment_attention(ref_model)
    return lambda rows, step_problems: train_on_rollouts(run.model, run.optimizer, rows, run.args, run.world,
                                                         run.device, run.tokenizer.pad_token_id, ref_model)


def peak_memory_gb(device) -> float | None:
    """This process's peak memory since the previous call, in GB; each call starts a new window.

    CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated, then reset_peak_memory_stats).
    CPU on Linux: the peak resident set, VmHWM in /proc/self/status, reset by writing 5 to
    /proc/self/clear_refs (Linux >= 4.0), which also resets getrusage's ru_maxrss (the same counter).
    Why per step: a process's lifetime peak also holds load-time copies. None where neither is available."""
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 / 1e9 for line in f if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak
    except (OSError, StopIteration):
        return None


def run_loop(args: Args, loss_name: str = "grpo", make_train_step=grpo_train_step):
    """The RL loop. sdpo.py passes its own `make_train_step` (the self-distillation loss) and keeps the rest.
    A train step returns its metrics, among them train_tokens: the positions its training forwards ran."""
    r = setup(args)
    rank, world, model, tok, backend, optimizer, out = r.rank, r.world, r.model, r.tokenizer, r.backend, r.optimizer, r.out
    train_step = make_train_step(r)
    chat = dict(system=args.system, thinking=args.thinking)
    eval_params = rollout.SamplingParams(n=args.eval_n, temperature=args.eval_temperature, top_p=args.eval_top_p,
                                         top_k=args.eval_top_k, max_new_tokens=args.eval_max_new_tokens,
                                         seed=args.seed + 500_000_000)  # its own seeds
    bar = tqdm(range(r.start, args.steps), desc=loss_name, disable=rank != 0, initial=r.start, total=args.steps)
    metrics = {}
    for step in bar:
        t0 = time.time()
        peak_memory_gb(r.device)  # a new window: this step's peak only
        picked = sft.rows_for_step(len(r.problems), step, args.prompts_per_step, args.seed)
        indices = rollout.shard(list(range(len(picked))), rank, world)  # this rank's prompts' places in the step
        mine = [r.problems[picked[i]] for i in indices]
        prompts = [rollout.chat_prompt(tok, data.format_prompt(p["question"]), **chat) for p in mine]
        if any(len(tok(p, add_special_tokens=False)["input_ids"]) > args.max_prompt_len for p in prompts):
            raise ValueError(f"a prompt of step {step} is longer than --max-prompt-len {args.max_prompt_len}")
        for group in optimizer.param_groups:
            group["lr"] = sft.lr_at(step, args.lr, args.warmup)
        params = rollout.SamplingParams(n=args.rollouts, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                        seed=args.seed * 1_000_003 + step * 1009)
        # each prompt seeded by its place in the step: the same rollouts on any number of ranks
        samples = rollout.generate(backend, prompts, params, progress=False, indices=indices)
        rollout.sleep_engine(backend)  # vllm: its memory goes to training until the weights are pushed
        t_gen = time.time()
        rows = score_rollouts(samples, mine, args.lenient, tok)
        for i, x in enumerate(rows):  # its place in the step's batch, over all ranks (prompt-major)
            x["place"] = indices[i // args.rollouts] * args.rollouts + i % args.rollouts
        adv = group_advantages([x["reward"] for x in rows], args.rollouts, args.norm_adv_std)
        for x, a in zip(rows, adv.tolist()):
            x["advantage"] = a
        t_score = time.time()
        train_metrics = train_step(rows, mine)
        t_train = time.time()
        if args.save_rollouts:
            save_rollouts(out / "rollouts.jsonl", step + 1, rows, mine, args.rollouts, world)
        if backend.kind == "vllm":
            rollout.push_weights_to_vllm(backend, model)  # wakes a sleeping engine
        elif backend.model is not model:
            sync_replica(backend.model, model)
        n = sft.all_reduce_sum(len(rows))
        groups = torch.tensor([x["reward"] for x in rows]).view(-1, args.rollouts)
        gen_tokens = sft.all_reduce_sum(sum(x["length"] for x in rows))
        answer_tokens = sft.all_reduce_sum(sum(x["answer_length"] for x in rows))  # after </think>: the answer part
        seq_tokens = sft.all_reduce_sum(sum(len(x["prompt_ids"]) + x["length"] for x in rows))  # for bench.py's FLOPs
        metrics = dict(step=step + 1, lr=optimizer.param_groups[0]["lr"],
                       score=sft.all_reduce_sum(sum(x["reward"] for x in rows)) / n,
                       length=gen_tokens / n, think_length=(gen_tokens - answer_tokens) / n,
                       answer_length=answer_tokens / n,
                       epistemic=sft.all_reduce_sum(sum(x["epistemic"] for x in rows)) / n,
                       closed_think=sft.all_reduce_sum(sum("</think>" in x["text"] for x in rows)) / n,
                       truncated=sft.all_reduce_sum(sum(x["truncated"] for x in rows)) / n,
                       degenerate_groups=sft.all_reduce_sum(float((groups.max(1).values == groups.min(1).values).sum()))
                       / (n / args.rollouts),
                       **train_metrics,
                       rollout_tok_s=gen_tokens / max(t_gen - t0, 1e-9) / world,
                       train_tok_s=train_metrics["train_tokens"] / max(t_train - t_score, 1e-9) / world,  # positions
                       seq_tokens=seq_tokens, t_generate=t_gen - t0, t_score=t_score - t_gen,
                       t_train=t_train - t_score)
        if args.eval_every and (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ev = evaluate.evaluate(backend, r.benchmarks, eval_params, ks=(1,), chat=chat, lenient=args.lenient)
            for name, s in ev.items():
                metrics.update({f"eval/{name}/{k}": v for k, v in s.items() if k in ("acc", "length", "epistemic")})
        metrics["t_step"] = time.time() - t0
        metrics["peak_mem_gb"] = peak_memory_gb(r.device)  # this rank's peak over the step (eval included)
        if rank == 0:
            sft.append_metrics(out / "metrics.jsonl", metrics)
            bar.set_postfix(score=f"{metrics['score']:.3f}", len=f"{metrics['length']:.0f}",
                            E=f"{metrics['epistemic']:.2f}", loss=f"{metrics['loss']:.4f}")
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            sft.save_checkpoint(out, step + 1, model, tok, optimizer, dict(args=asdict(args), loss=loss_name),
                                extra_tensors=r.checkpoint_extra() if r.checkpoint_extra else None,
                                keep=args.keep_checkpoints)
    held_out = " ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("eval/"))  # the last eval
    rollout.print0(f"done: {held_out or 'no steps run'}; metrics in {out / 'metrics.jsonl'}; checkpoint "
                   f"{sft.latest_checkpoint(out) or 'none (--save-every 0)'}")


def main(argv=None):
    import sys
    try:
        run_loop(data.parse_args(Args, argv))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

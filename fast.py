"""fast.py -- every speedup of the project, and nothing else. Each function here is a drop-in twin of a plain
function in the algorithm files, which stays where the paper's math is; `--fast/--no-fast` (on by default)
chooses, and a test pins each pair equal (up to float rounding). Delete this file and run with --no-fast: the
project runs, more slowly. Nothing is registered into a library at import time; `use_segment_attention` does it
when a model is set up. Imports torch and transformers only.

  twin of                          here                          what it saves (figures: PERFORMANCE.md)
  grpo.token_logprobs              token_logprobs                one row per prompt's rollouts (`pack_batch`),
                                                                 attention per response (`segment_attention`),
                                                                 the LM head on response positions, in chunks
                                                                 (`ChunkedHead`) with written-out gradients
  sdpo.distillation_terms          distillation_terms            the same for Eq. 1 (`chunked_distillation`)
  grpo.micro_batches               micro_batches                 zero-gradient rows left out
                                                                 (`rows_with_gradient`), rows by length
  sft.token_nll                    token_nll                     the LM head in chunks, recomputed in backward
  rollout.sample_next              sample_next                   top-p and the draw over the top-k candidates
  rollout.generate_hf's step       LeanDecoder, skinny_linear,   the decoding step written out over the weights,
                                   preallocate_kv                x @ W.T ordered for few rows, KV appended in place
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def all_reduce_max(x: float) -> float:
    if not dist.is_initialized():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # collective
    return float(t.item())


# --------------------------------------------------------------------------------------------
# Training forwards: packed rows, segment attention, the LM head on response positions in chunks
# --------------------------------------------------------------------------------------------
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

    Why: GRPO's n rollouts of a prompt carry n copies of it, and a micro-batch pads every row to its longest;
    packed, bench.py's GRPO updates run over 32% fewer positions. Why a limit: the mask is dense, so attention in
    a row costs W^2, and a long row's mask W^2 bytes."""
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
    segments = []  # per row: (prompt length, [(start, end) of each response])
    for g, (p, _, members) in enumerate(rows):
        ids[g, : len(p)] = torch.tensor(p, dtype=torch.long)
        pos[g, : len(p)] = torch.arange(len(p))
        seg[g, : len(p)] = 0
        o, spans = len(p), []
        for k, i in enumerate(members, 1):
            r = seqs[i][1]
            e = o + len(r)
            ids[g, o:e], seg[g, o:e] = torch.tensor(r, dtype=torch.long), k
            pos[g, o:e] = torch.arange(len(p), len(p) + len(r))  # as if the response followed the prompt alone
            # token 0 is predicted from the prompt's last position, token t from the response's token t - 1
            window[i] = g * W + torch.where(j == 0, len(p) - 1, (o + j - 1).clamp(max=W - 1))
            spans.append((o, e))
            o = e
        segments.append((len(p), spans))
    if all(len(m) == 1 for *_, m in rows):
        attn, segments = (seg >= 0).long(), None
    else:  # query q sees key k <= q of the prompt or of its own response (padding sees the prompt: no empty row)
        q = torch.arange(W)
        attn = (((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])) & (q[None, :] <= q[:, None]))[:, None]
    targets = torch.tensor([(r + [pad_id] * R)[:R] for _, r in seqs], dtype=torch.long)
    mask = (j[None, :] < torch.tensor([[len(r)] for _, r in seqs])).float()
    return (*(t.to(device) for t in (ids, pos, attn, window, targets, mask)), segments)


def segment_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, segments=None, **kwargs
):
    """transformers' sdpa attention, but a packed row (`pack_batch`'s segments) is attended one response at a
    time: the prompt's queries see the prompt causally, and each response's queries see [prompt, that response]
    under an (L, p + L) causal mask. Padding gets zeros, which no query reads. query (G, Hq, W, D), key and value
    (G, Hkv, W, D); returns (G, W, Hq, D) and None, as transformers' attention functions do. Without segments, or
    with anything sdpa would apply besides the mask (soft-capping, sinks, a position bias), it is transformers'
    sdpa on the block mask.

    Why: torch's CPU sdpa kernels compute every query-key pair of a row, whatever the mask; in bench.py's packed
    rows a fifth of the W^2 pairs are unmasked, and attending per response computes a third of them. The pieces are
    split off once (`split`: one concatenation in backward, where slicing would build a full-size gradient per
    slice) and the grouped KV heads go to sdpa as they are (enable_gqa), not repeated. A sliding window (a
    `sliding_window` argument) needs nothing: `packing_limit` keeps rows within it. Outputs and gradients equal
    the block-masked attention's up to float rounding (test_segment_attention_equals_block_mask). On CUDA the
    same sdpa calls run, with the kernels that take a boolean mask (not run here: no GPU is lent).
    Registered with transformers as "sdpa_segments" by `use_segment_attention`."""
    if segments is None or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias")):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    W, gqa = query.shape[2], query.shape[1] != key.shape[1]
    # CPU autocast (--dtype bfloat16): attention in fp32, a small share of the FLOPs (bf16: 2.6x fp32's backward time)
    fp32 = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")

    def attend(q, k, v, **kw):
        if fp32:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, enable_gqa=gqa, **kw)

    rows = []
    for g, (p, responses) in enumerate(segments):
        sizes = [p] + [e - o for o, e in responses]
        sizes.append(W - sum(sizes))  # padding
        qs, ks, vs = (t[g : g + 1].split(sizes, dim=2) for t in (query, key, value))
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
SDPA = ("sdpa", SEGMENT_ATTENTION)  # torch's sdpa; `segment_attention` is sdpa wherever no segments are passed


def use_segment_attention(model):
    """Switch a model on torch's sdpa to `segment_attention`, which is sdpa wherever no packed row's segments
    are passed (generation, evaluation, unpacked rows): only packed training forwards change. The first call
    registers it with transformers' attention and mask tables. The name is not saved with checkpoints (config.json
    holds no attention implementation). Returns the model."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if SEGMENT_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, segment_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, sdpa_mask)  # masks as for sdpa (a 4D one as it is)
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
    if limit <= 0 or getattr(cfg, "_attn_implementation", None) not in SDPA:
        return 0
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return min(limit, window) if window else limit


def plain_lm_head(model) -> bool:
    """True when the logits are exactly hidden @ W.T: a bias-free Linear head with no soft-capping or
    logit scaling (Llama, Qwen2/3, OLMo, SmolLM). Other heads take the full-logits path (Gemma 2's soft-capping,
    Cohere's logit_scale, Granite's logits_scaling)."""
    head, cfg = model.get_output_embeddings(), model.config
    scaled = getattr(cfg, "final_logit_softcapping", None) or any(
        getattr(cfg, k, None) not in (None, 1.0) for k in ("logit_scale", "logits_scaling")
    )
    return type(head) is torch.nn.Linear and head.bias is None and not scaled


def last_hidden_state(model, **inputs) -> torch.Tensor:
    """The decoder's final hidden state (B, T, H), the LM head's input, from one forward of the whole model.

    Why not output_hidden_states=True: that keeps every layer's states (for a 7B model at 24k positions,
    28 x 24k x 3584 bf16 values, ~5 GB) where only the last is read; and use_cache=False, or transformers
    builds a KV cache in training-side forwards. The model is still called as a whole (not its decoder alone),
    so that FSDP2's root hooks gather the embeddings. logits_to_keep, an empty index, makes its own head compute
    no position: with logits_to_keep=1 under autograd, torch.matmul cannot fold the (B, 1, H) slice of a (B, T, H)
    state into a matrix and runs bmm over W.T expanded to (B, H, V), which in bf16 on a CPU copies W (57 MB for
    SmolLM2, ~0.1 s) at every training forward."""
    caught = {}

    def keep(module, args, out):  # returns None: the output goes on unchanged
        caught["x"] = out[0]

    hook = model.get_decoder().register_forward_hook(keep)
    try:
        model(
            **inputs,
            use_cache=False,
            logits_to_keep=torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device),
        )
    finally:
        hook.remove()
    return caught["x"]


def response_states(model, seqs: list[tuple[list[int], list[int]]], pad_id: int, device, pack: int = 0):
    """One forward of the (prompt + response) rows, laid out by `pack_batch` (rows of at most `pack` tokens
    where `packing_limit` allows; 0 = one padded row per sequence). Returns x (B, R, H), the final hidden state
    at each position that predicts a response token, with the LM head's weight W (V, H) -- or, for a head that
    is not `plain_lm_head`, x = the logits (B, R, V) and W = None -- then targets and mask (B, R).

    Why: the LM head then runs on response positions only, chunk by chunk (`chunked_logprobs`,
    `chunked_distillation`), never on (B, W, V) logits. FSDP2 leaves the root module's parameters unsharded after
    its forward, so W read after it is the full weight, and its gradient is reduce-scattered with the root's."""
    ids, pos, attn, window, targets, mask, segments = pack_batch(seqs, pad_id, device, packing_limit(model, pack))

    def at(h):
        return h.reshape(-1, h.shape[-1])[window]  # (G, W, D) -> (B, R, D)

    rows = dict(input_ids=ids, attention_mask=attn, position_ids=pos)
    if segments is not None:  # read by `segment_attention`; sdpa itself ignores them
        rows["segments"] = segments
    if not plain_lm_head(model):
        return at(model(**rows, use_cache=False).logits), None, targets, mask
    return at(last_hidden_state(model, **rows)), model.get_output_embeddings().weight, targets, mask


def chunked_logprobs(
    x: torch.Tensor, targets: torch.Tensor, w=None, temperature: float = 1.0, chunk: int = 256
) -> torch.Tensor:
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
    e = (z - m).exp_()  # in place: one (c, V) buffer, not two
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
    piece's statistics are not recomputed: 4.4 s against 5.35 s for `chunked_logprobs` (PERFORMANCE.md). The
    weight gradient accumulates in at least fp32 and is returned in W's dtype.

    Under torch.autocast (CPU bf16: rollout.autocast) x @ W.T runs in autocast's dtype, and so do the backward's
    three matmuls: autocast is off in a backward, so the forward's dtype is kept in ctx and cast to explicitly."""

    @staticmethod
    def forward(ctx, x, w, piece, vjp, chunk, width, *args):
        ctx.piece, ctx.vjp, ctx.chunk = piece, vjp, chunk
        ctx.save_for_backward(x, w, *args)
        dev = x.device.type
        ctx.mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype  # the matmuls' dtype
        wt = None if w is None else w.to(ctx.mm).T  # cast once
        outs = []
        for c in range(0, x.shape[0], chunk):
            z = x[c : c + chunk] if w is None else x[c : c + chunk].to(ctx.mm) @ wt
            outs.append(piece(z, c, *[a[c : c + chunk] for a in args]))
        return torch.cat(outs) if outs else x.new_zeros(0, width, dtype=torch.promote_types(x.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad):
        x, w, *args = ctx.saved_tensors
        dx = torch.empty_like(x)
        acc = None if w is None else torch.promote_types(w.dtype, torch.float32)  # bf16 -> fp32; fp32, fp64 stay
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if w is not None and ctx.needs_input_grad[1] else None
        wc = None if w is None else w.to(ctx.mm)  # W itself, or its autocast copy: cast once
        for c in range(0, x.shape[0], ctx.chunk):
            xc, gc, ac = x[c : c + ctx.chunk], grad[c : c + ctx.chunk], [a[c : c + ctx.chunk] for a in args]
            if w is not None:
                xc = xc.to(wc.dtype)
            if ctx.vjp is not None:
                dz = ctx.vjp(xc @ wc.T if w is not None else xc.clone(), c, gc, *ac)
            else:
                z = (xc @ wc.T if w is not None else xc).detach().requires_grad_()
                with torch.enable_grad():
                    out = ctx.piece(z, c, *ac)
                (dz,) = torch.autograd.grad(out, z, gc.to(out.dtype))
            if w is None:
                dx[c : c + ctx.chunk] = dz
                continue
            dz = dz.to(wc.dtype)
            dx[c : c + ctx.chunk] = dz @ wc
            if dw is None:
                continue
            if wc.dtype == w.dtype:
                dw.addmm_(dz.T.to(acc), xc.to(acc))
            else:  # autocast: the product in its dtype, accumulated in fp32
                dw.add_(dz.T @ xc)
        return dx, None if dw is None else dw.to(w.dtype), None, None, None, None, *[None] * len(args)


def token_logprobs(
    model,
    seqs: list[tuple[list[int], list[int]]],
    pad_id: int,
    temperature: float,
    device,
    with_entropy: bool = False,
    chunk: int = 256,
    pack: int = 0,
):
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


TERMS = ("divergence", "logp", "kl", "entropy", "teacher_entropy")  # sdpo.distillation_terms' fields


def chunked_distillation(
    student_x,
    teacher_x,
    targets,
    student_w=None,
    teacher_w=None,
    topk=100,
    alpha=0.5,
    add_tail=True,
    temperature=1.0,
    chunk=256,
    *,
    divergence,
    finish_support,
) -> dict:
    """Per position, (N,) each (`TERMS`): the divergence D (Eq. 1), the student's log-prob of `targets`, KL(S||T)
    on the support, the student's entropy and the teacher's entropy / log V (the last three detached).
    `divergence` and `finish_support` are sdpo.py's (passed in: this file imports no algorithm file).

    student_x / teacher_x are hidden states (N, H) with LM-head weights *_w (V, H), or logits (N, V) when the
    weights are None. Each student chunk is recomputed in backward (ChunkedHead): (chunk, V) logits at a time.

    Why `support` and `vjp`: the backward needs only the student's side. The student's top-k indices, the teacher's
    log-probs on them (chunk, k+1) and the student's logsumexp (chunk,) are kept from the forward, instead of
    recomputing the teacher's LM head, the log_softmaxes, the top-k and the entropies. With top-k, the loss reads
    the student's log-probs s = z - logsumexp(z) at k + 1 entries per position, so the gradient is written out:
    autograd over those (chunk, k+1) values, then `log_softmax_vjp`. With topk=0 the teacher's full log-probs would
    be (chunk, V) each: that path recomputes them and lets autograd differentiate the full log_softmax."""
    scale = (lambda z: z) if temperature == 1.0 else (lambda z: z / temperature)  # skip a (chunk, V) division
    support = {}  # chunk start -> (student's top-k indices, teacher's log-probs on them, student's logsumexp)

    def teacher_logits(tx):  # (c, V) z_T / T, no gradient (stopgrad)
        with torch.no_grad():
            return scale(upcast(tx @ teacher_w.T if teacher_w is not None else tx))

    def piece(z, start, tx, y):
        z = scale(upcast(z))
        if torch.is_grad_enabled():  # ChunkedHead's backward, topk=0 only: autograd through the full log_softmax
            s = torch.log_softmax(z, dim=-1)
            loss = divergence(s, torch.log_softmax(teacher_logits(tx), dim=-1), alpha)
            logp = s.gather(-1, y[:, None]).squeeze(-1)
            return torch.cat([torch.stack([loss, logp], dim=-1), s.new_zeros(len(s), 3)], dim=-1)
        lse, entropy = softmax_stats(z)
        logp = z.gather(-1, y[:, None]).squeeze(-1) - lse
        if topk:  # the student's side first, so that its (c, V) upcast is freed before the teacher's is made
            idx = z.topk(topk, dim=-1).indices  # the STUDENT's top-k (z and its log-probs have the same order)
            s_sup = finish_support(z.gather(-1, idx) - lse[:, None], add_tail)
            del z
        zt = teacher_logits(tx)
        lse_t, entropy_t = softmax_stats(zt)
        if topk:
            t_sup = finish_support(zt.gather(-1, idx) - lse_t[:, None], add_tail)
            support[start] = (idx, t_sup, lse)
        else:
            s_sup, t_sup = z - lse[:, None], zt - lse_t[:, None]
        entropy_t = entropy_t / math.log(zt.shape[-1])  # the teacher's entropy: in [0, 1]
        terms = [divergence(s_sup, t_sup, alpha), logp, divergence(s_sup, t_sup, 1.0), entropy, entropy_t]
        return torch.stack(terms, dim=-1)

    def vjp(z, start, grad, tx, y):  # top-k only; z is ChunkedHead's fresh (c, V) logits, overwritten here
        idx, t_sup, lse = support[start]
        both = torch.cat([idx, y[:, None]], dim=-1)  # the entries of s the loss reads: the top-k, then the target
        s = (scale(upcast(z.gather(-1, both))) - lse[:, None]).requires_grad_()  # (c, k+1)
        with torch.enable_grad():
            out = torch.stack([divergence(finish_support(s[:, :-1], add_tail), t_sup, alpha), s[:, -1]], dim=-1)
            (g,) = torch.autograd.grad(out, s, grad[:, :2].to(out.dtype))
        return log_softmax_vjp(z, lse, temperature, both, g)

    out = ChunkedHead.apply(student_x, student_w, piece, vjp if topk else None, chunk, 5, teacher_x.detach(), targets)
    return dict(zip(TERMS, out.unbind(-1)))


def distillation_terms(
    model, teacher, student_seqs, teacher_seqs, pad_id: int, device, pack: int = 0, chunk: int = 256, **loss
) -> dict:
    """sdpo.distillation_terms from `response_states` (packed rows, hidden states) and `chunked_distillation`
    (`loss`: its topk, alpha, add_tail, temperature, divergence, finish_support): the same dict, the same order
    of positions (each row's response tokens in turn)."""
    sx, sw, targets, mask = response_states(model, student_seqs, pad_id, device, pack)
    with torch.no_grad():
        tx, tw, _, _ = response_states(teacher, teacher_seqs, pad_id, device, pack)
    sel = mask.bool()  # (B, R)
    terms = chunked_distillation(sx[sel], tx[sel], targets[sel], sw, tw, chunk=chunk, **loss)
    row = torch.arange(len(mask), device=mask.device)[:, None].expand_as(mask)[sel]
    return dict(terms, targets=targets[sel], row=row, anchor=0.0 * sx.sum())  # anchor: a backward even with N = 0


# --------------------------------------------------------------------------------------------
# The row schedule: rows by length, zero-gradient rows left out, micro-batches even over ranks
# --------------------------------------------------------------------------------------------
def by_length(rows: list[dict], by_prompt: bool = False) -> list[dict]:
    """One update's rows, longest first, so that each micro-batch pads to rows of about its own length; with
    by_prompt, the rows of one prompt stay together (longest first within), their groups ordered by their
    longest row, so that a micro-batch holds whole groups for `pack_batch` to put in one row each.

    Why: a micro-batch pads every row to its longest, and rollouts run from 20 to 128 tokens here (~25% of a
    random batch's positions are padding). The loss is a sum over tokens divided by the update's token count,
    so the order changes float rounding only; longest first also meets the memory peak at once."""

    def size(r):
        return len(r["prompt_ids"]) + len(r["response_ids"])

    if not by_prompt:
        return sorted(rows, key=size, reverse=True)

    def prompt(r):
        return tuple(r["prompt_ids"])

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
    those of the whole update up to float rounding; sft.apply_update steps AdamW on a zero gradient when no row
    is left on any rank."""
    keep = [bool(has_gradient(r)) for r in update]

    def kept():
        return [r for r, k in zip(update, keep) if k]

    def count():
        return len(micro_batches(kept(), micro_batch, by_prompt))

    n_micro = int(all_reduce_max(count()))
    for i in reversed(range(len(update))):  # a row adds at most one micro-batch
        if count() >= n_micro:
            break
        keep[i] = True
    return kept()


def micro_batches(
    rows: list[dict], micro_batch: int, by_prompt: bool = False, ranks_even: bool = False
) -> list[list[dict]]:
    """Consecutive micro-batches of at most `micro_batch` rows. by_prompt (packed rows, in `by_length(by_prompt=
    True)` order): a micro-batch also ends where the prompt changes, so that it is one packed row. ranks_even
    (a collective): a rank with fewer micro-batches than another splits its largest ones in two until it has as
    many (FSDP2's forwards and backwards are collectives; a prompt twice in a step makes one larger group on
    one rank). A rank short of micro-batches always has one of two rows or more: ranks hold as many rows, and
    `rows_with_gradient` fills up to the most micro-batches before it runs out of rows.

    Why: `rows_with_gradient` can keep part of a group (SDPO: a group's rollouts differ in whether they have a
    teacher context), and a micro-batch holding two prompts' rows is two packed rows padded to the longer one:
    SDPO's train time 18.0-20.4 s -> 13.4-13.7 s. Whole groups of --rollouts = --micro-batch split as before."""
    out = []
    for r in rows:
        if not out or len(out[-1]) == micro_batch or (by_prompt and r["prompt_ids"] != out[-1][-1]["prompt_ids"]):
            out.append([])
        out[-1].append(r)
    n = int(all_reduce_max(len(out))) if ranks_even else len(out)
    while len(out) < n:
        i = max(range(len(out)), key=lambda j: len(out[j]))
        out[i : i + 1] = [out[i][: (len(out[i]) + 1) // 2], out[i][(len(out[i]) + 1) // 2 :]]
    return out


def schedule(update: list[dict], micro_batch: int, has_gradient=None, packed: bool = False) -> list[list[dict]]:
    """grpo.micro_batches' twin: one update's micro-batches, rows by length (`by_length`), without the rows whose
    gradient is exactly zero when `has_gradient` is given (`rows_with_gradient`), one prompt's rows per packed
    row, as many on every rank. Collective."""
    update = by_length(update, by_prompt=packed)
    if has_gradient is not None:
        update = rows_with_gradient(update, has_gradient, micro_batch, packed)
    return micro_batches(update, micro_batch, packed, ranks_even=True)


def token_nll(
    model, ids: list[list[int]], masks: list[list[int]], pad_id: int, device, chunk: int = 256
) -> tuple[torch.Tensor, int]:
    """Sum of -log p(y_t | x, y_<t) over masked (response) tokens of a right-padded micro-batch, and their count.

    Memory: the LM head runs on the response positions only, `chunk` at a time, each chunk's (chunk, V) logits
    recomputed in backward (torch.utils.checkpoint), never the full (B, T, V) fp32 logits (45-52 GB for 24k
    positions and V = 152k). FSDP2: W is the full weight, as in `response_states`."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids], device=device)  # (B, T)
    attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)  # (B, T)
    sel = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)[:, 1:].bool()  # (B, T-1)
    targets = input_ids[:, 1:][sel]  # (N,)
    if plain_lm_head(model):
        x = last_hidden_state(model, input_ids=input_ids, attention_mask=attn)[:, :-1][sel]  # (N, H)
        w = model.get_output_embeddings().weight  # (V, H)
    else:
        x, w = model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits[:, :-1][sel], None  # (N, V)

    def nll(xc, yc):
        return torch.nn.functional.cross_entropy((xc @ w.T if w is not None else xc).float(), yc, reduction="sum")

    total = x.sum() * 0.0  # keeps a backward through the model when no position is trained
    for c in range(0, x.shape[0], chunk):
        total = total + torch.utils.checkpoint.checkpoint(
            nll, x[c : c + chunk], targets[c : c + chunk], use_reentrant=False
        )  # (chunk, V) logits recomputed
    return total, int(sel.sum().item())


# --------------------------------------------------------------------------------------------
# CPU decoding (rollout.generate_hf)
# --------------------------------------------------------------------------------------------
def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, gen, draw
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob under `sampling_logprobs`' distribution. (B, V) -> (B,), (B,)
    `gen` and `draw`: rollout.sample_tokens and its generator (one uniform per row, inverse CDF).

    Why not filter the whole vocabulary: with top-k only k tokens can be drawn, so top-p, the log-softmax and
    the inverse-CDF draw run over the (B, k) candidates that torch.topk returns already sorted. The
    full-vocabulary sort, exp and scatter cost ~45 ms of a ~290 ms decoding step at batch 32 here."""
    if temperature <= 0:
        lp = torch.log_softmax(logits.float(), dim=-1)
        tok = lp.argmax(-1)
        return tok, lp.gather(-1, tok[:, None]).squeeze(-1)
    z, idx = logits.float() / temperature, None  # idx: candidate -> vocabulary id, None = the identity
    if 0 < top_k < z.shape[-1]:
        z, idx = torch.topk(z, top_k, dim=-1)
        idx, by_id = idx.sort(dim=-1)  # tied logits (bf16 has many) in vocabulary order, as rollout.sample_next's
        z, order = z.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)  # stable argsort draws them
        idx = idx.gather(-1, order)
    if top_p < 1.0:
        if idx is None:
            z, idx = torch.sort(z, dim=-1, descending=True, stable=True)
        p = torch.softmax(z, dim=-1)
        z = z.masked_fill(p.cumsum(-1) - p > top_p, float("-inf"))  # keep the smallest prefix reaching top_p
    lp = torch.log_softmax(z, dim=-1)
    pick = draw(lp, gen)
    chosen = lp.gather(-1, pick[:, None]).squeeze(-1)
    return (pick if idx is None else idx.gather(-1, pick[:, None]).squeeze(-1)), chosen


@contextlib.contextmanager
def skinny_linear(model, max_rows: int = 32):
    """Compute nn.Linear as (W @ x.T).T while few rows go through it (decoding).

    Why: for row-major weights and 8-32 rows, MKL's kernel for x @ W.T runs ~4x slower on this CPU than the same
    product ordered W @ x.T (the 49k-row LM head 2.5x). Same values, no weight copy; prefill (many rows) keeps the
    stock path. Restored on exit. The result is made contiguous (a copy of rows x out, ~0.1 MB a layer): with the
    transposed view's query at stride `rows`, torch's CPU sdpa skips its flash kernel for the math one, which
    repeats the grouped KV cache for every head at every step (7.2 s of a 21 s rollout at batch 16)."""
    if next(model.parameters()).device.type != "cpu":
        yield
        return
    patched = []

    def make_forward(mod):
        stock = mod.forward

        def forward(x):
            rows = x.numel() // x.shape[-1]
            if rows > max_rows:
                return stock(x)
            y = (mod.weight @ x.reshape(rows, -1).T).T.contiguous().reshape(*x.shape[:-1], mod.weight.shape[0])
            return y if mod.bias is None else y + mod.bias

        return forward

    for mod in model.modules():
        # plain nn.Linear only: subclasses (LoRA, quantized) and already-patched modules keep their own forward
        if type(mod) is torch.nn.Linear and "forward" not in mod.__dict__:
            patched.append(mod)
            mod.forward = make_forward(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward  # back to the class's forward


def preallocate_kv(cache, room: int = 256) -> None:
    """Make a prefilled DynamicCache append in place into buffers that double when full.

    Why: DynamicCache appends by torch.cat, copying the whole cache at every decoding step (29 ms of
    a 112 ms step here at batch 16); writing into spare room costs one token's worth, and doubling
    keeps the copies O(1) per token. Rows still leave through `cache.batch_select_indices`."""
    for layer in cache.layers:
        length = layer.keys.shape[-2]
        layer.kbuf = layer.keys.new_empty((*layer.keys.shape[:-2], length + room, layer.keys.shape[-1]))
        layer.vbuf = layer.values.new_empty((*layer.values.shape[:-2], length + room, layer.values.shape[-1]))
        layer.kbuf[..., :length, :], layer.vbuf[..., :length, :] = layer.keys, layer.values
        layer.length = length

        def update(k, v, *args, L=layer, **kwargs):
            end = L.length + k.shape[-2]
            if end > L.kbuf.shape[-2]:  # full: double the room
                L.kbuf, L.vbuf = (torch.cat([b, torch.empty_like(b)], dim=-2) for b in (L.kbuf, L.vbuf))
            L.kbuf[..., L.length : end, :], L.vbuf[..., L.length : end, :] = k, v
            L.length = end
            L.keys, L.values = L.kbuf[..., :end, :], L.vbuf[..., :end, :]
            return L.keys, L.values

        def select(indices, L=layer):
            L.kbuf, L.vbuf = L.kbuf[indices], L.vbuf[indices]
            L.keys, L.values = L.kbuf[..., : L.length, :], L.vbuf[..., : L.length, :]

        layer.update, layer.batch_select_indices = update, select


def lean_decoding(model) -> bool:
    """True when `LeanDecoder` computes this model's decoding step: a Llama-style decoder on the CPU (llama,
    qwen2, qwen3: RMSNorm, the model's own rotary module, grouped-query attention through torch's sdpa,
    optional q/k/v biases and Qwen3's q/k norms, a SiLU-gated MLP without bias, a bias-free linear LM head).
    Every linear it reads must be a plain nn.Linear with no hook and no patched forward (LoRA layers, a
    biased head in a test), else the model's own forward decodes. So do other models, and every GPU."""
    cfg = model.config
    if not (
        next(model.parameters()).device.type == "cpu"
        and cfg.model_type in ("llama", "qwen2", "qwen3")
        and getattr(cfg, "hidden_act", None) == "silu"
        and getattr(cfg, "_attn_implementation", None) in SDPA
        and not getattr(cfg, "use_sliding_window", False)
        and not getattr(cfg, "mlp_bias", False)
        and model.get_output_embeddings().bias is None
    ):
        return False

    def hooked(mod):
        return mod._forward_hooks or mod._forward_pre_hooks

    linears = [model.get_output_embeddings()]
    for layer in model.model.layers:
        linears += [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    plain = all(type(m) is torch.nn.Linear and "forward" not in m.__dict__ and not hooked(m) for m in linears)
    return plain and not hooked(model)


class LeanDecoder:
    """One decoding step of a `lean_decoding` model written out over its weights, from the KV cache of a
    transformers prefill: `step(ids, pos)` -> (B, V) next-token logits; `select(rows)` keeps those rows.

    Why: at 16 rows the model's forward spends more of a step on Python and dispatch (mask building, cache
    classes, reshapes, an RMSNorm in 6 ops) than on anything but the matmuls: written out, rollouts took
    12.6-13.3 s against 15.0-16.0 s, with the same tokens (PERFORMANCE.md). Every linear is `W @ x.T` (see
    `skinny_linear`); q and k are made contiguous, so that sdpa takes its flash kernel; the query heads of a
    key/value head go in the query-length slot (as transformers' own decoding does), so the cache is never
    repeated. Logits match a plain forward of the whole sequence within 1e-5 in fp32
    (test_lean_decoder_equals_model_forward); the buffers double when full, like `preallocate_kv`."""

    def __init__(self, model, cache, attention_mask: torch.Tensor, room: int = 256):
        self.model, cfg = model, model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.length = attention_mask.shape[1]
        self.kv = []
        for layer in cache.layers:
            k = layer.keys.new_empty((*layer.keys.shape[:2], self.length + room, layer.keys.shape[-1]))
            v = torch.empty_like(k)
            k[:, :, : self.length], v[:, :, : self.length] = layer.keys, layer.values
            self.kv.append((k, v))
        self.seen = attention_mask.new_zeros((attention_mask.shape[0], self.length + room), dtype=torch.bool)
        self.seen[:, : self.length] = attention_mask.bool()  # the prompt's left padding stays unseen

    def select(self, rows: torch.Tensor) -> None:
        self.kv = [(k[rows], v[rows]) for k, v in self.kv]
        self.seen = self.seen[rows]

    @staticmethod
    def linear(mod, x_t: torch.Tensor) -> torch.Tensor:  # x_t (in, B) -> (B, out)
        y = (mod.weight @ x_t).T
        return y if mod.bias is None else y + mod.bias

    @staticmethod
    def norm(x: torch.Tensor, mod) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), mod.weight, mod.variance_epsilon)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x (B, h, d), cos (B, 1, d)
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.length == self.seen.shape[1]:  # full: double the room
            self.kv = [tuple(torch.cat([b, torch.empty_like(b)], dim=2) for b in kv) for kv in self.kv]
            self.seen = torch.cat([self.seen, torch.zeros_like(self.seen)], dim=1)
        t, self.length = self.length, self.length + 1
        self.seen[:, t] = True
        m, B, lin = self.model.model, ids.shape[0], self.linear
        x = m.embed_tokens(ids)  # (B, H)
        cos, sin = m.rotary_emb(x, pos[:, None])  # (B, 1, d)
        seen = self.seen[:, : self.length]
        mask = None if bool(seen.all()) else seen.contiguous()[:, None, None, :]  # no mask: sdpa's fastest path
        for layer, (K, V) in zip(m.layers, self.kv):
            a = layer.self_attn
            h = self.norm(x, layer.input_layernorm).T
            q = lin(a.q_proj, h).contiguous().view(B, self.heads, -1)
            k = lin(a.k_proj, h).contiguous().view(B, self.kv_heads, -1)
            if hasattr(a, "q_norm"):  # Qwen3
                q, k = self.norm(q, a.q_norm), self.norm(k, a.k_norm)
            K[:, :, t], V[:, :, t] = self.rope(k, cos, sin), lin(a.v_proj, h).view(B, self.kv_heads, -1)
            q = self.rope(q, cos, sin).view(B, self.kv_heads, self.heads // self.kv_heads, -1)
            o = torch.nn.functional.scaled_dot_product_attention(
                q, K[:, :, : self.length], V[:, :, : self.length], attn_mask=mask, scale=a.scaling
            )
            x = x + lin(a.o_proj, o.reshape(B, -1).T)
            h = self.norm(x, layer.post_attention_layernorm).T
            mlp = layer.mlp
            x = x + lin(mlp.down_proj, (torch.nn.functional.silu(lin(mlp.gate_proj, h)) * lin(mlp.up_proj, h)).T)
        return lin(self.model.lm_head, self.norm(x, m.norm).T)

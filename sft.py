"""sft.py -- the trainers' plumbing (ranks, FSDP2, AdamW, resume, metrics, --wandb) and SFT (Sec. 4).

Implements, for arXiv 2603.24472:
  - Sec. 4, Table 2: off-policy self-distillation. The model is fine-tuned on (x -> y) with the prompt masked, in
    its own chat template, on D_ug (correct unguided responses, c = {}) or D_sg (correct solution-guided ones,
    c = s), which `evaluate.py build` samples from the model itself (800 each in the paper), so that it learns to
    answer x as if it had seen s.
        python sft.py --data D.jsonl ...                 -> checkpoints OUT/step_N/
  - the plumbing every trainer shares (grpo.py and sdpo.py too): `TrainerArgs` and `RunArgs` (the flags), `setup`
    (ranks, problems, the sharded policy, optimizer, generation backend, resume), `shard_model` (FSDP2), the
    optimizer and its schedule (App. D Table 8), resume, metrics over ranks, `--wandb`, and the
    per-GPU memory estimate that refuses a run before it loads (`memory_plan`, `check_memory`).

The loss is `token_nll` over the full logits, or under --fast (the default) fast.token_nll: the LM head on
response positions only, in chunks recomputed in backward, so (T, V) logits never exist.

Checkpoints: OUT/step_N/ is a Hugging Face directory (config.json, tokenizer, model.safetensors: the policy, the
only top-level weights, as vLLM's loader wants) that AutoModelForCausalLM.from_pretrained loads as it is, plus
optimizer/shard_R.safetensors (each rank's rows of the AdamW state and its RNG state; a resumed run may have another
number of ranks), SDPO's EMA teacher as a HF directory teacher/, and trainer_state.json; nothing is pickled. It is
written under a temporary name and renamed, so a kill or a full disk at any moment leaves the previous checkpoint
whole. `--resume` continues from the latest one with the same data order: on CPU in fp32 the resumed run's metrics
equal an uninterrupted run's. `--keep-checkpoints N` (default 2) removes complete checkpoints older than the N newest.
The checkpoint functions (`save_checkpoint` to `resume_point`) need torch and safetensors alone.

Copying: needs data.py, rollout.py and epistemic.py beside it (fast.py under --fast).

Departures, and why:
  1. App. D gives no SFT hyperparameters for Sec. 4; defaults here are LR 1e-5 (SDPO's, Table 10),
     10 warmup steps, weight decay 0.01, grad clip 1.0, global batch 32.
  2. The loss is the token mean over the global batch (every response token of every rank and
     micro-batch weighs the same), so micro-batching and the number of ranks don't change it.
  3. The LR schedule is a function of the step (linear warmup, then constant, as verl's default),
     so the scheduler's state is the step itself.

Run it:
    python evaluate.py select --data synthetic:difficulty=1,n=64 --lenient --keep 16 --out runs/select
    python evaluate.py build --setting solution --data runs/select/selected.jsonl --lenient --out runs/d_sg.jsonl
    python sft.py --data runs/d_sg.jsonl --steps 20 --out runs/sft_sg
    torchrun --nproc_per_node 2 sft.py --data runs/d_sg.jsonl --steps 20 --out runs/sft_sg
    python sft.py --data runs/d_sg.jsonl --steps 40 --out runs/sft_sg --resume   # after a kill
    # the paper (Sec. 4, 8 GPUs): DeepSeek-R1-Distill-Qwen-7B, 800 problems selected (README: Table 2)
    torchrun --nproc_per_node 8 evaluate.py build --setting solution --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \\
        --backend vllm --data S/selected.jsonl --max-new-tokens 32768 --out d_sg.jsonl
    torchrun --nproc_per_node 8 sft.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --data d_sg.jsonl \\
        --max-len 34816 --grad-ckpt --micro-batch 1 --steps 25 --out runs/sft_sg
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from tqdm import tqdm
from transformers.hf_argparser import HfArg

import data
import rollout
from rollout import init_distributed, print0


@dataclass
class TrainerArgs:
    """The flags of every trainer (`sft.py`, grpo.py, sdpo.py): the model, the optimizer (AdamW, App. D
    Table 8), precision, memory knobs, checkpoints and logging."""

    model: str = HfArg(default=rollout.EMBEDDED, help="initial model: Hugging Face id or directory, or 'smollm2-135m'")
    out: str = HfArg(default="runs/grpo", help="output directory: metrics.jsonl, step_N/ checkpoints")
    steps: int = HfArg(default=10, help="optimizer steps (RL: one per batch of rollouts)")
    seed: int = HfArg(default=0, help="seed for data order and sampling")
    thinking: str = HfArg(default="auto", help="Qwen3-style chat templates: on | off | auto")
    system: str | None = HfArg(default=None, help="system prompt; None = the template's default")
    lr: float = HfArg(default=1e-6, help="peak learning rate, after the warmup (GRPO, Table 9: 1e-6)")
    warmup: int = HfArg(default=10, help="linear warmup steps (Table 8: 10)")
    weight_decay: float = HfArg(default=0.01, help="AdamW weight decay (Table 8: 0.01)")
    grad_clip: float = HfArg(default=1.0, help="gradient clip norm (Table 8: 1.0)")
    dtype: str = HfArg(
        default="auto",
        help="float32 | bfloat16 | auto (bf16 where the device computes it natively: rollout.native_bf16). bf16: the "
        "forwards compute in bf16 over fp32 master weights, gradients and AdamW state (GPU: FSDP2's mixed precision; "
        "CPU: the RL trainers' bf16 generation replica, whose gradients land in the masters; sft.py and torchrun: "
        "torch.autocast); the RL trainers' frozen teacher or reference policy hold bf16 weights",
    )
    micro_batch: int = HfArg(
        default=4, help="sequences per forward/backward on one rank (memory knob; gradients accumulate)"
    )
    grad_ckpt: bool = HfArg(default=False, help="gradient checkpointing (memory knob)")
    chunk: int = HfArg(
        default=0, help="--fast: positions per chunk of the LM-head losses (memory knob); 0 = 256 on CPU, 1024 on GPU"
    )
    fast: bool = HfArg(
        default=True,
        help="speedups from fast.py (the same updates up to float rounding); --no-fast runs the plain code only",
    )
    save_every: int = HfArg(
        default=10, help="checkpoint every this many steps (and at the end); 0 = never (benchmarks)"
    )
    keep_checkpoints: int = HfArg(
        default=2, help="keep this many newest checkpoints in --out, removing older ones (0 = keep all)"
    )
    resume: bool = HfArg(default=False, help="continue from the latest complete checkpoint in --out")
    wandb: str | None = HfArg(
        default=None,
        help="log the metrics to this Weights & Biases project too (rank 0; pip install wandb; WANDB_MODE=offline "
        "works)",
    )

    def __post_init__(self):
        data.check(self, "steps lr warmup weight_decay save_every chunk keep_checkpoints", *data.NON_NEGATIVE)
        data.check(self, "micro_batch grad_clip", *data.POSITIVE)
        data.choose(self, "thinking", data.THINKING)
        data.choose(self, "dtype", data.DTYPES)


@dataclass
class TrainArgs(TrainerArgs):
    data: str = HfArg(
        default="runs/d_sg.jsonl",
        help="SFT jsonl with 'question' (or 'prompt') and 'response' per row (e.g. from `evaluate.py build`), or an "
        "embedded source whose solutions are the responses (synthetic:style=think,n=512: the reasoning warm start)",
    )
    out: str = HfArg(default="runs/sft", help="output directory: step_N/ checkpoints and metrics.jsonl")
    steps: int = HfArg(default=20, help="optimizer steps")
    batch_size: int = HfArg(default=32, help="sequences per optimizer step, over all ranks")
    lr: float = HfArg(default=1e-5, help="peak learning rate (App. D gives none for SFT; SDPO's 1e-5)")
    max_len: int = HfArg(default=2048, help="truncate prompt + response to this many tokens")
    fast: bool = HfArg(
        default=True,
        help="the LM head on response positions only, in chunks recomputed in backward (fast.token_nll); --no-fast: "
        "the full logits",
    )

    def __post_init__(self):
        super().__post_init__()
        data.check(self, "batch_size max_len", *data.POSITIVE)


# --------------------------------------------------------------------------------------------
# Plumbing (grpo.py and sdpo.py use these)
# --------------------------------------------------------------------------------------------
@dataclass
class RunArgs(TrainerArgs):
    """The flags every RL trainer shares beside TrainerArgs' (grpo.RLArgs extends it, grpo.Args and sdpo.Args extend
    that): the data, held-out evaluation, the reward window, the generation backend, and the speedups of fast.py."""

    dedup: bool = HfArg(
        default=False,
        help="keep one row of each repeated question of --data. DAPO-Math-17k ships ~100 copies of each; the "
        "released pipeline keeps them all and samples rows (Sec. 6.1: 100 steps x 256 prompts see ~14k distinct "
        "problems)",
    )
    eval_data: list[str] = HfArg(
        default_factory=lambda: ["synthetic:split=ood,difficulty=1,n=16"],
        help="held-out benchmarks for --eval-every (the paper: AIME24, AMC23)",
    )
    eval_every: int = HfArg(default=0, help="evaluate on --eval-data every this many steps (0 = only at the end)")
    eval_n: int = HfArg(
        default=4, help="samples per eval problem (the figures' Acc@16: 16; the released scripts validate with 1)"
    )
    eval_max_new_tokens: int = HfArg(default=128, help="eval response budget (Table 11: 38912)")
    eval_temperature: float = HfArg(
        default=0.6, help="eval sampling temperature (Table 11: 0.6; Qwen3-8B thinking off: 0.7)"
    )
    eval_top_p: float = HfArg(default=0.95, help="eval nucleus (Table 11: 0.95; Qwen3-8B thinking off: 0.8)")
    eval_top_k: int = HfArg(
        default=0,
        help="eval top-k, 0 = off (the released validation, user.yaml val_kwargs, sets none; Table 11 lists 20)",
    )
    reward_window: int = HfArg(
        default=100,
        help="the training reward looks for the box in the last this many characters of a response (the released "
        "reward: 100, so a response with more after its box scores 0); 0 = all of it. Evaluation always reads all of "
        "it",
    )
    save_rollouts: bool = HfArg(
        default=False,
        help="append each step's rollouts to OUT/rollouts.jsonl (ids, text, log-probs, reward, advantage; SDPO: "
        "context c)",
    )
    backend: str = HfArg(
        default="hf", help="rollouts: hf (transformers, CPU/GPU) or vllm (GPU, weights pushed every step)"
    )
    gen_batch_size: int = HfArg(default=64, help="hf backend: sequences decoded together")
    vllm_gpu_memory: float = HfArg(
        default=0.0,
        help="vllm: share of total GPU memory for the engine; 0 = the largest that fits beside the trainer's "
        "weights, AdamW and teacher (`sft.memory_plan`, at most 0.9)",
    )
    vllm_sleep: int = HfArg(
        default=2,
        help="vllm: engine sleep level while the trainer runs (2: weights and KV cache freed, 1: weights in CPU "
        "memory, 0: never)",
    )
    skip_zero_rows: bool = HfArg(
        default=True,
        help="--fast: leave out of the training forwards the rows whose gradient is exactly zero (GRPO: zero "
        "advantage and no KL; SDPO: no distilled position and no --pg-coef term); they still count in the loss's "
        "means",
    )
    pack_tokens: int = HfArg(
        default=2048,
        help="--fast: a prompt's rollouts share one copy of it in a row of at most this many tokens "
        "(fast.pack_batch); 0 = one padded row per rollout",
    )
    segment_attention: bool = HfArg(
        default=True,
        help="--fast: packed rows attend response by response (fast.segment_attention), not through one block mask",
    )

    def __post_init__(self):
        super().__post_init__()
        data.check(self, "eval_every eval_temperature eval_top_k pack_tokens reward_window", *data.NON_NEGATIVE)
        data.check(self, "eval_n eval_max_new_tokens gen_batch_size", *data.POSITIVE)
        data.check(self, "eval_top_p", *data.FRACTION)
        data.check(self, "vllm_gpu_memory", *data.UNIT)
        data.choose(self, "backend", data.BACKENDS)
        data.choose(self, "vllm_sleep", (0, 1, 2))


def finish(run: Run) -> None:
    """The end of a run: the Weights & Biases run closed (--wandb)."""
    if run.wandb is not None:
        run.wandb.finish()


def world_info() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shard_model(model, device, grad_ckpt: bool = False, mixed_precision: bool = False):
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, norm, tied LM head).

    bf16 mixed precision (fp32 master weights and gradient reduction) is for GPUs; a CPU computes in bf16 in a bf16
    copy (`bf16_compute_copy`) or under torch.autocast (`rollout.autocast`), no process group for one process. A
    single process without mixed precision keeps the plain module (the same math, no collectives); with it,
    the module is sharded over a one-rank group too, so that one GPU computes in bf16 as eight do."""
    if grad_ckpt:
        checkpoint_layers(model)
    model.to(device).train()
    _, world = world_info()
    if world == 1 and not mixed_precision:
        return model
    rollout.one_rank_group(device)  # no-op under torchrun with several ranks
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def checkpoint_layers(model) -> None:
    """--grad-ckpt: each decoder layer's activations recomputed in the backward (non-reentrant), in training mode
    only; decoding runs in `rollout.eval_mode`, where transformers keeps its KV cache."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' current name (it warns on the old one)
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def bf16_compute_copy(replica, model, segment_attention: bool = False, grad_ckpt: bool = False):
    """CPU bf16 mixed precision, computed as FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) does
    on GPUs: the bf16 generation replica also runs the training forwards and backwards, and a hook on each of its
    parameters adds the bf16 gradient, upcast, into the fp32 master's .grad (summed over micro-batches) and frees
    it. AdamW steps the fp32 masters; `apply_update` copies them, rounded, back into the replica after each update,
    as FSDP2 casts its shards at each forward. Against autocast over the masters this saves the casts of
    every weight at every forward and their fp32 gradients in the backward, and the activations (the residual stream
    too) are bf16. One process (FSDP2 shards the masters under torchrun). The replica is put in training mode (it
    decodes in `rollout.eval_mode`), with its layers checkpointed under --grad-ckpt. Returns the replica."""
    if grad_ckpt:
        checkpoint_layers(replica)
    replica.train()
    if segment_attention:
        import fast

        fast.use_segment_attention(replica)
    masters = dict(model.named_parameters())

    def into_master(q, master):
        if master.grad is None:
            master.grad = q.grad.float()
        else:  # 1024 rows at a time: an fp32 copy of a block, not of the whole gradient (113 MB for a tied head)
            for m, g in zip(master.grad.split(1024), q.grad.split(1024)):
                m.add_(g)
        q.grad = None

    for name, q in replica.named_parameters():
        q.requires_grad_(True)
        q.register_post_accumulate_grad_hook(functools.partial(into_master, master=masters[name]))
    return replica


RESERVE_GB = 4.0  # per GPU, outside every estimate: the CUDA context, NCCL's buffers, the allocator's fragmentation


def model_sizes(config) -> dict:
    """What `memory_plan` needs of a causal LM, from its config alone (the model is built on the meta device): the
    parameter count, one decoder layer's and the rest's (embeddings, final norm, an untied head), the hidden size,
    the layers, the vocabulary, and the bytes of KV cache per token in bf16."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    layers = len(model.model.layers)
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return dict(
        params=params,
        layer=layer,
        root=params - layer * layers,
        hidden=text.hidden_size,
        layers=layers,
        vocab=text.vocab_size,
        kv_per_token=2 * layers * kv_heads * head_dim * 2,
    )


def memory_plan(
    sizes: dict,
    world: int,
    gpu_gb: float,
    tokens: int,
    grad_ckpt: bool = True,
    chunk: int = 1024,
    teacher_tokens: int = 0,
    ema: bool = False,
    share: float = 0.0,
    sleep: int = 2,
    engine_len: int = 0,
) -> dict:
    """Per-GPU memory of a run, in GB (1e9 bytes), estimated from the sizes of its parts; an estimate, not a
    measurement (the README's table for the paper's models comes from here).

    P parameters over `world` ranks: fp32 weights 4P/world, fp32 gradients 4P/world (freed after each update),
    AdamW's two moments 8P/world; FSDP2 gathers the bf16 root and two layers (one computing, one prefetched).
    Activations of a micro-batch of `tokens` positions, hidden size H, L layers: 34 bytes per position and
    hidden unit for a layer (Korthikanti et al. 2022, with fused attention); under --grad-ckpt only each layer's
    bf16 input (2 bytes) plus one layer recomputed. The LM head: a chunk's fp32 logits, log-probs and their
    gradient, and the unsharded fp32 head gradient. SDPO (teacher_tokens > 0): the bf16 teacher, whole on every
    rank, and its no-grad forward over the teacher's longer sequence; --teacher-ema adds fp32 shards.

    During rollouts the trainer keeps its weights, AdamW and the teacher (`resident`) beside the engine's share of
    the GPU; during training the engine sleeps (levels 1 and 2 free its GPU memory; level 0 keeps it). share 0:
    the largest share that fits beside the trainer, at most 0.9. A plan whose peaks exceed gpu_gb - RESERVE_GB,
    or whose engine cannot hold its bf16 weights and one sequence of engine_len tokens, has `problem` set."""
    p, h, n_layers, v = sizes["params"], sizes["hidden"], sizes["layers"], sizes["vocab"]
    gb = 1e9
    part = dict(
        weights=4 * p / world / gb,
        adam=8 * p / world / gb,
        ema=4 * p / world / gb if ema else 0.0,
        teacher=2 * p / gb if teacher_tokens else 0.0,
        grads=4 * p / world / gb,
        gathered=2 * (sizes["root"] + 2 * sizes["layer"]) / gb,
        activations=tokens * h * (2 * n_layers + 34 if grad_ckpt else 34 * n_layers) / gb,
        head=(12 * chunk * v + 4 * v * h) / gb,
        teacher_forward=(34 * teacher_tokens * h + 8 * chunk * v) / gb if teacher_tokens else 0.0,
    )
    resident = part["weights"] + part["adam"] + part["ema"] + part["teacher"]
    training = resident + sum(part[k] for k in ("grads", "gathered", "activations", "head", "teacher_forward"))
    room = gpu_gb - RESERVE_GB
    plan = dict(part, resident=resident, training=training, generating=resident, share=0.0, min_share=0.0)
    if engine_len:  # a colocated vLLM engine of max_model_len engine_len
        auto = max(0.0, min(0.9, (room - (training if sleep == 0 else resident)) / gpu_gb))
        share = share or auto
        engine = share * gpu_gb
        min_engine = (2 * p + sizes["kv_per_token"] * engine_len) / gb + 2.0  # bf16 weights, a sequence, workspace
        plan.update(
            training=training + (engine if sleep == 0 else 0.0),
            generating=resident + engine,
            share=share,
            min_share=min_engine / gpu_gb,
        )
    plan["problem"] = None
    if max(plan["training"], plan["generating"]) > room or plan["share"] < plan["min_share"]:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in part.items() if v)
        engine = (
            f"rollouts {plan['generating']:.1f} GB (the trainer's {resident:.1f} + the engine's "
            f"{plan['share'] * gpu_gb:.1f} at --vllm-gpu-memory {plan['share']:.2f}, which needs at least "
            f"{plan['min_share']:.2f}), "
            if engine_len
            else ""
        )
        plan["problem"] = (
            f"estimated per-GPU memory on {world} GPU(s) of {gpu_gb:.0f} GB ({RESERVE_GB:.0f} GB kept free): training "
            f"peak {plan['training']:.1f} GB, {engine}parts in GB: {parts}. Run on more GPUs (weights, gradients "
            f"and AdamW shard over them), add --grad-ckpt, lower --micro-batch"
            + (" or set --vllm-gpu-memory" if engine_len else "")
        )
    return plan


def check_memory(args, model_path: str, device, world: int, engine_len: int = 0) -> float:
    """Refuse, before loading anything large, a run that `memory_plan` says does not fit on this GPU; returns the
    engine's share of GPU memory (--vllm-gpu-memory, or the plan's largest that fits when it is 0). On CPU nothing
    is checked, and a share of 0 becomes 0.5 (only the tests' fake engine runs there)."""
    share = getattr(args, "vllm_gpu_memory", 0.0)
    if torch.device(device).type != "cuda":
        return share or 0.5
    from transformers import AutoConfig

    sizes = model_sizes(AutoConfig.from_pretrained(rollout.resolve_model_path(model_path)))
    sdpo = hasattr(args, "teacher_context")
    seq = args.max_len if hasattr(args, "max_len") else args.max_prompt_len + args.max_new_tokens
    plan = memory_plan(
        sizes,
        world,
        torch.cuda.get_device_properties(device).total_memory / 1e9,
        args.micro_batch * seq,
        args.grad_ckpt,
        chunk_size(args.chunk, device),
        teacher_tokens=args.micro_batch * (args.max_reprompt_len + args.max_new_tokens) if sdpo else 0,
        ema=getattr(args, "teacher_ema", 0) > 0,
        share=share,
        sleep=getattr(args, "vllm_sleep", 2),
        engine_len=engine_len,
    )
    if plan["problem"]:
        raise ValueError(plan["problem"])
    return plan["share"]


def chunk_size(chunk: int, device) -> int:
    """Positions per LM-head chunk: `chunk`, or for 0 a size that suits the device. CPU: 256 ((256, V) fp32 logits,
    50 MB at V = 49k, stay in cache-friendly sizes). GPU: 1024 (600 MB at V = 152k: large enough matmuls,
    small beside a 7B model's activations)."""
    if chunk < 0:
        raise ValueError(f"--chunk {chunk}: positions per chunk, >= 1, or 0 for the device's default")
    return chunk or (1024 if torch.device(device).type == "cuda" else 256)


def reshard(model) -> None:
    """Free the weights a no-grad forward gathered under FSDP2 (a no-op for a plain module).

    Why: fully_shard keeps the root's parameters unsharded after its forward, and only a backward reshards them.
    After a no-grad forward with no backward behind it (grpo's pi_old, when an update then has no trainable row),
    those parameters would get plain zero gradients beside the others' sharded ones, which clip_grad_norm_ cannot
    mix."""
    if hasattr(model, "reshard"):
        model.reshard()


def make_optimizer(model, lr: float, weight_decay: float = 0.01):
    """AdamW (App. D Table 8). The LR is set every step by `lr_at`.

    fused=True on CPU and CUDA. Why: the default (foreach) builds lists of temporaries as large as the
    parameters; the fused kernel updates each tensor in one pass. For the 135M model on 2 CPU cores: 0.1 s
    per step against 0.65-1.0 s, and no 0.5 GB transient; the weights agree within 1e-9. FSDP2's sharded
    (DTensor) parameters take the fused kernel too."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8, fused=fused
    )


def lr_at(step: int, lr: float, warmup: int) -> float:
    """The LR of step `step` (0-based): lr * step / warmup during the warmup, then lr. Step 0 gets 0, as verl's
    constant schedule with warmup (verl/utils/torch_functional.py get_constant_schedule_with_warmup, stepped once
    per training step in fsdp_workers.update_actor): AdamW's moments still take step 0's gradient."""
    return lr * min(1.0, step / warmup) if warmup > 0 else lr


def all_reduce_sum(x: float) -> float:
    if not dist.is_initialized():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)  # collective: every rank contributes its share
    return float(t.item())


def clip_grads(model, max_norm: float) -> float:
    """Clip the global gradient norm (DTensor-aware under FSDP2); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _write_json(path: Path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    out, step: int, model, tokenizer, optimizer, state: dict, extra_tensors: dict | None = None, keep: int = 0
) -> Path:
    """Write OUT/step_N atomically: a HF directory (config, tokenizer, model.safetensors: the policy alone), each
    rank's optimizer shard and RNG state (`optimizer/shard_R.safetensors`, `optimizer_shard`), trainer_state.json,
    and one HF directory NAME/ per entry of extra_tensors ({NAME: {key: tensor}}, e.g. the EMA teacher).

    Why NAME/ and not NAME.safetensors: vLLM's default loader reads every top-level *.safetensors of a directory
    without model.safetensors.index.json (vllm/model_executor/model_loader/default_loader.py, 0.33), so a second
    model's weights there would overwrite the policy's. Why per-rank shards: gathering a 7B run's AdamW state onto
    rank 0 moves 61 GB through one process; each rank writes its own rows instead, and `load_checkpoint` reads
    them back onto any number of ranks. Everything is safetensors or JSON: nothing is unpickled on load.

    Collective (every rank calls it). Everything goes to OUT/.step_N.tmp first; the rename to OUT/step_N is the
    last act, so a kill or an OSError (disk full) on any rank leaves earlier checkpoints whole.
    keep > 0: then the complete checkpoints older than the `keep` newest are removed (`prune_checkpoints`)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, world = world_info()
    out = Path(out)
    final, tmp = out / f"step_{step}", out / f".step_{step}.tmp"
    opts = StateDictOptions(full_state_dict=True, cpu_offload=world > 1)
    model_sd = get_model_state_dict(model, options=opts)  # collective: gathers the FSDP shards onto rank 0
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "optimizer").mkdir(parents=True)
        except OSError as e:
            error = e
    if all_reduce_sum(error is not None) == 0:  # collective: the directory exists for every rank
        try:
            tensors, offsets = optimizer_shard(model, optimizer)
            save_file(tensors, tmp / "optimizer" / f"shard_{rank}.safetensors", metadata={"offsets": offsets})
            if rank == 0:
                save_hf_dir(tmp, model, tokenizer, model_sd)
                for name, extra in (extra_tensors or {}).items():
                    save_hf_dir(tmp / name, model, tokenizer, extra)
        except OSError as e:
            error = e
    failed = all_reduce_sum(error is not None) > 0  # collective: every rank learns whether any write failed
    if not failed and rank == 0:
        try:
            _write_json(tmp / "trainer_state.json", {**state, "step": step, "world": world})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            error = e
    failed = all_reduce_sum(error is not None) > 0
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(
            f"checkpoint step {step} not written ({error or 'another rank failed'}); earlier checkpoints "
            f"in {out} are intact"
        )
    if rank == 0:
        prune_checkpoints(out, keep)
    return final


def save_hf_dir(path: Path, model, tokenizer, state_dict: dict) -> None:
    """A Hugging Face directory of `model`'s config and tokenizer with these weights (rank 0)."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if getattr(model.config, "tie_word_embeddings", False):
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}  # from_pretrained re-ties it
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().contiguous() for k, v in state_dict.items()},
        path / "model.safetensors",
        metadata={"format": "pt"},
    )


def first_row(p) -> int:
    """The row of the full tensor where this rank's shard of `p` starts: FSDP2 shards dim 0 as torch.chunk does
    (chunks of ceil(n / world) rows); a plain tensor starts at 0."""
    if not hasattr(p, "to_local"):
        return 0
    from torch.distributed.tensor import Shard

    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"a parameter sharded as {p.placements}; the checkpoint handles FSDP2's Shard(0)")
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    return min(rank * -(-n // world), n)


def optimizer_shard(model, optimizer) -> tuple[dict, str]:
    """This rank's optimizer state as plain CPU tensors keyed "param/state" (its rows of each), its RNG state under
    "rng", and a JSON of each tensor's first row in the full tensor (None: a scalar such as `step`)."""
    tensors, offsets = {"rng": torch.get_rng_state()}, {}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            local = value.to_local() if hasattr(value, "to_local") else value
            tensors[f"{name}/{key}"] = local.detach().cpu().contiguous()
            offsets[f"{name}/{key}"] = first_row(value) if value.dim() else None
    return tensors, json.dumps(offsets)


def load_optimizer_shards(path: Path, model, optimizer) -> None:
    """Restore the optimizer state from `optimizer_shard`'s files, written on any number of ranks: each rank reads
    the rows of its own shard from the files that hold them (safetensors slices, no unpickling); and this rank's
    RNG state, where the writing run had a rank of this number."""
    from safetensors import safe_open

    rank, _ = world_info()
    files = sorted((path / "optimizer").glob("shard_*.safetensors"), key=lambda f: int(f.stem[6:]))
    if not files:
        raise ValueError(f"{path}: no optimizer/shard_R.safetensors (a checkpoint of an older version?)")
    with contextlib.ExitStack() as stack:
        shards = [stack.enter_context(safe_open(f, "pt")) for f in files]
        offsets = [json.loads(s.metadata()["offsets"]) for s in shards]
        for name, p in model.named_parameters():
            state = {}
            for key in (k for k in offsets[0] if k.rpartition("/")[0] == name):
                if offsets[0][key] is None:  # a scalar (AdamW's step), the same on every rank
                    state[key.rpartition("/")[2]] = shards[0].get_tensor(key).to(p.device)
                    continue
                local = p.to_local() if hasattr(p, "to_local") else p
                start, stop = first_row(p), first_row(p) + local.shape[0]
                pieces = []
                for shard, offset in zip(shards, offsets):
                    rows = shard.get_slice(key)
                    lo, hi = max(start, offset[key]), min(stop, offset[key] + rows.get_shape()[0])
                    if lo < hi:
                        pieces.append(rows[lo - offset[key] : hi - offset[key]])
                value = torch.cat(pieces).to(local.device)
                if hasattr(p, "to_local"):
                    from torch.distributed.tensor import DTensor

                    value = DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                state[key.rpartition("/")[2]] = value
            if state:
                optimizer.state[p] = state
        if rank < len(shards):
            torch.set_rng_state(shards[rank].get_tensor("rng"))


def complete_checkpoints(out) -> list[Path]:
    """OUT's complete checkpoints (step_N/ with trainer_state.json), oldest first; temporary directories are not."""
    out = Path(out)
    steps = []
    for d in out.glob("step_*") if out.is_dir() else []:
        if d.is_dir() and d.name[5:].isdigit() and (d / "trainer_state.json").exists():
            steps.append((int(d.name[5:]), d))
    return [d for _, d in sorted(steps)]


def latest_checkpoint(out) -> Path | None:
    """The complete checkpoint with the highest step in OUT (temporary directories are ignored)."""
    done = complete_checkpoints(out)
    return done[-1] if done else None


def prune_checkpoints(out, keep: int) -> None:
    """Remove the complete checkpoints older than the `keep` newest (0 = keep all). The newest always stays, and
    so does anything not complete. Why: a 7B checkpoint with its fp32 optimizer state is ~91 GB."""
    if keep > 0:
        for d in complete_checkpoints(out)[:-keep]:
            shutil.rmtree(d)


def load_checkpoint(path, model, optimizer) -> dict:
    """Restore the optimizer state and this rank's RNG (`load_optimizer_shards`, on any number of ranks); returns
    trainer_state. The model weights are loaded before sharding, with from_pretrained(path)."""
    path = Path(path)
    load_optimizer_shards(path, model, optimizer)
    return json.loads((path / "trainer_state.json").read_text())


def resume_point(out, resume: bool) -> Path | None:
    """--resume: the latest complete checkpoint in OUT (an error when there is none); None without the flag."""
    if not resume:
        return None
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise ValueError(f"--resume: no complete checkpoint (step_N/ with trainer_state.json) in {out}")
    return ckpt


def append_metrics(path: Path, row: dict, resumed_from: int | None = None):
    """metrics.jsonl on rank 0. On resume, rows past the checkpoint's step are dropped first."""
    if resumed_from is not None and path.exists():
        lines = path.read_text().splitlines()
        keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= resumed_from]
        path.write_text("".join(line + "\n" for line in keep))
    if row:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def sum_over_ranks(sums: Counter) -> Counter:
    """A step's named sums (a Counter: `sums.update(name=value)` adds) added over the ranks in one all-reduce. A
    name that some rank never added counts 0 there."""
    keys = sorted(set(sums))
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, keys)  # the union of the ranks' names, in one order
        keys = sorted(set().union(*every))
    t = torch.tensor(
        [float(sums[k].detach() if torch.is_tensor(sums[k]) else sums[k]) for k in keys], dtype=torch.float64
    )
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return Counter(dict(zip(keys, t.tolist())))


def ratio(a: float, b: float) -> float | None:
    """a / b, or None when b is 0 (a mean over nothing)."""
    return a / b if b else None


@dataclass
class Run:
    """What a training loop holds, built by `setup`; sdpo.py's train step reads it."""

    args: object  # grpo.Args or sdpo.Args
    rank: int
    world: int
    device: torch.device
    problems: list
    benchmarks: dict
    model: object  # the policy: its fp32 master weights, which AdamW steps and checkpoints save
    tokenizer: object
    backend: rollout.Backend
    optimizer: object
    start: int
    out: Path
    resumed_from: Path | None = None  # the checkpoint this run continues, if any
    checkpoint_extra: object = None  # () -> {name: {key: tensor}} saved inside each checkpoint
    wandb: object = None  # --wandb: the Weights & Biases run (rank 0), else None
    compute: object = None  # the module the training forwards run: `bf16_compute_copy`, or the policy itself


def setup(args) -> Run:
    """Everything the RL trainers need: ranks, problems, policy (sharded), optimizer, generation backend, resume."""
    rank, _, world, device = init_distributed()
    args.dtype = rollout.compute_dtype(args.dtype, device)  # auto resolved, as the checkpoints record it
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the world size {world}")
    problems = data.load_problems(args.data, seed=args.seed, dedup=args.dedup)
    if args.coverage:
        problems = data.coverage_subset(problems, args.coverage, seed=args.seed)
    benchmarks = {data.benchmark_name(s): data.load_problems(s, seed=args.seed) for s in args.eval_data}
    ckpt = resume_point(args.out, args.resume)
    start_from = str(ckpt) if ckpt else args.model
    tok = rollout.load_tokenizer(start_from)
    engine = None
    if args.backend == "vllm":
        max_len = rollout.trainer_engine_length(tok, args, problems, benchmarks)
        share = check_memory(args, start_from, device, world, max_len)  # before anything large is loaded
        # the engine starts first: vLLM wants its share free at start-up, so the policy must not be on the GPU yet;
        # asleep (--vllm-sleep 1 or 2) it frees that share while the policy moves in, and wakes with its weights
        engine = rollout.Backend(
            "vllm",
            tok,
            llm=rollout.make_vllm(
                rollout.resolve_model_path(start_from),
                max_len,
                device=device,
                gpu_memory_utilization=share,
                enable_sleep_mode=args.vllm_sleep > 0,
                seed=args.seed + rank,
            ),
            max_model_len=max_len,
            sleep_level=args.vllm_sleep,
        )
        rollout.sleep_engine(engine)
    else:
        check_memory(args, start_from, device, world)
    model, _ = rollout.load_model(start_from, "float32", device)  # fp32 master weights
    bf16 = args.dtype == "bfloat16"
    replica = None  # a generation copy: under torchrun (each rank decodes alone), and in bf16 on a CPU
    if args.backend == "hf" and (world > 1 or bf16 and device.type == "cpu"):
        replica, _ = rollout.load_model(start_from, args.dtype, device)
    if engine is None:
        backend = rollout.Backend(
            "hf", tok, model=replica if replica is not None else model, batch_size=args.gen_batch_size, fast=args.fast
        )
    else:
        backend = engine
    if args.fast and args.segment_attention:
        import fast

        fast.use_segment_attention(model)
    model = shard_model(model, device, args.grad_ckpt, mixed_precision=bf16 and device.type == "cuda")
    compute = model
    if replica is not None and world == 1 and device.type == "cpu":  # bf16, one process
        compute = bf16_compute_copy(replica, model, args.fast and args.segment_attention, args.grad_ckpt)
    if backend.asleep:
        rollout.push_weights_to_vllm(backend, model)  # wakes the engine with the policy's weights (collective)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start = load_checkpoint(ckpt, model, optimizer)["step"] if ckpt else 0
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        append_metrics(out / "metrics.jsonl", {}, resumed_from=start)
        if ckpt:
            print(f"resumed from {ckpt} (step {start})")
    return Run(
        args,
        rank,
        world,
        device,
        problems,
        benchmarks,
        model,
        tok,
        backend,
        optimizer,
        start,
        out,
        ckpt,
        wandb=open_wandb(args.wandb, args, out),
        compute=compute,
    )


def forward_seconds(model) -> float:
    """Seconds spent in `model`'s forwards since the last call (`timed`)."""
    spent, model.seconds_in_forward = model.seconds_in_forward, 0.0
    return spent


def timed(model):
    """Count the seconds of each forward of `model` into model.seconds_in_forward (hooks; read by
    `forward_seconds`)."""
    model.seconds_in_forward = 0.0
    model.register_forward_pre_hook(lambda *_: setattr(model, "forward_started", time.time()))
    model.register_forward_hook(
        lambda *_: setattr(model, "seconds_in_forward", model.seconds_in_forward + time.time() - model.forward_started)
    )
    return model


def frozen_model(name_or_path: str, args, device):
    """A model that is not trained (GRPO's reference policy, SDPO's teacher): gradients off, its weights in the
    compute dtype (--dtype), switched to segment attention under --fast --segment-attention as the policy is."""
    model, _ = rollout.load_model(rollout.resolve_model_path(name_or_path), args.dtype, device)
    model.requires_grad_(False)
    if args.fast and args.segment_attention:
        import fast

        fast.use_segment_attention(model)
    return model


def open_wandb(project: str | None, args, out: Path):
    """--wandb PROJECT: a Weights & Biases run on rank 0, named after --out, with the flags as its config; None
    without the flag and on other ranks. wandb is imported here, not required (pip install wandb); the run's files
    go under OUT/wandb, and WANDB_MODE=offline keeps them there, without an account."""
    if not project or world_info()[0] != 0:
        return None
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project=project, name=str(out), config=asdict(args), dir=str(out))


def log_metrics(path: Path, row: dict, wandb_run=None) -> None:
    """Rank 0: one line of metrics.jsonl, and the same values to Weights & Biases under --wandb."""
    append_metrics(path, row)
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in row.items() if v is not None}, step=row.get("step"))


def apply_update(model, optimizer, grad_clip: float, bad: bool, compute=None) -> float | None:
    """Clip and step, or, when any rank saw a non-finite loss or gradient, skip the update and keep the weights; a bf16
    copy that computes the forwards (`compute`, `bf16_compute_copy`) then takes the new weights, for the step's next
    update. Returns the gradient norm, None when skipped. A parameter with no gradient (no row was trained:
    fast.rows_with_gradient) gets a zero one, so that AdamW still decays and moves on its momentum as it would on the
    zero gradient of a full forward and backward. First, FSDP2's root is resharded (`reshard`): a no-grad forward with
    no backward behind it (generation by the policy itself on one GPU, evaluation, pi_old) leaves its parameters
    gathered as plain tensors, which clip_grad_norm_ cannot mix with the sharded ones."""
    reshard(model)
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    grad_norm = clip_grads(model, grad_clip)
    skip = all_reduce_sum(float(bad or not math.isfinite(grad_norm))) > 0
    if not skip:
        optimizer.step()
        if compute is not None and compute is not model:
            rollout.sync_replica(compute, model)
    optimizer.zero_grad(set_to_none=True)
    return None if skip else grad_norm


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


# --------------------------------------------------------------------------------------------
# SFT math
# --------------------------------------------------------------------------------------------
def read_sft_rows(path) -> list[dict]:
    """Rows with a prompt ('question' or 'prompt') and a non-empty 'response'; errors name the row. An embedded
    source (`synthetic:style=think,n=512`, see data.load_problems) gives its questions with their solutions."""
    if str(path).partition(":")[0] in ("synthetic", "champ"):
        return [dict(question=p["question"], response=p["solution"]) for p in data.load_problems(path)]
    rows = []
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path}: no such file")
    for i, r in enumerate(data.read_jsonl(p)):
        if not isinstance(r, dict) or not isinstance(r.get("response"), str):
            raise ValueError(f"{path}: row {i}: missing field 'response'")
        if not r["response"].strip():
            raise ValueError(f"{path}: row {i}: empty 'response'")
        if not isinstance(r.get("question", r.get("prompt")), str):
            raise ValueError(f"{path}: row {i}: missing field 'question' (or 'prompt')")
        rows.append(r)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def tokenize_sft(tokenizer, row: dict, max_len: int, chat: dict) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask): the chat-templated unguided prompt (masked) + the response + EOS (trained)."""
    user = data.format_prompt(row["question"]) if "question" in row else row["prompt"]
    prompt_ids = tokenizer(rollout.chat_prompt(tokenizer, user, **chat), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_len]
    mask = ([0] * len(prompt_ids) + [1] * len(response_ids))[:max_len]
    return ids, mask


def token_nll(model, ids: list[list[int]], masks: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, int]:
    """Sum of -log p(y_t | x, y_<t) over the masked (response) tokens of a right-padded micro-batch, and their count,
    from the full logits. fast.token_nll is its twin: (B, T, V) fp32 logits are 45-52 GB at 24k positions and
    V = 152k, so GPU runs keep --fast."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids], device=device)  # (B, T)
    attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)  # (B, T)
    sel = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)[:, 1:].bool()  # (B, T-1)
    logits = model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    nll = torch.nn.functional.cross_entropy(logits[sel].float(), input_ids[:, 1:][sel], reduction="sum")
    return nll, int(sel.sum())


def rows_for_step(n_rows: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Row indices of the global batch at `step`: epochs of seeded permutations of all rows, read in order (verl
    samples its training rows so, with a RandomSampler: repeated rows are drawn as often as they appear)."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(i, n_rows)
        out.append(epoch_order(n_rows, seed, epoch)[j])
    return out


@functools.lru_cache(maxsize=2)
def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """One epoch's permutation of the rows (computed once: DAPO-Math-17k has 1.79M rows)."""
    return random.Random(f"sft/{seed}/{epoch}").sample(range(n_rows), n_rows)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def train(args: TrainArgs):
    rank, _, world, device = init_distributed()
    args.dtype = rollout.compute_dtype(args.dtype, device)
    if args.batch_size % world or (args.batch_size // world) < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be a positive multiple of the world size {world}")
    rows = read_sft_rows(args.data)
    ckpt = resume_point(args.out, args.resume)
    check_memory(args, str(ckpt) if ckpt else args.model, device, world)  # GPU: refused before loading
    model, tok = rollout.load_model(str(ckpt) if ckpt else args.model, "float32", device)
    chat = dict(system=args.system, thinking=args.thinking)
    encoded = [tokenize_sft(tok, r, args.max_len, chat) for r in rows]
    model = shard_model(
        model, device, args.grad_ckpt, mixed_precision=device.type == "cuda" and args.dtype == "bfloat16"
    )
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start = 0
    out = Path(args.out)
    if ckpt:
        start = load_checkpoint(ckpt, model, optimizer)["step"]
        print0(f"resumed from {ckpt} (step {start})")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        append_metrics(out / "metrics.jsonl", {}, resumed_from=start)
    wandb_run = open_wandb(args.wandb, args, out)
    bar = tqdm(range(start, args.steps), desc="sft", disable=rank != 0, initial=start, total=args.steps)
    for step in bar:
        t0 = time.time()
        mine = rollout.shard(rows_for_step(len(rows), step, args.batch_size, args.seed), rank, world)
        local_tokens = sum(sum(encoded[i][1][1:]) for i in mine)
        global_tokens = all_reduce_sum(local_tokens)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup)
        loss_sum = 0.0
        for k in range(0, len(mine), args.micro_batch):
            micro = mine[k : k + args.micro_batch]
            batch = ([encoded[i][0] for i in micro], [encoded[i][1] for i in micro], tok.pad_token_id, device)
            with rollout.autocast(args.dtype, device):
                if args.fast:
                    import fast

                    nll, _ = fast.token_nll(model, *batch, chunk_size(args.chunk, device))
                else:
                    nll, _ = token_nll(model, *batch)
            # FSDP2 averages gradients over ranks; scaling by world makes the result the global token mean
            (nll * world / max(global_tokens, 1)).backward()
            loss_sum += float(nll.detach())
        grad_norm = clip_grads(model, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = all_reduce_sum(loss_sum) / max(global_tokens, 1)
        row = dict(
            step=step + 1,
            loss=loss,
            lr=optimizer.param_groups[0]["lr"],
            grad_norm=grad_norm,
            tokens=int(global_tokens),
            seconds=time.time() - t0,
        )
        if rank == 0:
            log_metrics(out / "metrics.jsonl", row, wandb_run)
            bar.set_postfix(loss=f"{loss:.4f}", gnorm=f"{grad_norm:.2f}")
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            save_checkpoint(out, step + 1, model, tok, optimizer, dict(args=asdict(args)), keep=args.keep_checkpoints)
    print0(f"sft: trained to step {args.steps}.\n  metrics: {out / 'metrics.jsonl'}")
    print0(f"  checkpoint: {latest_checkpoint(out) or 'none (--save-every 0)'}")
    if wandb_run is not None:
        wandb_run.finish()


def main(argv=None):
    rollout.run_main(lambda: train(data.parse_args(TrainArgs, sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    rollout.run_script(main)

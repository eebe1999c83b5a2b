"""checkpoint.py -- training checkpoints as Hugging Face directories, written atomically, resumable on any number
of ranks.

OUT/step_N/ is a Hugging Face directory (config.json, tokenizer, model.safetensors: the policy, the only top-level
weights, as vLLM's loader wants) that AutoModelForCausalLM.from_pretrained loads as it is, plus
optimizer/shard_R.safetensors (each rank's rows of the AdamW state and its RNG state; a resumed run may have another
number of ranks), extra models as HF directories of their own (SDPO's EMA teacher: teacher/), and
trainer_state.json; nothing is pickled. It is written under a temporary name and renamed, so a kill or a full disk
at any moment leaves the previous checkpoint whole. `--keep-checkpoints N` removes complete checkpoints older than
the N newest.

No command line: sft.setup and sft.train restore from it, grpo.run_loop and sft.train write it; --save-every,
--keep-checkpoints and --resume are sft.TrainerArgs' flags.

Copying: needs torch and safetensors alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _count_over_ranks(flag: bool) -> float:
    """How many ranks raise `flag` (collective: every rank calls it)."""
    if not dist.is_initialized():
        return float(flag)
    t = torch.tensor([float(flag)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


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

    rank, world = _rank_world()
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
    if _count_over_ranks(error is not None) == 0:  # collective: the directory exists for every rank
        try:
            tensors, offsets = optimizer_shard(model, optimizer)
            save_file(tensors, tmp / "optimizer" / f"shard_{rank}.safetensors", metadata={"offsets": offsets})
            if rank == 0:
                save_hf_dir(tmp, model, tokenizer, model_sd)
                for name, extra in (extra_tensors or {}).items():
                    save_hf_dir(tmp / name, model, tokenizer, extra)
        except OSError as e:
            error = e
    failed = _count_over_ranks(error is not None) > 0  # collective: every rank learns whether any write failed
    if not failed and rank == 0:
        try:
            _write_json(tmp / "trainer_state.json", {**state, "step": step, "world": world})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            error = e
    failed = _count_over_ranks(error is not None) > 0
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

    rank, _ = _rank_world()
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

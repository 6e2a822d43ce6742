"""One process or many (torchrun): PyTorch's own DDP and FSDP, nothing home-made.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; with WORLD_SIZE > 1 every process joins one
process group (NCCL on GPUs, gloo on CPUs), and the objective is wrapped in DDP, or with
`fsdp` sharded by FSDP2 (`fully_shard`: each decoder layer, then the root, so a layer's
full weights exist only while it runs). Only rank 0 writes files.

Checkpoints hold full (unsharded) state dicts, so a run can resume on another number of
processes for the model; FSDP gathers them through torch.distributed.checkpoint's helpers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "resolve_device", "start", "stop", "wrap", "unwrap", "all_reduce_sum", "no_sync",
           "model_state", "optimizer_state", "load_states"]


@dataclass(frozen=True)
class DistEnv:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "DistEnv":
        return cls(int(environ.get("WORLD_SIZE", "1")), int(environ.get("RANK", "0")),
                   int(environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str, env: DistEnv) -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available")
    return torch.device("cuda", env.local_rank)


def start(env: DistEnv, device: torch.device) -> bool:
    """Join the process group when there is more than one process. True if this call did."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not env.distributed or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def stop(started: bool) -> None:
    if started and dist.is_initialized():
        # Leave together: a rank that tears down while rank 0 still writes the model folder
        # can leave the group's teardown waiting (seen with gloo: the processes never exit).
        dist.barrier()
        dist.destroy_process_group()


def wrap(objective: torch.nn.Module, env: DistEnv, device: torch.device, fsdp: bool = False,
         bf16: bool = False) -> torch.nn.Module:
    if fsdp:
        if not env.distributed:
            raise ValueError("--fsdp shards the model across processes: start it with torchrun")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute, fp32 master weights and gradient reduction.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for layer in objective.backbone.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(objective, mp_policy=policy)  # embeddings, tied head, final norm
        return objective
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    return objective


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def no_sync(module: torch.nn.Module, skip: bool):
    """DDP: skip the gradient all-reduce of a micro-batch that is not the step's last."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def _full_options(**extra: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def model_state(module: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The full model state dict (collective under FSDP: every rank must call it)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(module, options=_full_options(cpu_offload=True))
    return unwrap(module).state_dict()


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer, options=_full_options(cpu_offload=True))
    return optimizer.state_dict()


def load_states(module: torch.nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict,
                fsdp: bool, env: DistEnv) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        # Rank 0 holds the full state; the others receive their shards from it.
        options = _full_options(broadcast_from_rank0=True)
        set_model_state_dict(module, model_sd if env.is_main else {}, options=options)
        set_optimizer_state_dict(module, optimizer, optim_sd if env.is_main else {}, options=options)
        return
    unwrap(module).load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


"""The `parallel` group: how one training run spreads over processes, on PyTorch's own
distributed engine.

- `none` (the default): one process, as `llmarch ...` runs it;
- `ddp`: `DistributedDataParallel`, every rank a full replica, gradients all-reduced;
- `fsdp2`: `torch.distributed.fsdp.fully_shard` on every repeated block and at the root,
  parameters, gradients and optimizer state sharded over the ranks, with a
  `MixedPrecisionPolicy` under `precision=bf16|mixed`;
- `hsdp`: the same on a 2D mesh, sharded within groups of ranks and replicated across
  `parallel.replicas` of them (fully_shard's hybrid mode).

Processes are started by torchrun (`torchrun --standalone --nproc-per-node=N -m
llmarch_compose parallel=ddp ...`), which sets RANK, WORLD_SIZE and LOCAL_RANK; the
process group uses NCCL for CUDA tensors and Gloo for CPU ones. `parallel=ddp|fsdp2`
without torchrun, and torchrun with several processes but `parallel=none` (each
would train its own copy), are errors saying how to launch.

Every rank runs the same command in the same run folder (`agree_on_run_folder`), draws
the same global batch and keeps its own rows of it (`rank_rows`), so N ranks at
`task.batch_size=B` train on the samples one process at `B*N` trains on.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..plugin.registry import add

LAUNCH = "torchrun --standalone --nproc-per-node=N -m llmarch_compose parallel={name} ..."


@dataclass
class NoParallel:
    name: str = "none"


@dataclass
class DDPConfig:
    name: str = "ddp"


@dataclass
class FSDP2Config:
    name: str = "fsdp2"
    # Free each block's gathered parameters after its forward (gathered again for its
    # backward): less memory for one more all-gather per block.
    reshard_after_forward: bool = True


@dataclass
class HSDPConfig:
    name: str = "hsdp"
    # Ranks form replicas x shards: parameters sharded within each group of
    # world/replicas ranks (one node, say) and replicated across the groups.
    replicas: int = 2
    reshard_after_forward: bool = True


for _node in (NoParallel(), DDPConfig(), FSDP2Config(), HSDPConfig()):
    add("parallel", _node.name, node=_node)

STRATEGIES = ("none", "ddp", "fsdp2", "hsdp")
#: The strategies that shard with fully_shard (on a 1D mesh, or HSDP's 2D one).
SHARDED = ("fsdp2", "hsdp")


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1 or dist.is_initialized()


SINGLE = World()


def launched_by_torchrun() -> Optional[World]:
    """The world torchrun (or any launcher that sets its variables) started this process in;
    in a submitit job of several tasks (Hydra's submitit launchers with tasks_per_node > 1),
    the variables are first set from the job's own (`_export_submitit_world`)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        _export_submitit_world()
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))


def _export_submitit_world() -> None:
    """Inside a submitit job with several tasks, set torchrun's variables (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from the job's, as submitit's own helper does:
    each task is one rank, the first node hosts the rendezvous."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return
    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_process_group() -> World:
    """Join the process group torchrun set up (once); the single world without torchrun."""
    world = launched_by_torchrun()
    if world is None:
        return SINGLE
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return world


def close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def agree_on_run_folder(argv: Sequence[str]) -> list[str]:
    """Arguments that put every rank in rank 0's run folder, and leave Hydra's own files
    (`.hydra/`, the job log) to rank 0. Hydra names the folder by the time it starts, which
    differs between processes, so rank 0's start time is sent to all."""
    world = init_process_group()
    if world.size == 1:
        return []
    if any(arg in ("-m", "--multirun") or arg.startswith("hydra.mode=") for arg in argv):
        raise ConfigError("--multirun", None, "a sweep cannot run under torchrun: each of its jobs would be "
                          "one multi-process run", "run the sweep without torchrun, or one run per torchrun")
    started = [datetime.now().strftime("%Y-%m-%d/%H-%M-%S")]
    dist.broadcast_object_list(started, src=0)
    extra = [] if any(arg.startswith("hydra.run.dir=") for arg in argv) else [f"hydra.run.dir=outputs/{started[0]}"]
    if not world.is_main:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    return extra


def world_for(cfg_name: str) -> World:
    """The world a run with `parallel=<cfg_name>` trains in, or an error saying how to launch it."""
    if cfg_name not in STRATEGIES:
        raise ConfigError("parallel", cfg_name, "unknown parallel strategy", STRATEGIES)
    world = init_process_group()
    if cfg_name == "none" and world.size > 1:
        raise ConfigError("parallel", "none", f"torchrun started {world.size} processes, and with parallel=none "
                          "each would train its own copy of the model", STRATEGIES[1:])
    if cfg_name != "none" and launched_by_torchrun() is None:
        raise ConfigError("parallel", cfg_name, "needs several processes started by torchrun, e.g. "
                          + LAUNCH.format(name=cfg_name), ["none (one process)", *STRATEGIES[1:]])
    return world


def device_for(world: World, device: torch.device) -> torch.device:
    """Each rank's own GPU (LOCAL_RANK); the CPU is shared."""
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def rank_rows(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's rows of a global batch (the same rows on every call: the batch is drawn
    from one generator that every rank advances alike)."""
    if world.size == 1:
        return batch
    per_rank = batch.shape[0] // world.size
    return batch[world.rank * per_rank: (world.rank + 1) * per_rank]


def autocast_dtype(precision) -> Optional[torch.dtype]:
    """The dtype a `precision` node computes matrix products in under autocast; None: no autocast."""
    from ..model.precision import DTYPES

    return DTYPES[precision.autocast_dtype] if precision.autocast_dtype else None


def mixed_precision_policy(param_dtype: torch.dtype, autocast_dtype: Optional[torch.dtype]):
    """FSDP2's policy: gather parameters in the compute dtype (bf16 under `mixed`), reduce
    gradients in float32 whenever anything computes in lower precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if autocast_dtype is None and param_dtype == torch.float32:
        return None
    return MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)


def wrap(model: nn.Module, cfg, world: World, device: torch.device, param_dtype: torch.dtype,
         autocast_dtype: Optional[torch.dtype]) -> nn.Module:
    """The module a training step calls: `model` itself (none, and fsdp2, which shards it in
    place), or its DistributedDataParallel wrapper."""
    if cfg.name == "none":
        return model
    if cfg.name == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Buffers are not broadcast from rank 0 at every forward: they are equal on every
        # rank by construction, and per-rank counters (an MoE's expert load) are summed instead.
        keyword = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers"  # the older name before torch 2.11
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True, **{keyword: False})
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if cfg.name == "hsdp":
        if not 1 <= cfg.replicas <= world.size or world.size % cfg.replicas:
            raise ConfigError("parallel.replicas", cfg.replicas, f"must divide the {world.size} ranks",
                              [d for d in range(1, world.size + 1) if world.size % d == 0])
        mesh = init_device_mesh(device.type, (cfg.replicas, world.size // cfg.replicas),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world.size,))
    options = dict(mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
    policy = mixed_precision_policy(param_dtype, autocast_dtype)
    if policy is not None:
        options["mp_policy"] = policy
    for block in model.compile_regions():
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Gradients all-reduced (DDP) or reduce-scattered (FSDP2) on this backward only when
    `sync`: the accumulating micro-steps keep theirs local until the last one."""
    if hasattr(wrapped, "no_sync") and not sync:  # DDP
        with wrapped.no_sync():
            yield
        return
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
    yield


def sum_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def mean_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    return value if world.size == 1 else sum_over_ranks(value, world) / world.size


def sum_counters(model: nn.Module, world: World) -> None:
    """Sum every buffer a layer lists in `summed_across_ranks` (an MoE's expert load) over
    the ranks, so a statistic of the global batch drives what is updated from it."""
    if world.size == 1:
        return
    for module in model.modules():
        for name in getattr(module, "summed_across_ranks", ()):
            buffer = getattr(module, name, None)
            if buffer is not None:
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)


def full_tensor(value):
    """A DTensor's whole value (FSDP2's gradient norm); a tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (an FSDP2 parameter); a tensor as it is."""
    return value.to_local() if hasattr(value, "to_local") else value


def any_rank(flag: bool, world: World) -> bool:
    """Whether `flag` holds on any rank (every rank gets the same answer)."""
    if world.size == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def full_state_dict(model: nn.Module, world: World) -> Optional[dict[str, torch.Tensor]]:
    """The whole model's state on the CPU of rank 0 (None elsewhere), gathered from the
    shards under FSDP2; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if world.is_main else None


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


__all__ = ["NoParallel", "DDPConfig", "FSDP2Config", "World", "SINGLE", "init_process_group", "world_for",
           "agree_on_run_folder", "wrap", "gradient_sync", "rank_rows", "mean_over_ranks", "sum_counters"]

"""`task=train`: the composed model trained on the chosen data (`data=pydoc` by default).

The loop lives in llmarch_compose/train/loop.py; this task reads its node, checks it
against the data, and prints where the outputs went.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ..config.in_effect import values_in_effect
from ..config.match import settled
from ..config.spec import make_choice, resolve_spec
from ..config.structured import to_dataclass
from ..model.build import resolve_device
from ..model.card import preflight
from ..model.compiler import CompileConfig
from ..model.precision import PrecisionConfig
from ..plugin import registry as plugins
from ..plugin.registry import register
from ..train import folder_lock, loggers, parallel, resume
from ..train.data import data_config, make_source
from ..train.foreign_load import LOADED
from ..train.loop import TrainSettings, check, check_output, lr_at, train

TrainTask = TrainSettings


def output_dir(task: TrainSettings) -> Path:
    """Where the task writes: `task.output`, else Hydra's run directory (or the working directory)."""
    if task.output:
        return Path(task.output)
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def output_key(task: TrainSettings) -> str:
    """The setting that chose `output_dir`, for errors about the folder."""
    if task.output or not HydraConfig.initialized():
        return "task.output"
    return "hydra.sweep.dir" if HydraConfig.get().mode == RunMode.MULTIRUN else "hydra.run.dir"


@register("task", "train", params=TrainSettings)
def run(cfg: DictConfig) -> dict[str, Any]:
    task: TrainSettings = to_dataclass(TrainSettings, cfg.task, "task")
    data_cfg = data_config(cfg.data)
    precision: PrecisionConfig = make_choice("precision", cfg.precision)
    precision.validate()
    spec = resolve_spec(cfg)
    cfg = settled(cfg, spec)  # what the checkpoint and the loggers record: the matched model, if matched
    topology = spec.params["topology"]
    objective = plugins.get("topology", topology.plugin).cls.objective
    data = make_source(data_cfg, objective, topology.name)
    if task.seq_len is None:
        task.seq_len = data.natural_seq_len or spec.model.max_seq_len
    check(task, spec.model.vocab_size, spec.model.max_seq_len, data, data_cfg.name)
    loggers.check(cfg.get("logger"))
    parallel_cfg = make_choice("parallel", cfg.parallel)
    world = parallel.world_for(parallel_cfg.name)
    device = parallel.device_for(world, resolve_device(cfg.device))
    preflight(spec, task.batch_size, task.seq_len, precision.dtype, device,  # before anything is allocated
              task.loss_chunk_tokens or None, task.activation_checkpointing)
    compile_cfg = to_dataclass(CompileConfig, cfg.compile, "compile")
    settings = values_in_effect(cfg, spec, scale=(cfg.get("scale") or {}).get("name"), seed=cfg.seed, task=task,
                                data=data_cfg, precision=precision, compile=compile_cfg, parallel=parallel_cfg,
                                device=str(device))
    out_dir, out_key = output_dir(task), output_key(task)
    if out_key == "task.output":  # Hydra's own run directory is a fresh one
        check_output(out_dir, task)
    resume_from = resume.resolve(task.resume, out_dir)
    # No other live run writes into this folder meanwhile.
    with folder_lock.hold(out_dir, world, key=out_key):
        parallel.barrier(world)  # every rank has looked at the folder before rank 0 writes into it
        summary = train(spec, task, data, data_cfg.name, objective, precision,
                        compile_cfg, device, cfg.seed,
                        data_cfg.seed, out_dir, cfg if task.checkpoint else None,
                        parallel_cfg if parallel_cfg.name != "none" else None, world, resume_from,
                        lambda card, first_step: loggers.open_loggers(
                            cfg.get("logger"), out_dir, OmegaConf.to_container(cfg, resolve=True), card, first_step),
                        settings=settings)
    if not world.is_main:
        return summary
    accuracy = summary["final_val_accuracy"]
    accuracy = f", answer accuracy {accuracy:.1%}" if accuracy is not None else ""
    load = summary["foreign_cpu_load"]
    load = f", while other processes used {load:.0%} of the CPU" if load is not None and load > LOADED else ""
    print(f"held-out loss {summary['initial_val_loss']:.3f} -> {summary['final_val_loss']:.3f}{accuracy} after "
          f"{task.steps} steps ({summary['tokens_per_s'] or 0:,.0f} tokens/s{load}); outputs in {out_dir}")
    return summary


__all__ = ["TrainTask", "TrainSettings", "run", "lr_at", "output_dir"]

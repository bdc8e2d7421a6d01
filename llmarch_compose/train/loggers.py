"""The `logger` group: where a training run's figures go besides its own files.

`metrics.jsonl` and `summary.json` are always written: they are the run's record, which
resuming, `task=report` and the sweep report read. A logger adds a place to look:

- `jsonl` (the default): nothing beyond those files;
- `tensorboard`: event files under `<run>/tensorboard/` (`torch.utils.tensorboard`;
  needs the tensorboard package);
- `wandb`: a Weights & Biases run, offline by default (`logger.wandb.mode=online`
  where a network exists), its files under `<run>/wandb/`;
- `mlflow`: an MLflow run in a local file store, `<run>/mlruns/` by default
  (`logger.mlflow.tracking_uri` for a server).

Several at once: `logger=[jsonl,tensorboard,mlflow]`. Each node holds its settings under
its own name (`logger.tensorboard.flush_secs`), so choices merge without colliding; that
is why these nodes are stored straight in Hydra's ConfigStore rather than as named
choices of the registry, whose nodes share one `name` key. Every logger records the
resolved config, the architecture card's figures, every metric at its step and the
final summary. Only rank 0 logs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from hydra.core.config_store import ConfigStore

from ..errors import ConfigError


@dataclass
class JsonlConfig:
    pass


@dataclass
class TensorBoardConfig:
    flush_secs: int = 30


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "llmarch"
    entity: Optional[str] = None
    name: Optional[str] = None  # None: W&B's own run name
    tags: list[str] = field(default_factory=list)


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None  # None: a file store in <run>/mlruns
    experiment: str = "llmarch"
    run_name: Optional[str] = None


CONFIGS = {"jsonl": JsonlConfig, "tensorboard": TensorBoardConfig, "wandb": WandbConfig, "mlflow": MlflowConfig}
WANDB_MODES = ("offline", "online", "disabled")
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}

for _name, _params in CONFIGS.items():
    ConfigStore.instance().store(group="logger", name=_name, node={_name: _params}, provider="llmarch_compose")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys (MLflow's parameters are flat)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _numbers(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Sink:
    """One logger: opened with the run's config and card, fed every record, closed with the summary."""

    def record(self, step: int, figures: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self, summary: Mapping[str, Any]) -> None:
        raise NotImplementedError


class TensorBoardSink(Sink):
    def __init__(self, cfg: TensorBoardConfig, out_dir: Path, config: dict, card: dict, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops what the earlier part logged from its checkpoint's step on (purge_step).
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), flush_secs=cfg.flush_secs,
                                    purge_step=first_step if first_step > 1 else None)
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=1) + "\n```")
        self.writer.add_text("card", "```json\n" + json.dumps(card, indent=1) + "\n```")
        for key, value in _numbers(card).items():
            self.writer.add_scalar(f"card/{key}", value, 0)

    def record(self, step: int, figures: dict[str, float]) -> None:
        for key, value in figures.items():
            self.writer.add_scalar(key, value, step)

    def close(self, summary: Mapping[str, Any]) -> None:
        self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=1, default=str) + "\n```")
        self.writer.close()


class WandbSink(Sink):
    def __init__(self, cfg: WandbConfig, out_dir: Path, config: dict, card: dict, first_step: int):
        import wandb

        self.run = wandb.init(mode=cfg.mode, project=cfg.project, entity=cfg.entity, name=cfg.name,
                              tags=list(cfg.tags), dir=str(out_dir), config={**config, "card": card}, reinit=True)

    def record(self, step: int, figures: dict[str, float]) -> None:
        self.run.log(figures, step=step)

    def close(self, summary: Mapping[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish()


class MlflowSink(Sink):
    def __init__(self, cfg: MlflowConfig, out_dir: Path, config: dict, card: dict, first_step: int):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if cfg.tracking_uri is None:  # MLflow 3 keeps file stores working behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = cfg.tracking_uri or (out_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(cfg.experiment)
        experiment = found.experiment_id if found else self.client.create_experiment(cfg.experiment)
        self.run_id = self.client.create_run(experiment, run_name=cfg.run_name).info.run_id
        params = {k: str(v)[:500] for k, v in _flat(config).items()}  # MLflow caps a value's length
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        self.client.log_dict(self.run_id, config, "config.json")
        self.client.log_dict(self.run_id, card, "card.json")

    def record(self, step: int, figures: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in figures.items()])

    def close(self, summary: Mapping[str, Any]) -> None:
        self.client.log_dict(self.run_id, json.loads(json.dumps(summary, default=str)), "summary.json")
        status = "FINISHED" if summary.get("status") == "completed" else "FAILED"
        self.client.set_terminated(self.run_id, status=status)


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}


class Loggers:
    """The loggers a run chose, fed together (non-finite figures are left out: JSON and
    MLflow have no NaN; metrics.jsonl writes them as null)."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def record(self, record: Mapping[str, Any]) -> None:
        figures = {k: v for k, v in _numbers(record).items() if v == v and abs(v) != float("inf")}
        for sink in self.sinks:
            sink.record(int(record.get("step", 0)), figures)

    def close(self, summary: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.close(summary)
        self.sinks = []


NONE = Loggers([])


def chosen(node: Any) -> dict[str, Any]:
    """The loggers the composed `logger` node names, each with its settings."""
    if node is None:
        return {}
    unknown = [k for k in node if k not in CONFIGS]
    if unknown:
        raise ConfigError("logger", unknown[0], "unknown logger", sorted(CONFIGS))
    return dict(node.items())


def check(node: Any) -> None:
    """Every chosen logger's settings, typed and checked, before the run starts."""
    from ..config.structured import to_dataclass

    for name, settings in chosen(node).items():
        cfg = to_dataclass(CONFIGS[name], settings, f"logger.{name}")
        if name == "wandb" and cfg.mode not in WANDB_MODES:
            raise ConfigError("logger.wandb.mode", cfg.mode, "unknown mode", WANDB_MODES)


def open_loggers(node: Any, out_dir: Path, config: dict, card: dict, first_step: int = 1) -> Loggers:
    """Open every chosen logger but `jsonl` (whose files the run writes anyway)."""
    from ..config.structured import to_dataclass

    sinks = []
    for name, settings in chosen(node).items():
        if name not in SINKS:
            continue
        cfg = to_dataclass(CONFIGS[name], settings, f"logger.{name}")
        try:
            sinks.append(SINKS[name](cfg, out_dir, config, card, first_step))
        except ImportError as exc:
            raise ConfigError("logger", name, f"needs a package that is not installed ({exc.name})",
                              f"pip install {EXTRAS[name]}, or logger=jsonl") from None
        except Exception as exc:  # noqa: BLE001 - a store that refuses, a bad URI: named, before any step
            for sink in sinks:
                sink.close({"status": "failed"})
            raise ConfigError(f"logger.{name}", None, f"could not start: {type(exc).__name__}: {exc}",
                              "settings its library accepts, or logger=jsonl") from None
    return Loggers(sinks)


__all__ = ["Loggers", "open_loggers", "check", "chosen", "NONE", "CONFIGS"]

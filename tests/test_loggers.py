"""The `logger` group: TensorBoard's events read back with tensorboard's reader, MLflow's
run with its client, W&B's offline run file; several loggers at once; bad choices and
settings refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmarch_compose as lc
from llmarch_compose import ConfigError
from llmarch_compose.tasks import train

SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
         "compile=eager", "task.steps=4", "task.batch_size=2", "task.seq_len=16", "task.eval_every=2",
         "task.eval_batches=1", "task.progress=false"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logged")
    train.run(lc.compose([*SMALL, f"task.output={out}", "logger=[jsonl,tensorboard,mlflow,wandb]"]))
    return out


def metrics(out: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if r.get(key) is not None}


@pytest.mark.slow
def test_tensorboard_events_hold_every_metric_and_the_config(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for key in ("train_loss", "val_loss", "grad_norm", "lr"):
        got = {e.step: e.value for e in events.Scalars(key)}
        assert got == pytest.approx(metrics(logged, key), rel=1e-6), key  # stored as float32
    assert events.Scalars("card/params_total")[0].value > 0
    texts = events.Tags()["tensors"]
    assert {"config/text_summary", "card/text_summary", "summary/text_summary"} <= set(texts)
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"d_model": 32' in config


def test_mlflow_run_holds_params_metrics_and_artifacts(logged):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(logged / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("llmarch").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "32" and run.data.params["task.steps"] == "4"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert history == pytest.approx(metrics(logged, "train_loss"), rel=1e-12)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "card.json", "summary.json"} <= artifacts


def test_wandb_offline_run_file_holds_the_metrics_and_card(logged):
    (run_file,) = list((logged / "wandb").glob("offline-run-*/run-*.wandb"))
    data = run_file.read_bytes()
    for name in (b"train_loss", b"val_loss", b"params_total", b"final_val_loss", b"d_model"):
        assert name in data, name


def test_the_run_files_are_written_whatever_the_logger(logged):
    assert metrics(logged, "train_loss").keys() == {1, 2, 3, 4}
    assert json.loads((logged / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("overrides, match", [
    (["logger=tensorbord"], r"no logger choice named 'tensorbord'; did you mean 'tensorboard'"),
    (["logger=wandb", "logger.wandb.mode=cloud"], r"logger\.wandb\.mode='cloud': unknown mode"),
    (["logger=tensorboard", "logger.tensorboard.flush=1"], r"logger\.tensorboard.*flush"),
])
def test_bad_logger_settings_are_refused_before_training(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        train.run(lc.compose([*SMALL, f"task.output={tmp_path / 'run'}", *overrides]))
    assert not (tmp_path / "run").exists()

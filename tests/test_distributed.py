"""Training over two processes started by torchrun (gloo, CPU, fp32): DDP and FSDP2 at
batch B per rank train the loss curve of one process at 2B, eager and compiled; a
2-rank run killed with SIGKILL resumes on 2 ranks bit for bit, and FSDP2's sharded
checkpoint resumes on one process; launch mistakes are errors saying how to launch."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmarch_compose as lc
from llmarch_compose import ConfigError
from llmarch_compose.artifacts.checkpoint import load_checkpoint
from llmarch_compose.tasks import train
from llmarch_compose.train import folder_lock, resume

from test_resume import SMALL, curve, kill_at_step, records

STEPS = 10
RUN = [f"task.steps={STEPS}", "task.seq_len=16", "task.warmup_steps=2", "task.eval_every=5", "task.eval_batches=1",
       "task.progress=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def one_process(out: Path, *extra: str, base: list[str] = SMALL) -> list[str]:
    return [sys.executable, "-m", "llmarch_compose", *base, *RUN, f"task.output={out}", *extra]


def two_ranks(out: Path, *extra: str, base: list[str] = SMALL) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "llmarch_compose", *base, *RUN, f"task.output={out}", *extra]


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def train_losses(out: Path) -> list[float]:
    return [r["train_loss"] for r in records(out) if "train_loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Path]:
    """One process at batch 4, eager and compiled: the curves two ranks at batch 2 must give."""
    outs = {}
    for mode in ("eager", "default"):
        outs[mode] = tmp_path_factory.mktemp(f"single_{mode}")
        run(one_process(outs[mode], "task.batch_size=4", f"compile={mode}"))
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "hsdp"])
@pytest.mark.parametrize("mode", ["eager", "default"])
def test_two_ranks_train_the_curve_of_one_process_at_twice_the_batch(single, tmp_path, strategy, mode):
    extra = ["parallel.replicas=2"] if strategy == "hsdp" else []  # 2 x 1: replicated, one shard each
    run(two_ranks(tmp_path, "task.batch_size=2", f"parallel={strategy}", f"compile={mode}", *extra))
    ours, reference = train_losses(tmp_path), train_losses(single[mode])
    assert len(ours) == STEPS
    assert ours == pytest.approx(reference, abs=1e-5, rel=0)
    val = [r["val_loss"] for r in records(tmp_path) if "val_loss" in r]
    assert val == pytest.approx([r["val_loss"] for r in records(single[mode]) if "val_loss" in r], abs=1e-5, rel=0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["parallel"], summary["world_size"], summary["global_batch_sequences"]) == (strategy, 2, 4)
    assert summary["global_batch_tokens"] == 4 * 16
    # Rank 0 alone wrote: one log, one summary, one consolidated checkpoint of the whole model.
    _, model = load_checkpoint(tmp_path / "checkpoint")
    _, reference_model = load_checkpoint(single[mode] / "checkpoint")
    for (name, a), (_, b) in zip(model.state_dict().items(), reference_model.state_dict().items()):
        assert (a - b).abs().max() < 1e-4, name


@pytest.mark.slow
def test_two_ranks_killed_resume_bitwise_and_fsdp2_shards_resume_on_one_process(single, tmp_path):
    steps = ["task.batch_size=2", "parallel=fsdp2", "compile=eager", "task.checkpoint_every=3"]
    run(two_ranks(tmp_path / "whole", *steps))
    kill_at_step(two_ranks(tmp_path / "killed", *steps), tmp_path / "killed", random.Random(7).randint(4, 9))
    assert resume.complete_checkpoints(tmp_path / "killed")
    assert not (tmp_path / "killed/summary.json").exists()
    run(two_ranks(tmp_path / "killed", *steps, "task.resume=auto"))
    assert curve(tmp_path / "killed") == curve(tmp_path / "whole")
    # The 2 ranks' sharded step-9 checkpoint, resumed by one process at the same global batch.
    shards = tmp_path / "whole/checkpoints/step_00000009"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    run(one_process(tmp_path / "one", "task.batch_size=4", "compile=eager", f"task.resume={shards}"))
    assert train_losses(tmp_path / "one") == pytest.approx(train_losses(single["eager"]), abs=1e-5, rel=0)


@pytest.mark.slow
def test_expert_balance_follows_the_global_batch(tmp_path):
    """DeepSeek-V3's auxiliary-loss-free bias moves by the sign of each expert's load against
    the mean: from the ranks' summed counts, it moves as one process's does at the global batch."""
    moe = ["ffn=deepseek_moe", "model.n_experts=8", "model.experts_per_token=2", "model.n_shared_experts=1",
           "model.expert_ffn_dim=32", "model.n_expert_groups=1", "model.topk_expert_groups=1",
           "ffn.bias_update_rate=0.01", "ffn.aux_loss_coef=0", "compile=eager"]  # the aux loss is per micro-batch
    base = [a for a in SMALL if not a.startswith("model.ffn_dim")]
    run(one_process(tmp_path / "one", "task.batch_size=4", *moe, base=base))
    run(two_ranks(tmp_path / "two", "task.batch_size=2", "parallel=ddp", *moe, base=base))
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(tmp_path / "one"), abs=1e-5, rel=0)
    _, one = load_checkpoint(tmp_path / "one/checkpoint")
    _, two = load_checkpoint(tmp_path / "two/checkpoint")
    biases = [(name, b) for name, b in one.named_buffers() if name.endswith("score_bias")]
    assert biases and all(b.abs().sum() > 0 for _, b in biases)  # the balancing moved them
    for name, bias in biases:
        assert torch.equal(dict(two.named_buffers())[name], bias), name


@pytest.mark.slow
def test_submitit_tasks_are_ranks(single, tmp_path):
    """Hydra's submitit launcher with two tasks per job (the Slurm recipe, run by its local
    executor): each task is a rank, and the job trains the curve of one process at 2B."""
    command = [sys.executable, "-m", "llmarch_compose", "-m", "hydra/launcher=submitit_local",
               "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}",
               *SMALL, *RUN, "task.batch_size=2", "parallel=ddp"]
    run(command)
    summary = json.loads((tmp_path / "0/summary.json").read_text())
    assert (summary["parallel"], summary["world_size"], summary["status"]) == ("ddp", 2, "completed")
    assert train_losses(tmp_path / "0") == pytest.approx(train_losses(single["eager"]), abs=1e-5, rel=0)


@pytest.mark.slow
def test_torchrun_with_parallel_none_is_refused(tmp_path):
    done = subprocess.run(two_ranks(tmp_path, "task.batch_size=2", "compile=eager"), env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0
    assert "parallel='none': torchrun started 2 processes" in done.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_every_rank_refuses_a_folder_another_run_holds(tmp_path):
    """Rank 0 finds the folder held and every rank stops with the error (none waits for
    the others at a collective): the launch fails at once, writing nothing."""
    with folder_lock.hold(tmp_path):
        done = subprocess.run(two_ranks(tmp_path, "task.batch_size=2", "parallel=ddp"), env=ENV,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"another run is writing into this folder (pid {os.getpid()})" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "hsdp"])
def test_parallel_without_torchrun_says_how_to_launch(tmp_path, strategy, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=f"parallel='{strategy}': needs several processes started by torchrun, "
                                          f"e.g. torchrun --standalone --nproc-per-node=N -m llmarch_compose"):
        train.run(lc.compose([*SMALL, *RUN, f"task.output={tmp_path}", f"parallel={strategy}"]))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_fsdp2_keys_are_its_own():
    with pytest.raises(ConfigError, match="reshard_after_forward"):
        lc.compose(["parallel=ddp", "parallel.reshard_after_forward=false"])
    assert lc.compose(["parallel=fsdp2", "parallel.reshard_after_forward=false"]).parallel.reshard_after_forward is False


def test_only_training_runs_over_several_processes(monkeypatch):
    from llmarch_compose.tasks import run_task

    with pytest.raises(ConfigError, match=r"parallel='ddp': only task=train runs over several processes"):
        run_task(lc.compose(["task=summary", "parallel=ddp"]))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"task='summary': torchrun started 2 processes"):
        run_task(lc.compose(["task=summary"]))

"""`task.replicates=N`: the command line turns it into a sweep over N seeds, or refuses it by name."""

from __future__ import annotations

import sys

import pytest

from llmarch_compose.errors import ConfigError
from llmarch_compose.sweep.replicates import expand_replicates


@pytest.mark.parametrize("argv, expanded", [
    (["-m", "attention=mha,gqa", "task.replicates=3"], ["-m", "attention=mha,gqa", "seed=0,1,2"]),
    (["-m", "seed=5", "task.replicates=2", "task.steps=4"], ["-m", "seed=5,6", "task.steps=4"]),
    (["--multirun", "task=train", "task.replicates=1"], ["--multirun", "task=train", "seed=0"]),
    (["hydra.mode=MULTIRUN", "task.replicates=2"], ["hydra.mode=MULTIRUN", "seed=0,1"]),
    (["attention=mha"], ["attention=mha"]),  # not asked for: unchanged
])
def test_replicates_become_a_seed_sweep(argv, expanded):
    assert expand_replicates(argv) == expanded


@pytest.mark.parametrize("argv, key, words", [
    (["attention=mha", "task.replicates=3"], "task.replicates", "add -m"),
    (["-m", "task=summary", "task.replicates=3"], "task.replicates", "task=summary has no seed"),
    (["-m", "seed=0,1", "task.replicates=3"], "task.replicates", "sweeps them too"),
    (["-m", "hydra/sweeper=optuna", "task.replicates=3"], "task.replicates", "samples its trials"),
    (["-m", "task.replicates=0"], "task.replicates", "number of seeds"),
    (["-m", "task.replicates=two"], "task.replicates", "number of seeds"),
    (["-m", "task.replicates=2,3"], "task.replicates", "number of seeds"),
    (["-m", "task.replicates=2", "task.replicates=3"], "task.replicates", "more than once"),
    (["-m", "seed=x", "task.replicates=2"], "seed", "first seed"),
])
def test_replicates_that_make_no_sense_are_refused_by_name(argv, key, words):
    with pytest.raises(ConfigError) as info:
        expand_replicates(argv)
    assert info.value.key == key and words in str(info.value)


def test_the_command_line_refuses_replicates_outside_a_sweep(monkeypatch, capsys):
    from llmarch_compose import cli

    monkeypatch.setattr(sys, "argv", ["llmarch"])
    with pytest.raises(SystemExit) as info:
        cli.main(["attention=mha", "task.replicates=3"])
    assert info.value.code == cli.EXIT_USAGE
    assert "task.replicates=3: runs one job per seed, which takes a sweep: add -m" in capsys.readouterr().err

"""The foreign CPU load a training run records (llmarch_compose/train/foreign_load.py): from
/proc/stat and /proc/<pid>/stat, unknown (never zero) where they cannot be read."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmarch_compose.train.foreign_load import ForeignLoad, local_ranks, machine_busy, process_ticks, sample

HZ = os.sysconf("SC_CLK_TCK")


def write_proc(root: Path, busy: int, idle: int, own: dict[int, int], ppid: int = 1) -> Path:
    """A /proc with 2 CPUs: `busy` ticks spread over user and system, and processes' own ticks."""
    (root / "stat").parent.mkdir(parents=True, exist_ok=True)
    user, system = busy - busy // 3, busy // 3
    (root / "stat").write_text(f"cpu  {user} 0 {system} {idle} 7 0 0 0 0 0\ncpu0 1 0 1 1 0 0 0 0 0 0\n"
                               f"cpu1 1 0 1 1 0 0 0 0 0 0\nintr 5\n")
    for pid, ticks in own.items():
        (root / str(pid)).mkdir(exist_ok=True)
        # comm with a space and a parenthesis; utime and stime are fields 14 and 15
        fields = ["S", str(ppid)] + ["0"] * 9 + [str(ticks - ticks // 2), str(ticks // 2)] + ["0"] * 30
        (root / str(pid) / "stat").write_text(f"{pid} (python (x) y) " + " ".join(fields) + "\n")
    return root


def test_the_proc_files_are_read(tmp_path):
    proc = write_proc(tmp_path, busy=900, idle=300, own={42: 301})
    assert machine_busy(proc) == (900, 2)  # idle and iowait are not busy
    assert process_ticks(42, proc) == 301
    assert sample([42, 43], proc).own_ticks == 301  # a rank that ended counts nothing


def test_foreign_load_is_busy_time_minus_the_runs_own_over_the_timed_steps(tmp_path):
    readings = iter([(1000, 200), (1000 + 150, 200 + 100), (2000, 400), (2000 + 250, 400 + 100)])

    def read(pids):
        busy, own = next(readings)
        return sample(pids, write_proc(tmp_path / str(busy), busy, 0, {os.getpid(): own}))

    load = ForeignLoad(read=read)
    load.begin(); load.end(0.5)  # 150 busy, 100 own: 50 foreign
    load.begin(); load.end(1.0)  # 250 busy, 100 own: 150 foreign
    capacity = 1.5 * HZ * 2
    assert load.fraction == pytest.approx(200 / capacity)
    assert load.summary()["foreign_cpu_load"] == pytest.approx(200 / capacity)
    restored = ForeignLoad(read=read)
    restored.restore(load.state())  # a resumed run goes on from the checkpoint's counts
    assert restored.fraction == load.fraction


def test_without_proc_the_load_is_unknown_not_zero(tmp_path):
    load = ForeignLoad(read=lambda pids: sample(pids, tmp_path / "no_proc"))
    load.begin()
    load.end(2.0)
    summary = load.summary()
    assert summary["foreign_cpu_load"] is None and summary["foreign_cpu_load_measure"].startswith("unknown")


def test_a_window_too_short_for_the_clock_ticks_is_unknown(tmp_path):
    proc = write_proc(tmp_path, busy=100, idle=0, own={os.getpid(): 0})
    load = ForeignLoad(read=lambda pids: sample(pids, proc))
    load.begin()
    load.end(0.01)
    assert load.fraction is None and "clock ticks" in load.summary()["foreign_cpu_load_measure"]


def test_torchrun_siblings_are_the_runs_own(tmp_path, monkeypatch):
    me = os.getpid()
    write_proc(tmp_path, 0, 0, {me: 1, me + 1: 1}, ppid=os.getppid())
    write_proc(tmp_path, 0, 0, {me + 2: 1}, ppid=os.getppid() + 1)  # someone else's process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert sorted(local_ranks(tmp_path)) == [me, me + 1]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert local_ranks(tmp_path) == [me]


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux's /proc")
def test_a_busy_process_beside_the_run_is_foreign():
    """On the real /proc: while this process sleeps, a spinning child's CPU time is foreign."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.1)
        load = ForeignLoad()
        start = process_ticks(child.pid)
        load.begin()
        t0 = time.perf_counter()
        time.sleep(0.3)
        load.end(time.perf_counter() - t0)
        spun = process_ticks(child.pid) - start
    finally:
        child.kill()
        child.wait()
    assert spun > 0
    assert load.foreign_ticks >= spun - 2  # the child's ticks, and whatever else ran (rounding: a tick each)

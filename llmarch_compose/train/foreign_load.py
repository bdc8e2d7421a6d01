"""How much CPU other processes used while a run's throughput was measured.

A throughput figure taken while something else ran on the machine understates the
model's speed. Over each timed step, the machine's busy CPU time (`/proc/stat`: every
state but idle and iowait, summed over its CPUs) minus the CPU time of this run's own
processes (`/proc/<pid>/stat`: this process, and under torchrun the other local ranks)
is the foreign CPU time; summed over the timed steps and divided by the steps' wall
time times the machine's CPU count, it is the foreign load: 0.25 means other processes
kept a quarter of the machine busy. Both counters are in clock ticks (usually 10 ms),
so a window shorter than 100 ticks of capacity (0.5 s of steps on 2 CPUs) is too short
to say (null, with the reason); so is a machine without /proc (null, never a zero).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

PROC = Path("/proc")
#: Above this foreign load a throughput figure is marked as measured on a loaded machine.
LOADED = 0.10
#: The fewest clock ticks of capacity (window x CPUs) for a figure: 1% resolution.
MIN_CAPACITY_TICKS = 100
IDLE_FIELDS = (3, 4)  # idle, iowait in the "cpu" line of /proc/stat (after the label)


@dataclass(frozen=True)
class CpuSample:
    busy_ticks: int  # the machine's, every CPU together
    own_ticks: int  # the run's processes, user and system
    cpus: int


def _stat_fields(pid: int, proc: Path) -> list[str]:
    text = (proc / str(pid) / "stat").read_text()
    return text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses


def process_ticks(pid: int, proc: Path = PROC) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    fields = _stat_fields(pid, proc)
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted after the name


def machine_busy(proc: Path = PROC) -> tuple[int, int]:
    """(busy ticks over every CPU, number of CPUs) from /proc/stat."""
    busy, cpus = None, 0
    for line in (proc / "stat").read_text().splitlines():
        label, *numbers = line.split()
        if label == "cpu":
            ticks = [int(n) for n in numbers[:8]]  # guest time is already inside user and nice
            busy = sum(ticks) - sum(ticks[i] for i in IDLE_FIELDS)
        elif label.startswith("cpu") and label[3:].isdigit():
            cpus += 1
    if busy is None or not cpus:
        raise ValueError("/proc/stat has no cpu lines")
    return busy, cpus


def local_ranks(proc: Path = PROC) -> list[int]:
    """This process and, when torchrun started several local ranks, its siblings (the other
    children of the same launcher): the run's own processes on this machine."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1:
        return [os.getpid()]
    parent, pids = os.getppid(), []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name), proc)[1]) == parent:
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue  # a process that ended while the folder was read
    return pids if os.getpid() in pids else [os.getpid(), *pids]


@dataclass
class ForeignLoad:
    """The foreign CPU time over a run's timed steps (`begin` and `end` bracket each)."""

    read: Callable[[list[int]], CpuSample] = field(default=None, repr=False)  # type: ignore[assignment]
    foreign_ticks: int = 0
    window_s: float = 0.0
    cpus: Optional[int] = None
    unavailable: Optional[str] = None  # why there is no figure (no /proc)
    _pids: Optional[list[int]] = field(default=None, repr=False)
    _start: Optional[CpuSample] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.read is None:
            self.read = sample

    def begin(self) -> None:
        if self.unavailable:
            return
        try:
            if self._pids is None:
                self._pids = local_ranks()
            self._start = self.read(self._pids)
        except (OSError, ValueError, IndexError) as exc:
            self.unavailable = f"the CPU counters could not be read ({type(exc).__name__}: {exc})"
            self._start = None

    def end(self, seconds: float) -> None:
        """Close the window `begin` opened: the step took `seconds` of wall time."""
        start, self._start = self._start, None
        if start is None or self.unavailable:
            return
        try:
            stop = self.read(self._pids or [os.getpid()])
        except (OSError, ValueError, IndexError) as exc:
            self.unavailable = f"the CPU counters could not be read ({type(exc).__name__}: {exc})"
            return
        # Signed: the two counters round differently over a short step, and the rounding
        # averages out over many steps only if it is kept (the total is clamped, not each step).
        self.foreign_ticks += (stop.busy_ticks - start.busy_ticks) - (stop.own_ticks - start.own_ticks)
        self.window_s += seconds
        self.cpus = stop.cpus

    @property
    def fraction(self) -> Optional[float]:
        """The foreign CPU time as a share of the machine over the timed steps; None if unknown."""
        return self._figure()[0]

    def _figure(self) -> tuple[Optional[float], str]:
        if self.unavailable:
            return None, f"unknown: {self.unavailable}"
        if not self.cpus or not self.window_s:
            return None, "unknown: no timed step was measured"
        hz = os.sysconf("SC_CLK_TCK")
        capacity = self.window_s * hz * self.cpus
        if capacity < MIN_CAPACITY_TICKS:
            return None, (f"unknown: {self.window_s:.3f} s of timed steps on {self.cpus} CPUs is under "
                          f"{MIN_CAPACITY_TICKS} clock ticks of 1/{hz} s")
        return min(1.0, max(0.0, self.foreign_ticks / capacity)), (
            f"CPU time of other processes over {self.window_s:.1f} s of timed steps, as a share of "
            f"{self.cpus} CPUs (/proc/stat busy time minus this run's own)")

    def summary(self) -> dict[str, Any]:
        figure, measure = self._figure()
        return {"foreign_cpu_load": figure, "foreign_cpu_load_measure": measure}

    def state(self) -> dict[str, Any]:
        return {"foreign_ticks": self.foreign_ticks, "window_s": self.window_s, "cpus": self.cpus,
                "unavailable": self.unavailable}

    def restore(self, state: Optional[dict[str, Any]]) -> None:
        if not state:  # a checkpoint written before the load was measured: only this run's steps count
            return
        self.foreign_ticks, self.window_s = int(state.get("foreign_ticks") or 0), float(state.get("window_s") or 0)
        self.cpus, self.unavailable = state.get("cpus"), state.get("unavailable")


def sample(pids: list[int], proc: Path = PROC) -> CpuSample:
    busy, cpus = machine_busy(proc)
    own = 0
    for pid in pids:
        try:
            own += process_ticks(pid, proc)
        except (FileNotFoundError, ProcessLookupError):
            continue  # a rank that has ended
    return CpuSample(busy, own, cpus)


__all__ = ["CpuSample", "ForeignLoad", "LOADED", "MIN_CAPACITY_TICKS", "local_ranks", "machine_busy", "process_ticks",
           "sample"]

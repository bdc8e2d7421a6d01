"""Jobs as configurations: which values differ between jobs, and seeds as replicates.

A job's values are those in effect (`summary.json`'s `settings`, written by the run
from its resolved spec, see config/in_effect.py); a job that left no summary (failed
early, never started) is known only by its overrides and group choices. A key the
run did not use (`model.n_kv_heads` under attention=mha) has the value `ABSENT`.

The keys whose known values differ between jobs are the table's columns. Jobs equal
in every such key but `seed` are one configuration, its seeds the replicates; a job
known only by its overrides joins the one configuration it agrees with, if exactly
one. The statistics of a configuration are over its completed jobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

from .stats import Replicates, Welch, replicates, welch

if TYPE_CHECKING:
    from .report import Job

SEED = "seed"
ABSENT = "—"  # the key is not in effect in that job's run


def differing(jobs: Sequence["Job"], keys: Sequence[str]) -> list[str]:
    """The keys, in order, with more than one known value over `jobs`."""
    return [key for key in keys if len({job.value(key) for job in jobs} - {None}) > 1]


def common(jobs: Sequence["Job"], keys: Sequence[str]) -> dict[str, str]:
    """key -> the one value every job that knows it agrees on."""
    out = {}
    for key in keys:
        known = {job.value(key) for job in jobs} - {None}
        if len(known) == 1:
            out[key] = known.pop()
    return out


@dataclass
class Configuration:
    """Jobs that ran with the same values but the seed."""

    number: int  # 1, 2, ... in table order
    values: dict[str, Optional[str]]  # the differing keys but the seed
    jobs: list["Job"] = field(default_factory=list)

    @property
    def completed(self) -> list["Job"]:
        from .report import COMPLETED

        return [job for job in self.jobs if job.status == COMPLETED]

    @property
    def seeds(self) -> list[str]:
        return [job.value(SEED) or "?" for job in self.jobs]

    def metric(self, key: str) -> Optional[Replicates]:
        """`key` of summary.json over the completed jobs that report a finite number."""
        values = [job.number_of(key) for job in self.completed]
        values = [v for v in values if v is not None]
        return replicates(values) if values else None

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or f"configuration {self.number}"


def _agrees(job: "Job", configuration: Configuration) -> bool:
    return all(job.value(k) in (None, v) for k, v in configuration.values.items())


def configurations(jobs: Sequence["Job"], columns: Sequence[str]) -> list[Configuration]:
    """The jobs grouped by their values in `columns` but the seed, in the order of their
    first job; a job known only by its overrides joins the one configuration it agrees with."""
    keys = [k for k in columns if k != SEED]
    out: list[Configuration] = []
    by_values: dict[tuple, Configuration] = {}
    later = []
    for job in jobs:
        if not job.resolved:
            later.append(job)
            continue
        values = {k: job.value(k) for k in keys}
        found = by_values.get(tuple(values.values()))
        if found is None:
            found = by_values[tuple(values.values())] = Configuration(len(out) + 1, values)
            out.append(found)
        found.jobs.append(job)
    for job in later:
        matches = [c for c in out if _agrees(job, c)]
        if len(matches) == 1:
            matches[0].jobs.append(job)
        else:
            out.append(Configuration(len(out) + 1, {k: job.value(k) for k in keys}, [job]))
    for configuration in out:  # job order within each
        configuration.jobs.sort(key=lambda j: j.order)
    return out


def replicated(groups: Sequence[Configuration]) -> bool:
    """Whether some configuration ran with several seeds (the report then has a row per configuration)."""
    return any(len(c.jobs) > 1 for c in groups)


@dataclass(frozen=True)
class Comparison:
    """A configuration against the best one (lowest mean of the metric)."""

    best: bool
    test: Optional[Welch] = None
    reason: str = ""  # why there is no test

    def text(self) -> str:
        if self.best:
            return "best"
        if self.test is None:
            return f"n/a ({self.reason})"
        return f"{'yes' if self.test.significant else 'no'} (p={self.test.p:.2g})"


def compare_to_best(groups: Sequence[Configuration], key: str) -> list[Optional[Comparison]]:
    """For each configuration, whether its mean of `key` differs from the lowest mean by more
    than the seed spread explains: Welch's two-sided t-test at 5% (stats.welch); None for a
    configuration without a completed value."""
    metrics = [c.metric(key) for c in groups]
    measured = [i for i, m in enumerate(metrics) if m is not None and math.isfinite(m.mean)]
    if not measured:
        return [None] * len(groups)
    best = min(measured, key=lambda i: metrics[i].mean)
    out: list[Optional[Comparison]] = []
    for i, metric in enumerate(metrics):
        if metric is None:
            out.append(None)
        elif i == best:
            out.append(Comparison(best=True))
        elif metric.n < 2 or metrics[best].n < 2:
            out.append(Comparison(False, reason="1 seed"))
        else:
            test = welch(metric, metrics[best])
            out.append(Comparison(False, reason="no seed spread") if test is None else Comparison(False, test))
    return out


__all__ = ["ABSENT", "SEED", "Comparison", "Configuration", "common", "compare_to_best", "configurations",
           "differing", "replicated"]

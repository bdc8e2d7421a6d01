"""One report for a sweep: a table of every job (report.md, report.csv) and plots.

A sweep folder (Hydra's `hydra.sweep.dir`) holds one folder per job. A job is
recognized by its `.hydra/hydra.yaml`, which also says what the job ran: its
group choices (`hydra.runtime.choices`) and its overrides
(`hydra.overrides.task`). Folder names are never parsed. What a job measured
comes from the files it wrote: `summary.json` (a finished run),
`failure.json` (a failed one, see `sweep_callback`) and `metrics.jsonl` (the
curve); a job with neither summary nor failure did not finish: it is incomplete
while the sweep runs or after an interrupt, and failed once the sweep has ended
in a failure (`sweep_end.json`), since then its process was killed. A summary's
`status` counts too: a diverged or failed run is a failed job, an interrupted
one an incomplete job. Jobs listed in `sweep_plan.json` that have no folder never
started: they are `not started` rows. Every file is
written through a temporary file and a rename, and nothing a job wrote is
touched, so a report can be rebuilt at any time, also while a sweep runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..artifacts.atomic import write_atomic
from ..model.card import human_bytes
from .plots import TITLES, draw_plots

REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
SUMMARY = "summary.json"
FAILURE = "failure.json"
METRICS = "metrics.jsonl"
PLAN = "sweep_plan.json"  # every job's overrides, written as the sweep starts (sweep/callback.py)
END = "sweep_end.json"  # how a sweep Hydra did not end ended: failed or interrupted
HYDRA_YAML = Path(".hydra") / "hydra.yaml"

COMPLETED, FAILED, INCOMPLETE, NOT_STARTED = "completed", "failed", "incomplete", "not started"
STATUSES = (COMPLETED, FAILED, INCOMPLETE, NOT_STARTED)
INTERRUPTED = "interrupted"  # how a sweep ended (sweep_end.json), besides FAILED
#: What a failed row says of a job whose process died without a word.
DIED = {"type": "ProcessDied", "message": "the job left neither a summary nor an error record: its process was "
        "killed (a signal, out of memory) or its worker died"}

#: The tasks whose jobs write a run summary; jobs of other tasks (a sweep of
#: architecture cards, say) have nothing to tabulate.
REPORTED_TASKS = ("train",)


def _loss(v: float) -> str:
    return f"{v:.4f}"


def _count(v: float) -> str:
    return f"{v:,.0f}"


def _seconds(v: float) -> str:
    return f"{v:.1f}"


def _bytes(v: float) -> str:
    return human_bytes(v)


@dataclass(frozen=True)
class Metric:
    key: str  # the field of summary.json
    header: str
    format: Callable[[float], str]


#: The measured columns, in table order.
METRIC_COLUMNS = (
    Metric("final_train_loss", "train loss", _loss),
    Metric("final_val_loss", "held-out loss", _loss),
    Metric("final_val_accuracy", "held-out accuracy", _loss),
    Metric("tokens_per_s", "tokens/s", _count),
    Metric("params_total", "parameters", _count),
    Metric("params_active", "active parameters", _count),
    Metric("kv_cache_bytes_per_token", "KV cache bytes/token", _count),
    Metric("peak_memory_bytes", "peak memory", _bytes),
    Metric("wall_s", "wall time (s)", _seconds),
)


@dataclass
class Job:
    """One job of a sweep, as its files describe it."""

    number: int
    path: Path
    task: Optional[str]
    settings: dict[str, str]  # group choices and overrides: {"attention": "mha", "task.steps": "2"}
    status: str
    summary: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> str:
        if not self.failure:
            return str(self.summary.get("error") or "")  # a run that diverged or failed says why
        return f"{self.failure.get('type', 'Error')}: {self.failure.get('message', '')}"

    def curve(self) -> list[tuple[int, float]]:
        """Held-out loss by step, from metrics.jsonl (a partial log of an unfinished job too)."""
        points = []
        for record in _json_lines(self.path / METRICS):
            if isinstance(record.get("val_loss"), (int, float)) and "step" in record:
                points.append((int(record["step"]), float(record["val_loss"])))
        return points


@dataclass
class SweepReport:
    sweep_dir: Path
    jobs: list[Job]
    swept: list[str]
    files: list[Path]

    @property
    def markdown(self) -> Path:
        return self.sweep_dir / REPORT_MD

    def count(self, status: str) -> int:
        return sum(job.status == status for job in self.jobs)

    def describe(self) -> str:
        return describe(self.jobs)


def describe(jobs: Sequence[Job]) -> str:
    """The counts by status, as in "4 jobs: 3 completed, 1 failed"."""
    counts = [(status, sum(job.status == status for job in jobs)) for status in STATUSES]
    text = ", ".join(f"{n} {status}" for status, n in counts if n)
    return f"{len(jobs)} job{'s' * (len(jobs) != 1)}: {text or 'none'}"


# ---------------------------------------------------------------- reading


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    """The object in `path`, or None when it is missing or not (yet) whole."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _json_lines(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by an interrupted job
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _is_sweep_job(path: Path) -> bool:
    """A folder Hydra ran a job of a sweep in (a single run's folder says mode RUN)."""
    try:
        return OmegaConf.load(path / HYDRA_YAML).hydra.get("mode") == "MULTIRUN"
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException):
        return False


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders directly under `sweep_dir`."""
    if not sweep_dir.is_dir():
        return []
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / HYDRA_YAML).is_file() and _is_sweep_job(p))


def is_sweep(path: Path) -> bool:
    return bool(job_dirs(path))


def summary_status(summary: dict[str, Any]) -> str:
    """A run's summary says how it ended: a diverged or failed run is a failed job, an
    interrupted one did not finish (summaries older than `status` are of completed runs)."""
    ended = summary.get("status", COMPLETED)
    return {"completed": COMPLETED, "interrupted": INCOMPLETE}.get(ended, FAILED)


def settings_of(overrides: Sequence[Any]) -> dict[str, str]:
    """key -> value of a job's overrides, in their order."""
    settings = {}
    for override in overrides:
        key, _, value = str(override).partition("=")
        settings[key.lstrip("+~")] = value
    return settings


def read_job(path: Path, ended: Optional[str] = None) -> Job:
    hydra = OmegaConf.to_container(OmegaConf.load(path / HYDRA_YAML).hydra, resolve=False)
    choices = {k: str(v) for k, v in (hydra["runtime"]["choices"] or {}).items()
               if v is not None and not k.startswith("hydra/")}
    settings = settings_of(hydra["overrides"]["task"] or [])  # the command line's order first,
    for group in reversed(choices):  # then the other group choices (Hydra lists them last-composed first)
        settings.setdefault(group, choices[group])
    summary = _read_json(path / SUMMARY)
    failure = _read_json(path / FAILURE)
    status = FAILED if failure is not None else INCOMPLETE if summary is None else summary_status(summary)
    if status == INCOMPLETE and summary is None and ended == FAILED:
        status, failure = FAILED, DIED
    number = hydra.get("job", {}).get("num")
    return Job(number=int(number) if isinstance(number, int) else -1, path=path, task=choices.get("task"),
               settings=settings, status=status, summary=summary or {}, failure=failure or {})


def declared_sweeps(sweep_dir: Path) -> list[str]:
    """The keys the sweep's command line (or sweeper config) declared as swept, in order:
    `attention=mha,mqa`, `attention=choice(mha,mqa)`, `hydra.sweeper.params`."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    hydra = OmegaConf.to_container(OmegaConf.load(path).hydra, resolve=False)
    keys = []
    try:
        for override in OverridesParser.create().parse_overrides(list(hydra["overrides"]["task"] or [])):
            if override.is_sweep_override():
                keys.append(override.key_or_group)
    except HydraException:
        pass  # an override this parser cannot read: the keys that vary still show
    params = (hydra.get("sweeper") or {}).get("params") or {}
    return list(dict.fromkeys([*keys, *params]))


def _sweep_task(sweep_dir: Path) -> Optional[str]:
    try:
        return OmegaConf.load(sweep_dir / "multirun.yaml").hydra.runtime.choices.get("task")
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException, AttributeError):
        return None


def not_started(sweep_dir: Path, started: set[int]) -> list[Job]:
    """The jobs `sweep_plan.json` lists that have no folder."""
    plan = _read_json(sweep_dir / PLAN)
    jobs = plan.get("jobs") if plan else None
    if not isinstance(jobs, list):
        return []
    default_task, out = _sweep_task(sweep_dir), []
    for number, overrides in enumerate(jobs):
        if number in started or not isinstance(overrides, list):
            continue
        settings = settings_of(overrides)
        out.append(Job(number=number, path=sweep_dir, task=settings.get("task", default_task), settings=settings,
                       status=NOT_STARTED))
    return out


def collect(sweep_dir: Path) -> tuple[list[Job], list[str]]:
    """The sweep's reported jobs in job order (with those planned that never started),
    and the swept keys: declared as sweeps, or differing between jobs."""
    end = _read_json(sweep_dir / END) or {}
    jobs = [read_job(p, end.get("ended")) for p in job_dirs(sweep_dir)]
    jobs += not_started(sweep_dir, {j.number for j in jobs})
    jobs = sorted((j for j in jobs if j.task in REPORTED_TASKS), key=lambda j: (j.number, j.path.name))
    keys = list(dict.fromkeys(k for job in jobs for k in job.settings))
    varying = [k for k in keys if len({job.settings.get(k) for job in jobs}) > 1]
    swept = [k for k in dict.fromkeys([*declared_sweeps(sweep_dir), *varying]) if k in keys]
    return jobs, swept


# ---------------------------------------------------------------- the table


@dataclass
class Column:
    header: str
    raw: list[Any]  # per job, None where missing
    text: list[str]  # per job, "" where missing
    keep: bool = False  # stays in the table even when every job agrees


def _metric_column(metric: Metric, jobs: Sequence[Job]) -> Column:
    raw = [job.summary.get(metric.key) for job in jobs]
    raw = [v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None for v in raw]
    return Column(metric.header, raw, ["" if v is None else metric.format(v) for v in raw])


def columns(jobs: Sequence[Job], swept: Sequence[str]) -> list[Column]:
    settings = [k for k in dict.fromkeys(k for job in jobs for k in job.settings) if k not in swept]
    out = [Column("job", [j.number for j in jobs], [str(j.number) for j in jobs], keep=True)]
    for key in swept:
        values = [job.settings.get(key) for job in jobs]
        out.append(Column(key, values, [v or "" for v in values], keep=True))
    out.append(Column("status", [j.status for j in jobs], [j.status for j in jobs]))
    out += [_metric_column(m, jobs) for m in METRIC_COLUMNS]
    errors = [job.error for job in jobs]
    if any(errors):
        out.append(Column("error", [e or None for e in errors], errors, keep=True))
    for key in settings:
        values = [job.settings.get(key) for job in jobs]
        out.append(Column(key, values, [v or "" for v in values]))
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_markdown(sweep_dir: Path, jobs: Sequence[Job], swept: Sequence[str], plots: Sequence[str]) -> str:
    cols = columns(jobs, swept)
    table, same, missing = [], [], []
    for col in cols:
        if col.keep or len(set(col.text)) > 1:
            table.append(col)
        elif not any(col.text):
            missing.append(col.header)
        else:
            same.append(f"{col.header} `{col.text[0]}`")
    lines = ["# Sweep report", "", f"Sweep `{sweep_dir}`: {describe(jobs)}."]
    if swept:
        lines.append(f"Swept: {', '.join(f'`{k}`' for k in swept)}.")
    if same:
        lines += ["", "The same in every job: " + "; ".join(same) + "."]
    lines += ["", "| " + " | ".join(_cell(c.header) for c in table) + " |",
              "|" + "|".join("---:" if c.header != "error" and any(isinstance(v, (int, float)) for v in c.raw)
                             else "---" for c in table) + "|"]
    for i in range(len(jobs)):
        lines.append("| " + " | ".join(_cell(c.text[i]) for c in table) + " |")
    if missing:
        lines += ["", "Not reported by any job: " + ", ".join(missing) + "."]
    lines += ["", f"Every column, for every job: [{REPORT_CSV}]({REPORT_CSV})."]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{TITLES.get(name, name)}]({name})" for name in plots]
    else:
        lines += ["", "No plots: no job has measurements yet."]
    return "\n".join(lines) + "\n"


def render_csv(jobs: Sequence[Job], swept: Sequence[str]) -> str:
    """Every column for every job, values unrounded, blanks where missing."""
    cols = columns(jobs, swept)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c.header for c in cols])
    for i in range(len(jobs)):
        writer.writerow(["" if c.raw[i] is None else c.raw[i] for c in cols])
    return buffer.getvalue()


# ---------------------------------------------------------------- writing


def label(job: Job, swept: Sequence[str]) -> str:
    return ", ".join(f"{k}={job.settings.get(k, '')}" for k in swept) or f"job {job.number}"


def write_report(sweep_dir: Path) -> SweepReport:
    """Write report.md, report.csv and the plots into `sweep_dir`; return what was written
    (nothing when the sweep has no job of a reported task)."""
    sweep_dir = Path(sweep_dir)
    jobs, swept = collect(sweep_dir)
    if not jobs:
        return SweepReport(sweep_dir, [], swept, [])
    plots = draw_plots([(label(j, swept), j) for j in jobs])
    files = []
    for name, png in plots.items():
        write_atomic(sweep_dir / name, png)
        files.append(sweep_dir / name)
    write_atomic(sweep_dir / REPORT_CSV, render_csv(jobs, swept))
    write_atomic(sweep_dir / REPORT_MD, render_markdown(sweep_dir, jobs, swept, list(plots)))
    files += [sweep_dir / REPORT_CSV, sweep_dir / REPORT_MD]
    return SweepReport(sweep_dir, jobs, swept, files)


__all__ = ["COMPLETED", "FAILED", "INCOMPLETE", "NOT_STARTED", "Job", "SweepReport", "collect", "is_sweep",
           "job_dirs", "write_report"]

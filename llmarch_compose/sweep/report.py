"""One report for a sweep, or for several merged: a table (report.md, report.csv) and plots.

A sweep folder (Hydra's `hydra.sweep.dir`) holds one folder per job. A job is
recognized by its `.hydra/hydra.yaml`, which also says what the job ran: its
group choices (`hydra.runtime.choices`) and its overrides
(`hydra.overrides.task`). Folder names are never parsed. What a job measured
comes from the files it wrote: `summary.json` (a finished run, with the values in
effect under `settings`), `failure.json` (a failed one, see `sweep_callback`) and
`metrics.jsonl` (the curves); a job with neither summary nor failure did not
finish: it is incomplete while the sweep runs or after an interrupt, and failed
once the sweep has ended in a failure (`sweep_end.json`), since then its process
was killed. A summary's `status` counts too: a diverged or failed run is a failed
job, an interrupted one an incomplete job. Jobs listed in `sweep_plan.json` that
have no folder never started: they are `not started` rows.

The table compares the values in effect (groups.py): those that differ between
jobs are its columns, those equal in every job are listed once above it. When some
configuration ran with several seeds, the table has one row per configuration with
the mean, standard deviation and 95% interval of each metric over its seeds, and
whether its held-out loss differs from the best configuration's by more than the
seed spread (Welch's t-test, stats.py); report.csv keeps one row per job.

Several sweeps merge into one report (`write_report(output, sweeps=[a, b])`): the
job ids are qualified by their sweep (`a/0`, `b/0`), and within one folder that
holds jobs of several sweeps (`hydra.sweep.subdir`) by their folder, so no id
repeats. Every file is written through a temporary file and a rename, and nothing a
job wrote is touched, so a report can be rebuilt at any time, also while a sweep runs.
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
from ..train.foreign_load import LOADED
from .groups import ABSENT, SEED, Comparison, Configuration, common, compare_to_best, configurations, differing, \
    replicated
from .plots import TITLES, Series, draw_plots
from .stats import Replicates

REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
CONFIGURATIONS_CSV = "report_configurations.csv"
SOURCES = "report_sweeps.json"  # the sweeps a merged report reads, so that it can be rebuilt
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

#: The summary field configurations are ranked and tested by (what a sweep minimizes).
OBJECTIVE = "final_val_loss"
FOREIGN_LOAD = "foreign_cpu_load"
LOADED_MARK = "⚠"


def _loss(v: float) -> str:
    return f"{v:.4f}"


def _count(v: float) -> str:
    return f"{v:,.0f}"


def _seconds(v: float) -> str:
    return f"{v:.1f}"


def _percent(v: float) -> str:
    return f"{v:+.3f}"


def _bytes(v: float) -> str:
    return human_bytes(v)


@dataclass(frozen=True)
class Metric:
    key: str  # the field of summary.json
    header: str
    format: Callable[[float], str]


#: The measured columns, in table order. A figure a run adds to summary.json becomes a
#: column by one more entry here (figures equal over a configuration's seeds show once).
METRIC_COLUMNS = (
    Metric("final_train_loss", "train loss", _loss),
    Metric("final_val_loss", "held-out loss", _loss),
    Metric("final_val_accuracy", "held-out accuracy", _loss),
    Metric("tokens_per_s", "tokens/s", _count),
    Metric("params_total", "parameters", _count),
    # model.match: how far the matched figure stayed from its target (the moved dimension is a value in effect)
    Metric("match.difference_pct", "matched: difference from target (%)", _percent),
    Metric("params_active", "active parameters", _count),
    Metric("kv_cache_bytes_per_token", "KV cache bytes/token", _count),
    Metric("peak_memory_bytes", "peak memory", _bytes),
    Metric("wall_s", "wall time (s)", _seconds),
)
FOREIGN_HEADER = "foreign CPU load"
COMPARISON_HEADER = "differs from best (Welch t-test)"


def _text(value: Any) -> str:
    """A value in effect as the table shows it (and as an override would type it)."""
    return value if isinstance(value, str) else json.dumps(value)


def _finite(value: Any) -> Optional[float]:
    """A finite number as it was written (an int stays an int); None for anything else."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


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
    id: str = ""  # unique in its report: the job number, qualified by its sweep where several merge
    order: tuple = ()  # the report's row order

    def __post_init__(self) -> None:
        self.id = self.id or str(self.number)
        self.order = self.order or (self.number, self.path.name)
        settings = self.summary.get("settings")
        self.values: Optional[dict[str, str]] = None  # the values in effect, from the run's summary
        if isinstance(settings, dict):
            self.values = {str(k): _text(v) for k, v in settings.items()}
            for key, value in self.settings.items():  # a choice the run does not record (logger=...)
                self.values.setdefault(key, value)

    @property
    def resolved(self) -> bool:
        """Whether the run recorded the values it used (else only its overrides are known)."""
        return self.values is not None

    def value(self, key: str) -> Optional[str]:
        """The value of `key` in effect; ABSENT where the run did not use it; None where unknown."""
        if self.values is not None:
            return self.values.get(key, ABSENT)
        return self.settings.get(key)

    def number_of(self, key: str) -> Optional[float]:
        """A figure of the summary; a dotted key reads inside a record (`match.difference_pct`)."""
        value: Any = self.summary
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return _finite(value)

    @property
    def error(self) -> str:
        if not self.failure:
            return str(self.summary.get("error") or "")  # a run that diverged or failed says why
        return f"{self.failure.get('type', 'Error')}: {self.failure.get('message', '')}"

    @property
    def foreign_load(self) -> Optional[float]:
        return self.number_of(FOREIGN_LOAD)

    @property
    def loaded(self) -> bool:
        """Whether its throughput was measured while other processes used more than LOADED of the CPU."""
        return (self.foreign_load or 0.0) > LOADED

    def foreign_text(self) -> str:
        load = self.foreign_load
        if load is not None:
            return f"{load:.0%}" + (f" {LOADED_MARK}" if load > LOADED else "")
        return "unknown" if FOREIGN_LOAD in self.summary else ""

    def curve(self, key: str = "val_loss") -> list[tuple[int, float]]:
        """`key` (val_loss, train_loss) by step, from metrics.jsonl (a partial log of an unfinished job too)."""
        points = []
        for record in _json_lines(self.path / METRICS):
            if isinstance(record.get(key), (int, float)) and "step" in record:
                points.append((int(record["step"]), float(record[key])))
        return points


@dataclass
class SweepReport:
    sweep_dir: Path  # where the report is written
    jobs: list[Job]
    swept: list[str]
    files: list[Path]
    sweeps: list[Path] = field(default_factory=list)  # the sweeps read (the folder itself, unless merged)

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


def _sweep_jobs(sweep_dir: Path) -> list[Job]:
    """The reported jobs of one sweep folder (with those planned that never started), in job
    order; within a folder that holds jobs of several sweeps (numbers repeat), ids are folder names."""
    end = _read_json(sweep_dir / END) or {}
    jobs = [read_job(p, end.get("ended")) for p in job_dirs(sweep_dir)]
    numbers = [j.number for j in jobs]
    if len(set(numbers)) < len(numbers):
        for job in jobs:
            job.id = job.path.name
    jobs += not_started(sweep_dir, set(numbers))
    return sorted((j for j in jobs if j.task in REPORTED_TASKS), key=lambda j: (j.number, j.path.name))


def sweep_names(sweeps: Sequence[Path]) -> list[str]:
    """The shortest trailing paths that tell the sweeps apart (`12-00-00`, or `day1/12-00-00`)."""
    parts = [Path(s).absolute().parts for s in sweeps]
    for k in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(Path(s).absolute()) for s in sweeps]


def collect_sweeps(sweeps: Sequence[Path]) -> tuple[list[Job], list[str]]:
    """The jobs of every sweep in `sweeps` (ids qualified by their sweep when there are several)
    and the declared swept keys, in order."""
    jobs, declared = [], []
    names = sweep_names(sweeps)
    for i, (sweep_dir, name) in enumerate(zip(sweeps, names)):
        for job in _sweep_jobs(Path(sweep_dir)):
            if len(sweeps) > 1:
                job.id = f"{name}/{job.id}"
            job.order = (i, job.number, job.path.name)
            jobs.append(job)
        declared += declared_sweeps(Path(sweep_dir))
    ids = [job.id for job in jobs]  # a last guard: a repeated id gets its position
    for i, job in enumerate(jobs):
        if ids.count(job.id) > 1:
            job.id = f"{job.id}#{i}"
    return jobs, list(dict.fromkeys(declared))


def keys_of(jobs: Sequence[Job], declared: Sequence[str]) -> list[str]:
    """Every key any job knows, the declared swept ones first."""
    seen = dict.fromkeys(declared)
    for job in jobs:
        seen.update(dict.fromkeys(job.values if job.values is not None else job.settings))
    return list(seen)


def swept_keys(jobs: Sequence[Job], declared: Sequence[str]) -> list[str]:
    """The table's value columns: the declared swept keys, each followed by the keys under it
    that differ (`attention`, `attention.num_kv_heads`), then the other keys that differ."""
    keys = keys_of(jobs, declared)
    varying = [k for k in differing(jobs, keys) if k not in declared]
    out = []
    for key in (k for k in declared if k in keys):
        out += [key, *(k for k in varying if k.startswith(key + "."))]
    return out + [k for k in varying if k not in out]


def collect(sweep_dir: Path) -> tuple[list[Job], list[str]]:
    """The sweep's reported jobs in job order (with those planned that never started),
    and the swept keys (`swept_keys`): declared as sweeps, and those whose values in effect differ."""
    jobs, declared = collect_sweeps([sweep_dir])
    return jobs, swept_keys(jobs, declared)


# ---------------------------------------------------------------- the table


@dataclass
class Column:
    header: str
    raw: list[Any]  # per row, None where missing
    text: list[str]  # per row, "" where missing
    keep: bool = False  # stays in the table even when every row agrees


def _value_column(key: str, rows: Sequence[Optional[str]]) -> Column:
    return Column(key, list(rows), [v or "" for v in rows], keep=True)


def job_columns(jobs: Sequence[Job], swept: Sequence[str], groups: Optional[Sequence[Configuration]] = None
                ) -> list[Column]:
    """One row per job: its id, the swept values, status, figures, foreign load, error."""
    out = [Column("job", [j.id for j in jobs], [j.id for j in jobs], keep=True)]
    if groups is not None:
        number = {id(job): c.number for c in groups for job in c.jobs}
        out.append(Column("configuration", [number[id(j)] for j in jobs], [str(number[id(j)]) for j in jobs],
                          keep=True))
    out += [_value_column(key, [job.value(key) for job in jobs]) for key in swept]
    out.append(Column("status", [j.status for j in jobs], [j.status for j in jobs]))
    for metric in METRIC_COLUMNS:
        raw = [job.number_of(metric.key) for job in jobs]
        text = ["" if v is None else metric.format(v) for v in raw]
        if metric.key == "tokens_per_s":
            text = [t + f" {LOADED_MARK}" if t and job.loaded else t for t, job in zip(text, jobs)]
        out.append(Column(metric.header, raw, text))
    out.append(Column(FOREIGN_HEADER, [j.foreign_load for j in jobs], [j.foreign_text() for j in jobs],
                      keep=any(j.loaded for j in jobs)))
    errors = [job.error for job in jobs]
    if any(errors):
        out.append(Column("error", [e or None for e in errors], errors, keep=True))
    return out


def _spread(metric: Metric, values: Optional[Replicates]) -> str:
    """mean ± sd [95% interval] over the seeds; the value alone where the seeds agree or one ran."""
    if values is None:
        return ""
    if values.n < 2 or len(set(values.values)) == 1:
        return metric.format(values.mean)
    low, high = values.interval
    return f"{metric.format(values.mean)} ± {metric.format(values.sd)} [{metric.format(low)} – {metric.format(high)}]"


def _statuses(jobs: Sequence[Job]) -> str:
    return ", ".join(f"{n} {s}" for s in STATUSES if (n := sum(j.status == s for j in jobs)))


def _group_foreign(configuration: Configuration) -> tuple[Optional[float], str]:
    """The highest foreign load over the configuration's completed jobs, and its text."""
    measured = [(j.foreign_load, j) for j in configuration.completed if j.foreign_load is not None]
    unknown = [j.value(SEED) or "?" for j in configuration.completed
               if j.foreign_load is None and FOREIGN_LOAD in j.summary]
    if not measured:
        return None, "unknown" if unknown else ""
    load, job = max(measured, key=lambda m: m[0])
    text = f"≤ {load:.0%}" if load <= LOADED else f"{load:.0%} {LOADED_MARK} (seed {job.value(SEED) or '?'})"
    if unknown:
        text += f"; seed {', '.join(unknown)} unknown"
    return load, text


def configuration_columns(groups: Sequence[Configuration], swept: Sequence[str]) -> list[Column]:
    """One row per configuration: its values, seeds, jobs, and each figure over its completed seeds."""
    keys = [k for k in swept if k != SEED]
    out = [Column("configuration", [c.number for c in groups], [str(c.number) for c in groups], keep=True)]
    out += [_value_column(key, [c.values.get(key) for c in groups]) for key in keys]
    out.append(Column("seeds", [", ".join(c.seeds) for c in groups], [", ".join(c.seeds) for c in groups], keep=True))
    out.append(Column("jobs", [", ".join(j.id for j in c.jobs) for c in groups],
                      [", ".join(j.id for j in c.jobs) for c in groups], keep=True))
    out.append(Column("status", [_statuses(c.jobs) for c in groups], [_statuses(c.jobs) for c in groups]))
    for metric in METRIC_COLUMNS:
        values = [c.metric(metric.key) for c in groups]
        text = [_spread(metric, v) for v in values]
        if metric.key == "tokens_per_s":
            text = [t + f" {LOADED_MARK}" if t and any(j.loaded for j in c.completed) else t
                    for t, c in zip(text, groups)]
        out.append(Column(metric.header, [None if v is None else v.mean for v in values], text))
        if metric.key == OBJECTIVE:
            tests = compare_to_best(groups, OBJECTIVE)
            out.append(Column(COMPARISON_HEADER, [t.text() if t else None for t in tests],
                              [t.text() if t else "" for t in tests], keep=any(tests)))
    foreign = [_group_foreign(c) for c in groups]
    out.append(Column(FOREIGN_HEADER, [f[0] for f in foreign], [f[1] for f in foreign],
                      keep=any(f[0] is not None and f[0] > LOADED for f in foreign)))
    errors = ["; ".join(f"{j.id}: {j.error}" for j in c.jobs if j.error) for c in groups]
    if any(errors):
        out.append(Column("error", [e or None for e in errors], errors, keep=True))
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section(key: str) -> str:
    return key.split(".", 1)[0]


def _same_in_every_job(values: dict[str, str]) -> list[str]:
    """The values equal in every job, one line per section (model, attention, task, ...)."""
    sections: dict[str, list[str]] = {}
    for key, value in values.items():
        sections.setdefault(_section(key), []).append(f"{key} `{_cell(value)}`")
    return [f"- **{name}**: " + "; ".join(items) for name, items in sections.items()]


def _table(cols: Sequence[Column], rows: int) -> tuple[list[str], list[Column], list[Column], list[str]]:
    """The Markdown table of the columns that differ (or are kept), those columns, the
    others (equal in every row) and the headers no row has."""
    table, same, missing = [], [], []
    for col in cols:
        if col.keep or len(set(col.text)) > 1:
            table.append(col)
        elif not any(col.text):
            missing.append(col.header)
        else:
            same.append(col)
    lines = ["| " + " | ".join(_cell(c.header) for c in table) + " |",
             "|" + "|".join("---:" if c.header not in ("error", "job", "jobs", "seeds") and
                            any(isinstance(v, (int, float)) for v in c.raw) else "---" for c in table) + "|"]
    lines += ["| " + " | ".join(_cell(c.text[i]) for c in table) + " |" for i in range(rows)]
    return lines, table, same, missing


def render_markdown(report_dir: Path, jobs: Sequence[Job], swept: Sequence[str], plots: Sequence[str],
                    sweeps: Sequence[Path] = (), groups: Optional[Sequence[Configuration]] = None) -> str:
    """report.md: what every job shares, then one row per job (or per configuration, `groups`)."""
    sweeps = list(sweeps) or [report_dir]
    keys = keys_of(jobs, swept)
    same_values = {k: v for k, v in common(jobs, keys).items() if k not in swept and v != ABSENT}
    grouped = groups is not None
    cols = configuration_columns(groups, swept) if grouped else job_columns(jobs, swept)
    table, shown, same, missing = _table(cols, len(groups) if grouped else len(jobs))
    if len(sweeps) == 1:
        lines = ["# Sweep report", "", f"Sweep `{sweeps[0]}`: {describe(jobs)}."]
    else:
        names = sweep_names(sweeps)
        lines = ["# Sweep report", "", f"{len(sweeps)} sweeps merged, {describe(jobs)}. Job ids are qualified by "
                 "their sweep:", ""]
        lines += [f"- `{name}`: `{Path(s).absolute()}`" for name, s in zip(names, sweeps)]
        lines.append("")
    varied = [k for k in swept if k != SEED or not grouped]
    if varied:
        lines.append(f"What differs between jobs (values in effect): {', '.join(f'`{k}`' for k in varied)}.")
    if grouped:
        seeds = sorted({len(c.jobs) for c in groups})
        lines += ["", f"Seeds are replicates: {len(groups)} configurations, "
                  f"{' or '.join(map(str, seeds))} seeds each. Figures are over each configuration's completed "
                  "seeds: mean ± sample standard deviation [95% interval of the mean, Student t with n-1 degrees "
                  "of freedom]; a figure equal in every seed shows once."]
        repeated = [str(c.number) for c in groups if len(set(c.seeds)) < len(c.seeds)]
        if repeated:
            lines.append(f"Configuration {', '.join(repeated)} ran a seed more than once (sweeps merged that "
                         "repeat a job): those runs are not independent replicates.")
    if same_values:
        lines += ["", "The same in every job (values in effect):", "", *_same_in_every_job(same_values)]
    if same:
        lines += ["", "Measured, the same in every " + ("configuration" if grouped else "job") + ": "
                  + "; ".join(f"{c.header} `{_cell(c.text[0])}`" for c in same) + "."]
    lines += ["", *table]
    if grouped and any(c.header == COMPARISON_HEADER for c in shown):
        lines += ["", f"{COMPARISON_HEADER}: whether the configuration's mean held-out loss differs from the best "
                  "(lowest) one by more than the seed spread explains: Welch's two-sided t-test (unequal "
                  "variances, Welch-Satterthwaite degrees of freedom), \"yes\" where p < 0.05; n/a with one "
                  "completed seed on either side."]
    loaded = [j for j in jobs if j.loaded]
    if loaded:
        lines += ["", f"{LOADED_MARK} tokens/s measured while other processes used more than {LOADED:.0%} of the "
                  f"machine's CPU (column {FOREIGN_HEADER}; job{'s' * (len(loaded) > 1)} "
                  f"{', '.join(j.id for j in loaded)}): that throughput understates the model's."]
    if missing:
        lines += ["", "Not reported by any job: " + ", ".join(missing) + "."]
    lines += ["", f"Every column, for every job: [{REPORT_CSV}]({REPORT_CSV})."]
    if grouped:
        lines.append(f"Every figure's mean, standard deviation and interval, per configuration: "
                     f"[{CONFIGURATIONS_CSV}]({CONFIGURATIONS_CSV}).")
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{TITLES.get(name, name)}]({name})" for name in plots]
    else:
        lines += ["", "No plots: no job has measurements yet."]
    return "\n".join(lines) + "\n"


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def render_csv(jobs: Sequence[Job], swept: Sequence[str], groups: Optional[Sequence[Configuration]] = None) -> str:
    """Every column for every job (each seed its own row), values unrounded, blanks where
    missing; then every value in effect that is the same in every job."""
    cols = [c for c in job_columns(jobs, swept, groups) if c.header not in (FOREIGN_HEADER, "error")]
    cols.append(Column(FOREIGN_LOAD, [j.foreign_load for j in jobs], []))
    cols.append(Column("error", [j.error or None for j in jobs], []))
    rest = [k for k in keys_of(jobs, swept) if k not in swept]
    header = [c.header for c in cols] + rest
    rows = [[c.raw[i] for c in cols] + [job.value(k) for k in rest] for i, job in enumerate(jobs)]
    return _csv(header, rows)


def render_configurations_csv(groups: Sequence[Configuration], swept: Sequence[str]) -> str:
    """One row per configuration: its values, seeds and jobs, and per figure n, mean, sd and
    the 95% interval; the held-out loss's Welch test against the best configuration."""
    keys = [k for k in swept if k != SEED]
    header = ["configuration", *keys, "seeds", "jobs", "completed"]
    for metric in METRIC_COLUMNS:
        header += [f"{metric.header} {part}" for part in ("n", "mean", "sd", "ci95 low", "ci95 high")]
    header += ["held-out loss vs best: Welch t", "Welch df", "Welch p", "differs from best", FOREIGN_LOAD + " max"]
    tests = compare_to_best(groups, OBJECTIVE)
    rows = []
    for c, test in zip(groups, tests):
        row: list[Any] = [c.number, *(c.values.get(k) for k in keys), " ".join(c.seeds),
                          " ".join(j.id for j in c.jobs), len(c.completed)]
        for metric in METRIC_COLUMNS:
            v = c.metric(metric.key)
            interval = v.interval if v is not None else None
            row += [v.n if v else 0, v.mean if v else None, v.sd if v else None,
                    interval[0] if interval else None, interval[1] if interval else None]
        welch_test = test.test if isinstance(test, Comparison) else None
        row += [welch_test.t if welch_test else None, welch_test.df if welch_test else None,
                welch_test.p if welch_test else None, test.text() if test else None, _group_foreign(c)[0]]
        rows.append(row)
    return _csv(header, rows)


# ---------------------------------------------------------------- writing


def series(groups: Sequence[Configuration], swept: Sequence[str], declared: Sequence[str], grouped: bool
           ) -> list[Series]:
    """What the plots draw: per configuration (one colour), the curves and figures of its
    jobs (the completed ones where it has several seeds and some completed), labelled by
    the declared swept values where they tell the configurations apart, else by every
    value that differs."""

    def value(c: Configuration, key: str) -> str:  # the seed of a configuration of one job too
        return (c.values[key] if key in c.values else c.jobs[0].value(key) if len(c.jobs) == 1 else None) or "?"

    def labels_by(keys: Sequence[str]) -> list[str]:
        return [", ".join(f"{k}={value(c, k)}" for k in keys) for c in groups]

    keys = [k for k in swept if k != SEED or not grouped]
    labels = labels_by([k for k in declared if k in keys])
    if len(set(labels)) < len(labels) or not any(labels):
        labels = labels_by(keys)
    out = []
    for c, label in zip(groups, labels):
        jobs = c.completed if len(c.jobs) > 1 and c.completed else c.jobs
        if not label or labels.count(label) > 1:  # values unknown (a job that never ran): its id tells it apart
            label = ", ".join(filter(None, [label, f"job {c.jobs[0].id}" if len(c.jobs) == 1 else f"#{c.number}"]))
        loads = [j.foreign_load for j in jobs if j.loaded]
        out.append(Series(
            label=label,
            train=[j.curve("train_loss") for j in jobs],
            val=[j.curve("val_loss") for j in jobs],
            figures={m.key: [v for j in jobs if (v := j.number_of(m.key)) is not None] for m in METRIC_COLUMNS},
            foreign_load=max(loads) if loads else None,
        ))
    return out


def read_sources(report_dir: Path) -> Optional[list[Path]]:
    """The sweeps a merged report in `report_dir` was built from (None: not a merged report)."""
    sources = _read_json(report_dir / SOURCES)
    sweeps = sources.get("sweeps") if sources else None
    return [Path(s) for s in sweeps] if isinstance(sweeps, list) else None


def write_report(sweep_dir: Path, sweeps: Optional[Sequence[Path]] = None) -> SweepReport:
    """Write report.md, report.csv and the plots into `sweep_dir`, from the jobs of `sweeps`
    (default: `sweep_dir` itself); return what was written (nothing when no sweep has a job
    of a reported task). A merged report records its sweeps in report_sweeps.json."""
    sweep_dir = Path(sweep_dir)
    sources = [Path(s) for s in sweeps] if sweeps else [sweep_dir]
    jobs, declared = collect_sweeps(sources)
    swept = swept_keys(jobs, declared)
    if not jobs:
        return SweepReport(sweep_dir, [], swept, [], sources)
    groups = configurations(jobs, swept)
    grouped = replicated(groups)
    plots = draw_plots(series(groups, swept, declared, grouped), grouped)
    files = []
    if sweeps:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(sweep_dir / SOURCES, json.dumps({"sweeps": [str(s.absolute()) for s in sources]}, indent=1)
                     + "\n")
        files.append(sweep_dir / SOURCES)
    for name, png in plots.items():
        write_atomic(sweep_dir / name, png)
        files.append(sweep_dir / name)
    write_atomic(sweep_dir / REPORT_CSV, render_csv(jobs, swept, groups if grouped else None))
    files.append(sweep_dir / REPORT_CSV)
    if grouped:
        write_atomic(sweep_dir / CONFIGURATIONS_CSV, render_configurations_csv(groups, swept))
        files.append(sweep_dir / CONFIGURATIONS_CSV)
    elif (sweep_dir / CONFIGURATIONS_CSV).exists():  # a rebuilt report that lost its replicates
        (sweep_dir / CONFIGURATIONS_CSV).unlink()
    write_atomic(sweep_dir / REPORT_MD, render_markdown(sweep_dir, jobs, swept, list(plots), sources,
                                                        groups if grouped else None))
    files.append(sweep_dir / REPORT_MD)
    return SweepReport(sweep_dir, jobs, swept, files, sources)


__all__ = ["COMPLETED", "FAILED", "INCOMPLETE", "NOT_STARTED", "Job", "SweepReport", "collect", "collect_sweeps",
           "is_sweep", "job_dirs", "read_sources", "write_report"]

"""`task.replicates=N`: every job of a sweep run with N seeds, as a sweep over `seed`.

The command line turns `task.replicates=3` into `seed=0,1,2` (after `seed=5`:
`seed=5,6,7`) before Hydra composes anything, so each seed is a job of the sweep,
its overrides say which seed it ran, and the report groups the seeds of each
configuration. It is refused, naming the key, where it makes no sense: outside a
sweep (`-m`), for a task other than training, beside a sweep over `seed` itself,
and with a sweeper that samples its trials (Optuna) instead of running a grid.
"""

from __future__ import annotations

from typing import Sequence

from hydra._internal.utils import get_args_parser

from ..errors import ConfigError

KEY = "task.replicates"
SEED = "seed"
#: The most seeds one command asks for (a sweep of more jobs than this is a typo).
MAX_REPLICATES = 1000
EXAMPLE = "llmarch -m attention=mha,gqa task.replicates=3"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def _is_sweep(value: str) -> bool:
    return "," in value or value.strip().startswith(("range(", "choice(", "interval(", "glob("))


def expand_replicates(argv: Sequence[str]) -> list[str]:
    """`argv` with `task.replicates=N` replaced by `seed=S,...,S+N-1`; unchanged without it."""
    argv = list(argv)
    found = [a for a in argv if _key(a) == KEY]
    if not found:
        return argv
    if len(found) > 1:
        raise ConfigError(KEY, [_value(a) for a in found], "is set more than once", "one task.replicates=N")
    text = _value(found[0])
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_REPLICATES or _is_sweep(text):
        raise ConfigError(KEY, text, "is the number of seeds each configuration runs with", f"1..{MAX_REPLICATES}")
    args, _ = get_args_parser().parse_known_args(argv)
    overrides = list(args.overrides or [])
    if not (args.multirun or any(_key(o) == "hydra.mode" and _value(o) == "MULTIRUN" for o in overrides)):
        raise ConfigError(KEY, n, "runs one job per seed, which takes a sweep: add -m", EXAMPLE)
    tasks = {t for o in overrides if _key(o) == "task" for t in _value(o).split(",")}
    if tasks - {"train"}:
        raise ConfigError(KEY, n, f"replicates training runs, and task={','.join(sorted(tasks))} has no seed "
                          "to vary", "task=train (the default)")
    sweeper = [_value(o) for o in overrides if _key(o) == "hydra/sweeper"]
    if sweeper and sweeper[-1] != "basic":
        raise ConfigError(KEY, n, f"needs a sweep that runs every job; hydra/sweeper={sweeper[-1]} samples its "
                          "trials", "hydra/sweeper=basic (the default)")
    seeds = [o for o in overrides if _key(o) == SEED]
    base = 0
    if seeds:
        if _is_sweep(_value(seeds[-1])):
            raise ConfigError(KEY, n, f"sets the seeds, and {seeds[-1]} sweeps them too", "one of the two")
        try:
            base = int(_value(seeds[-1]))
        except ValueError:
            raise ConfigError(SEED, _value(seeds[-1]), "is the first seed of the replicates",
                              "a whole number") from None
    expanded = f"{SEED}={','.join(str(base + i) for i in range(n))}"
    out = []
    for arg in argv:
        if _key(arg) == KEY:
            out.append(expanded)
        elif arg not in seeds:
            out.append(arg)
    return out


__all__ = ["KEY", "expand_replicates"]

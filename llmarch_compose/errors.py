"""The project's error types and the "did you mean" helper they share."""

from __future__ import annotations

import difflib
from typing import Iterable, Sequence


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The names nearest to `name`, best first (may be empty): names it abbreviates
    or extends ("normalization" -> "norm"), then spelling neighbours."""
    choices = sorted(set(choices))

    def similarity(c: str) -> float:
        return difflib.SequenceMatcher(None, name, c).ratio()

    prefixed = sorted((c for c in choices if c.startswith(name) or name.startswith(c)), key=similarity, reverse=True)
    similar = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    return list(dict.fromkeys(prefixed + similar))[:n]


#: At most this many values are listed as valid in an error message.
MAX_LISTED = 24
#: Trial division for an error message stops here (a tenth of a second), whatever `n` is.
_DIVISOR_SEARCH = 100_000


def valid_divisors(n: int, near: int) -> list[int] | str:
    """What an error lists for "must divide n": every divisor when there are few,
    else the few nearest to the value asked (`near`), found in bounded time."""
    found: set[int] = set()
    d = 1
    while d <= _DIVISOR_SEARCH and d * d <= n:
        if n % d == 0:
            found.update((d, n // d))
        d += 1
    complete = d * d > n
    if complete and len(found) <= MAX_LISTED:
        return sorted(found)
    nearest = sorted(sorted(found, key=lambda v: (abs(v - near), v))[:6])
    return f"a divisor of {n}, e.g. " + ", ".join(str(v) for v in nearest)


def valid_range(low: int, high: int) -> list[int] | str:
    """The integers low..high, listed when there are few."""
    if high - low + 1 <= MAX_LISTED:
        return list(range(low, high + 1))
    return f"an integer in {low}..{high}"


#: Keys that were renamed: an old spelling set where the new key exists points at it
#: (`task.output_dir`, `task.out`, `task.out_dir` and report's `task.path` are `task.output`).
FORMER_KEYS = {"output_dir": "output", "out": "output", "out_dir": "output", "path": "output"}


class LlmarchError(Exception):
    """Base class for errors a user can fix; the CLI prints them without a traceback."""


class ConfigError(LlmarchError, ValueError):
    """A config value that cannot be built, reported with its key path and what would be valid."""

    def __init__(self, key: str, value: object, problem: str, valid: Sequence[object] | str | None = None):
        self.key = key
        self.value = value
        self.problem = problem
        self.valid = valid
        message = f"{key}={value!r}: {problem}"
        if not problem.endswith((".", "?", "!")):
            message += "."
        if valid is not None:
            if isinstance(valid, str):
                message += f" Valid: {valid}."
            else:
                message += " Valid: " + ", ".join(str(v) for v in valid) + "."
        super().__init__(message)


class UnknownChoiceError(ConfigError, LookupError):
    """A group choice or plugin name that is not registered."""

    def __init__(self, group: str, name: str, available: Iterable[str], what: str = "choice"):
        available = sorted(set(available))
        suggestions = closest(name, available)
        problem = f"no {group} {what} named {name!r}"
        if suggestions:
            problem += "; did you mean " + " or ".join(repr(s) for s in suggestions) + "?"
        super().__init__(group, name, problem, available)
        self.group = group
        self.suggestions = suggestions


class UnknownKeyError(ConfigError, KeyError):
    """A config key that does not exist where it was set."""

    def __init__(self, path: str, value: object, available: Iterable[str]):
        parent, _, leaf = path.rpartition(".")
        available = set(available)
        renamed = [FORMER_KEYS[leaf]] if FORMER_KEYS.get(leaf) in available else []
        nearest = list(dict.fromkeys(renamed + closest(leaf, available)))[:3]
        suggestions = [f"{parent}.{s}" if parent else s for s in nearest]
        problem = f"{parent or 'the config'} has no key {leaf!r}"
        if suggestions:
            problem += "; did you mean " + " or ".join(suggestions) + "?"
        # With a suggestion the full list of keys is noise; without one it is the help.
        super().__init__(path, value, problem, None if suggestions else sorted(set(available)))
        self.suggestions = suggestions

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class PluginConflictError(LlmarchError):
    """Two packages registered the same name in the same group."""

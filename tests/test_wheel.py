"""The built wheel carries every module, plugin and YAML: installed into a fresh venv
(no editable install to hide a missing file), `llmarch task=summary` and
`llmarch task=plugins` run from it and see every preset and plugin of the source tree."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; its dependencies come from this interpreter's
    site-packages through a .pth line (torch is not installed twice), and this project's own
    editable install there is not processed, so only the wheel provides llmarch_compose."""
    work = tmp_path_factory.mktemp("wheel")
    # From a copy without build outputs: setuptools reuses a build/ folder, which would hide
    # a file the package list or package data misses.
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".inductor-cache", ".pytest_cache",
        ".hypothesis", "outputs", "multirun"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"),
          str(source)], cwd=work)
    (wheel,) = (work / "dist").glob("llmarch_compose-*.whl")
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_deps.pth").write_text("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "--no-deps",
          "--no-index", str(wheel)], cwd=work)
    return env_dir


def _llmarch(env_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return _run([str(env_dir / "bin" / "llmarch"), *args], cwd=cwd, env=env)


def test_wheel_holds_every_source_file(installed, tmp_path):
    code = ("import llmarch_compose, pathlib; print(pathlib.Path(llmarch_compose.__file__).parent)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = Path(_run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path, env=env).stdout.strip())
    assert ROOT not in where.parents, "the wheel's package must be the one imported"
    expected = {
        **{Path("conf") / p.relative_to(ROOT / "conf"): p for p in (ROOT / "conf").rglob("*.yaml")},
        **{Path("registry") / p.relative_to(ROOT / "registry"): p for p in (ROOT / "registry").rglob("*.py")},
        **{p.relative_to(ROOT / "llmarch_compose"): p for p in (ROOT / "llmarch_compose").rglob("*.py")},
        **{Path("..") / p.relative_to(ROOT): p for p in (ROOT / "hydra_plugins").rglob("*.py")},
    }
    missing = sorted(str(rel) for rel in expected if not (where / rel).is_file())
    assert not missing, missing


def test_summary_and_plugins_run_from_the_wheel(installed, tmp_path):
    card = json.loads(_llmarch(installed, "model=llama3_8b", "task=summary", "task.format=json",
                               cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert card["params_total"] == 8_030_261_248
    listing = json.loads(_llmarch(installed, "task=plugins", "task.format=json", cwd=tmp_path).stdout)
    from llmarch_compose.plugin import registry  # the source tree's, through the editable install

    for group in registry.GROUPS:
        assert sorted(p["name"] for p in listing["groups"][group]) == registry.names(group), group
    presets = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")}
    table = _llmarch(installed, "task=table", "task.format=json", cwd=tmp_path).stdout
    assert all(p in table for p in presets - {"tiny", "hf"})


def test_hydra_finds_the_sweep_launcher_in_the_wheel(installed, tmp_path):
    """Installed from the wheel, Hydra's own plugin walk finds hydra/launcher=processes (an editable
    install needs the command line's registration; a wheel does not)."""
    code = ("from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher; "
            "print(sorted(f'{c.__module__}.{c.__name__}' for c in Plugins.instance().discover(Launcher)))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = _run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path, env=env).stdout
    assert "hydra_plugins.llmarch_compose_launcher.ProcessLauncher" in found, found

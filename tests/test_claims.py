"""benchmarks/claims.py at its --quick sizes: the report has a row and a verdict for every
claim of the survey and its plots exist. Neither the timings nor the verdicts are
asserted: they are measured, and depend on the machine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERDICT = re.compile(r"\*\*(holds|holds with a correction \(.+\)|does not hold here)\*\* \|$")


@pytest.mark.slow
def test_quick_run_reports_every_claim(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "claims.py"), "--quick", "--threads", "1",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "claims.json").read_text())
    assert [c["key"] for c in data["claims"]] == list("abcdef")

    rows = [line for line in report.splitlines() if line.startswith("| (")]
    for claim in data["claims"]:
        mine = [row for row in rows if row.startswith(f"| ({claim['key']}")]
        assert mine, f"no verdict row for claim ({claim['key']})"
        assert all(VERDICT.search(row) for row in mine), mine
        assert len(mine) == len(claim["verdicts"])
        assert f"## ({claim['key']}) " in report and f"`{claim['command']}`" in report
        assert claim["plots"], f"claim ({claim['key']}) has no plot"
        for name in claim["plots"]:
            png = tmp_path / name
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
            assert f"]({name})" in report
    keys = {v["key"] for c in data["claims"] for v in c["verdicts"]}
    assert {"a-mqa", "a-gqa", "b", "c", "d", "e-counts", "e-compute", "f-rope", "f-alibi", "f-learned"} <= keys
    # The numbers the counting claims rest on are exact, whatever the machine.
    counts = next(c for c in data["claims"] if c["key"] == "e")["data"]["counts"]
    assert (counts["params_total"], counts["params_active"]) == (46_702_792_704, 12_879_925_248)
    kv = next(c for c in data["claims"] if c["key"] == "a")["data"]["ratios"]
    assert set(kv["MQA"]) == {"1/32"} and set(kv["GQA, 4 KV groups"]) == {"1/8"}

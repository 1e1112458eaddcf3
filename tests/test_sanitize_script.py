"""scripts/sanitize.sh's control flow with a stand-in compute-sanitizer and python (CPU; the real
run is on the GPU machine): one verdict line per tool and family, errors and failures named, the
exit status, the logs packed (issue 18 item 11)."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_SANITIZER = """#!/usr/bin/env bash
[ "${1:-}" = --help ] && { echo "  --port arg"; exit 0; }
[ "${1:-}" = --version ] && { echo "stand-in 1.0"; exit 0; }
log=""; tool=""
while [[ "$1" == --* ]]; do [ "$1" = --log-file ] && log=$2; [ "$1" = --tool ] && tool=$2; shift 2; done
"$@"; rc=$?
errors=0; [[ "$tool" == racecheck && "$*" == *"--family lplb"* ]] && errors=3
echo "========= ERROR SUMMARY: $errors errors" > "$log"
[ $errors -gt 0 ] && exit 86; exit $rc
"""

FAKE_PYTHON = """#!/usr/bin/env bash
echo "ran $*"
[[ "$*" == *"--family low_latency --rank 1"* ]] && exit 3
exit 0
"""


@pytest.mark.skipif(sys.platform != "linux", reason="bash script for the Linux GPU machine")
def test_verdicts_name_each_tool_and_family(tmp_path):
    for name, text in (("compute-sanitizer", FAKE_SANITIZER), ("python", FAKE_PYTHON)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, COMPUTE_SANITIZER=str(tmp_path / "compute-sanitizer"), PYTHON=str(tmp_path / "python"))
    run = subprocess.run(["bash", str(REPO / "scripts" / "sanitize.sh"), str(out), "memcheck,racecheck",
                          "fp8,lplb,intranode,low_latency"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    lines = {tuple(line.split()[:2]): line for line in run.stdout.splitlines() if line.startswith(
        ("plain ", "memcheck ", "racecheck "))}
    assert lines[("plain", "fp8")].split()[2] == "PASSED"
    for tool in ("memcheck", "racecheck"):
        assert lines[(tool, "fp8")].split()[2] == "CLEAN"
        assert "CLEAN (2 processes, 0 errors" in lines[(tool, "intranode")]
        assert "FAILED (exit status 3" in lines[(tool, "low_latency")]
    assert lines[("memcheck", "lplb")].split()[2] == "CLEAN"
    assert "ERRORS (3 reported" in lines[("racecheck", "lplb")]
    assert len(lines) == 3 * 4
    assert (out / "summary.txt").read_text().count("\n") == len(run.stdout.splitlines()) - 1
    with tarfile.open(out / "sanitize-logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"racecheck-lplb-rank0.log", "memcheck-intranode-rank1.log", "plain-low_latency-rank1.out"} <= names


def test_workload_script_lists_every_family():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "sanitize_workload.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0
    assert "{fp8,layout,lplb,intranode,low_latency}" in run.stdout

"""scripts/record_bench_h200.sh's control flow with a stand-in python (CPU; the real run is on the H200):
the wheels installed without their dependencies, every step run and its exit status printed after a
failure, the commit handed to the bench, the results packed."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "${EPKERN_COMMIT:-none}|$*" >> "$CALLS"
out=""; prev=""
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
case "$*" in
    *"epkern.cli bench"*) mkdir -p "$out" && echo '{}' > "$out/results.json" ;;
    *"epkern.cli tune"*) echo '{}' > "$out" ;;
esac
[[ "$*" == *"--ranks 2"* ]] && exit 1
exit 0
"""


@pytest.mark.skipif(sys.platform != "linux", reason="bash script for the Linux GPU machine")
def test_every_step_runs_and_is_reported(tmp_path):
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("nccl4py-0.6.0-cp312-cp312-linux_x86_64.whl", "nccl_extensions-0.1.0-cp312-cp312-linux_x86_64.whl"):
        (wheels / name).write_text("")
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    env = dict(os.environ, PYTHON=str(python), OUT=str(out), CALLS=str(calls), EPKERN_COMMIT="abc123def456")
    run = subprocess.run(["bash", str(REPO / "scripts" / "record_bench_h200.sh"), str(wheels)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    summary = [line.split(":")[0] + ":" + line.split()[1] for line in (out / "summary.txt").read_text().splitlines()]
    assert summary == ["wheels:rc=0", "install:rc=0", "environment:rc=0", "precompile:rc=0", "h200:rc=0",
                       "h200_ranks2:rc=1", "h200_ranks1:rc=0", "tune:rc=0"]
    assert "SOME STEPS FAILED" in run.stdout and (out / "record.log").read_text() == run.stdout
    made = [line.split("|", 1) for line in calls.read_text().splitlines()]
    assert all(commit == "abc123def456" for commit, _ in made)
    argv = [a for _, a in made]
    assert argv[0] == f"-m pip install --no-deps --no-index {wheels}/nccl4py-0.6.0-cp312-cp312-linux_x86_64.whl " \
                      f"{wheels}/nccl_extensions-0.1.0-cp312-cp312-linux_x86_64.whl"
    bench = [a for a in argv if a.startswith("-m epkern.cli bench")]
    assert [a.split("--what ")[1].split()[0] for a in bench] == ["fp8,layout,lplb,moe", "dispatch,combine,low_latency",
                                                                 "dispatch,combine"]
    assert "--ranks 2 --tokens 128,512,4096" in bench[1] and "--ranks 1" in bench[2]
    assert any(a.startswith("-m epkern.cli tune --config") and a.endswith(f"--out {out}/bench/tuned_h200.json")
               for a in argv)
    # OUT was given (the device tool brings back few files): the results travel packed
    assert sorted(p.name for p in out.iterdir()) == ["bench.tar.gz", "record.log", "summary.txt"]
    with tarfile.open(out / "bench.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"bench/h200/results.json", "bench/h200_ranks1/results.json", "bench/tuned_h200.json"} <= names

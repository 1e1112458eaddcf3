"""scripts/record_internode.py --quick on CPU: every row of the internode paths passes its reference
check, names its ranks, backend and device, and carries host-clock timing labelled correctness only
(the 4 processes share this machine); the header names date, commit and device."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_records_every_internode_path(tmp_path):
    out = tmp_path / "internode.json"
    env = dict(os.environ, EPKERN_COMMIT="feedc0ffee12")
    env.pop("OUT", None)   # the results go to --out only
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "record_internode.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert doc["commit"] == "feedc0ffee12" and doc["date"] and doc["device"]["torch"] == torch.__version__
    assert "two-GPU issue" in doc["note"]

    cpu = [r for r in doc["rows"] if r["backend"] == "gloo"]
    assert [r["name"] for r in cpu] == ["two-hop normal dispatch+combine, 8 tokens/rank",
                                        "two-hop normal dispatch+combine, 24 tokens/rank",
                                        "across-node low-latency dispatch+combine, bf16",
                                        "across-node low-latency dispatch+combine, fp8"]
    for row in cpu:
        assert row["passed"] is True, row
        assert (row["ranks"], row["device"]) == (4, "cpu")
        assert (row["config"]["nodes"], row["config"]["ranks_per_node"]) == (2, 2)
        t = row["timing"]
        assert t["repeats"] == 2 and t["p10_us"] <= t["median_us"] <= t["p90_us"] and t["clock"] == "host"
        assert t["note"] == "correctness only: processes share one machine/GPU"
    gpu = [r for r in doc["rows"] if r["device"].startswith("cuda")]   # world size 1 and the blocks, with CUDA
    assert [r["backend"] for r in gpu] == (["nccl"] * 4 + ["none"] * 2 if torch.cuda.is_available() else [])
    assert all(r["passed"] is True and r["ranks"] == 1 for r in gpu), gpu

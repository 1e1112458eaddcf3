"""`epkern bench` / `epkern tune` on a GPU (skipped without one): the single-process families with
graph and eager timings, the MoE layer (DeepSeek-V3's shape: 21 GiB of expert weights), the
multi-rank families (ranks sharing the GPU when there is only one, and one rank per GPU, with
NCCL EP beside epkern where nccl.ep imports), and a tuned file that Buffer.get_dispatch_config
then returns. Tiny shapes otherwise: correctness of the tool, not performance."""
import json

import pytest

from epkern import Buffer, cli, tuning
from epkern.bench.ranks import SHARED_NOTE

SHAPE = ["--hidden", "2048", "--experts", "32", "--topk", "4", "--repeats", "5", "--warmup", "2"]


def _rows(out):
    doc = json.loads((out / "results.json").read_text())
    return doc, doc["rows"]


@pytest.mark.gpu
def test_bench_local_families_on_gpu(tmp_path):
    out = tmp_path / "bench"
    assert cli.main(["bench", "--what", "fp8,layout,lplb", "--tokens", "128,1024", *SHAPE, "--out", str(out)]) == 0
    doc, rows = _rows(out)
    assert doc["device"]["name"] == tuning.current_device_name() and doc["device"]["driver"]
    ours = [r for r in rows if r["impl"] == "epkern"]
    assert {r["mode"] for r in ours} == {"graph", "eager"}
    assert all(r["check"] == "ok" for r in ours), [r for r in ours if r["check"] != "ok"]
    assert all(0 < r["fraction_of_floor"] for r in ours if r["what"] == "fp8")
    assert list(out.glob("fp8_cast_h2048.png"))


@pytest.mark.gpu
def test_bench_ranks_on_gpu(tmp_path):
    import torch

    out = tmp_path / "bench"
    assert cli.main(["bench", "--what", "dispatch,combine,low_latency", "--tokens", "32,128", "--ranks", "2",
                     *SHAPE, "--out", str(out)]) == 0
    doc, rows = _rows(out)
    kinds = {(r["what"], r["op"], r["impl"]) for r in rows}
    assert {("dispatch", "dispatch", "epkern"), ("combine", "combine", "epkern"),
            ("low_latency", "dispatch", "epkern"), ("low_latency", "combine", "epkern")} <= kinds
    assert all(r["check"] == "ok" for r in rows)
    if torch.cuda.device_count() < 2:
        assert any(n.startswith(SHARED_NOTE) for n in doc["notes"])
        assert all(SHARED_NOTE in r["note"] for r in rows)


@pytest.mark.gpu
def test_tune_then_buffer_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    assert cli.main(["tune", "--tokens", "256", "--num-sms", "8,16", "--ranks", "2", *SHAPE[:6],
                     "--out", str(path)]) == 0
    tuned = tuning.load(path)
    chosen = tuned.lookup("dispatch", 2)["config"]["num_sms"]
    assert chosen in (8, 16)
    monkeypatch.setenv("EPKERN_TUNED_CONFIG", str(path))
    assert Buffer.get_dispatch_config(2).num_sms == chosen


@pytest.mark.gpu
def test_bench_moe_layer_on_gpu(tmp_path):
    out = tmp_path / "bench"
    assert cli.main(["bench", "--what", "moe", "--tokens", "128", "--repeats", "5", "--warmup", "2",
                     "--out", str(out)]) == 0
    doc, rows = _rows(out)
    assert not doc["skipped"], doc["skipped"]
    assert sorted((r["op"], r["mode"]) for r in rows) == [("decode", "eager"), ("decode", "graph"), ("prefill", "eager")]
    for r in rows:
        assert r["check"] == "ok" and r["impl"] == "epkern" and r["tokens"] == 128 and r["ranks"] == 1, r
        assert (r["hidden"], r["experts"], r["topk"], r["intermediate"]) == (7168, 256, 8, 2048)
        assert r["tflops"] > 0 and r["floor_us"] > 0 and r["fraction_of_floor"] > 0 and r["floor_bound"]
    assert list(out.glob("moe_decode_h7168_e256_k8_R1.png"))


def _one_rank_per_gpu(tmp_path, whats):
    import torch

    out = tmp_path / "bench"
    ranks = str(torch.cuda.device_count())
    assert cli.main(["bench", "--what", whats, "--tokens", "32,128", "--ranks", ranks, *SHAPE, "--out", str(out)]) == 0
    return _rows(out)


@pytest.mark.gpu
def test_bench_one_rank_per_gpu(tmp_path):
    doc, rows = _one_rank_per_gpu(tmp_path, "dispatch,combine,low_latency")
    kinds = {(r["what"], r["impl"]) for r in rows}
    assert {("dispatch", "epkern"), ("combine", "epkern"), ("dispatch", "epkern-torch"), ("combine", "epkern-torch"),
            ("low_latency", "epkern")} <= kinds
    assert all(r["check"] == "ok" for r in rows), [r for r in rows if r["check"] != "ok"]
    assert not any(n.startswith(SHARED_NOTE) for n in doc["notes"])


@pytest.mark.gpu
def test_bench_nccl_ep_side_by_side(tmp_path):
    pytest.importorskip("nccl.ep")
    doc, rows = _one_rank_per_gpu(tmp_path, "dispatch,combine,low_latency")
    theirs = [r for r in rows if r["impl"] == "nccl-ep"]
    why = [s for s in doc["skipped"] if s["impl"] == "nccl-ep"]
    assert {(r["what"], r["op"]) for r in theirs} == {("dispatch", "dispatch"), ("combine", "combine"),
                                                      ("low_latency", "dispatch"), ("low_latency", "combine")}, why
    assert all(r["check"] == "ok" and "libnccl_ep" in r["version"] for r in theirs), theirs

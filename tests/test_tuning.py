"""Tuned configs: round trip, Buffer.get_dispatch_config/get_combine_config under EPKERN_TUNED_CONFIG,
fallback for shapes the file lacks, refusal of another GPU's file, and `epkern precompile --tuned`."""
import json
import types

import pytest

from epkern import Buffer, cli, tuning
from epkern.deployment import Deployment, specs_for
from epkern.normal import kernels as ik

HERE = tuning.current_device_name()   # "cpu" on CI


def _entry(kernel, ranks, sms, hidden=2048, topk=4):
    base = (Buffer.get_dispatch_config if kernel == "dispatch" else Buffer.get_combine_config)(ranks)
    config = {f: getattr(base, f) for f in tuning.CONFIG_FIELDS}
    config["num_sms"] = sms
    return {"kernel": kernel, "num_ranks": ranks, "hidden": hidden, "num_topk": topk, "tokens": [4096],
            "config": config, "median_us": 100.0}


@pytest.fixture
def tuned_file(tmp_path, monkeypatch):
    monkeypatch.delenv("EPKERN_TUNED_CONFIG", raising=False)
    path = tuning.save(tmp_path / "tuned.json", [_entry("dispatch", 2, 40), _entry("combine", 2, 36),
                                                 _entry("dispatch", 8, 12, hidden=7168, topk=8)], device=HERE)
    return path


def test_round_trip(tuned_file):
    doc = json.loads(tuned_file.read_text())
    assert doc["device"] == HERE and doc["schema"] == tuning.SCHEMA and doc["epkern_version"]
    tuned = tuning.load(tuned_file)
    assert tuned.lookup("dispatch", 2)["config"]["num_sms"] == 40
    assert tuned.lookup("dispatch", 2, hidden=2048)["config"]["num_sms"] == 40
    assert tuned.lookup("dispatch", 2, hidden=7168) is None
    assert tuned.lookup("combine", 8) is None
    assert tuned.config("combine", 2).num_sms == 36
    with pytest.raises(ValueError, match="kernel='gemm'"):
        tuned.lookup("gemm", 2)


def test_buffer_configs_read_the_tuned_file(tuned_file, monkeypatch):
    default_dispatch, default_combine = Buffer.get_dispatch_config(2), Buffer.get_combine_config(2)
    monkeypatch.setenv("EPKERN_TUNED_CONFIG", str(tuned_file))
    d, c = Buffer.get_dispatch_config(2), Buffer.get_combine_config(2)
    assert (d.num_sms, c.num_sms) == (40, 36)
    assert d.num_max_nvl_chunked_send_tokens == default_dispatch.num_max_nvl_chunked_send_tokens
    assert c.num_max_nvl_chunked_send_tokens == default_combine.num_max_nvl_chunked_send_tokens
    assert Buffer.get_dispatch_config(8).num_sms == 12
    # shapes the file lacks: the built-in defaults
    assert Buffer.get_combine_config(8).num_sms == Buffer.num_sms
    assert Buffer.get_dispatch_config(4).num_sms == Buffer.num_sms
    # a new file under the same name is read again
    tuning.save(tuned_file, [_entry("dispatch", 2, 44)], device=HERE)
    assert Buffer.get_dispatch_config(2).num_sms == 44
    assert Buffer.get_combine_config(2).num_sms == Buffer.num_sms


def test_another_gpu_is_refused(tmp_path, monkeypatch):
    path = tuning.save(tmp_path / "h200.json", [_entry("dispatch", 2, 40)], device="NVIDIA H200 (not this one)")
    with pytest.raises(tuning.TunedConfigError, match=r"tuned on 'NVIDIA H200 \(not this one\)', but this "
                                                      r"machine runs on .*run `epkern tune` here, or unset "
                                                      r"EPKERN_TUNED_CONFIG"):
        tuning.load(path)
    monkeypatch.setenv("EPKERN_TUNED_CONFIG", str(path))
    with pytest.raises(tuning.TunedConfigError, match="tuned on"):
        Buffer.get_dispatch_config(2)


@pytest.mark.parametrize("doc, pattern", [
    ("not json", "not JSON"),
    ({"schema": 2, "device": HERE, "entries": []}, "schema 1"),
    ({"schema": 1, "device": HERE, "entries": [{"kernel": "dispatch"}]}, r"entries\[0\] lacks 'num_ranks'"),
    ({"schema": 1, "device": HERE, "entries": [dict(_entry("dispatch", 2, 40), kernel="gemm")]}, "kernel='gemm'"),
    ({"schema": 1, "device": HERE, "entries": [dict(_entry("dispatch", 2, 40), config={"num_sms": 500})]},
     "num_sms=500: at most 132"),
    ({"schema": 1, "device": HERE, "entries": [dict(_entry("dispatch", 2, 40), config={"sms": 5})]},
     "expected num_sms and only the fields"),
])
def test_malformed_files_name_the_problem(tmp_path, doc, pattern):
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(tuning.TunedConfigError, match=pattern):
        tuning.load(path)
    with pytest.raises(tuning.TunedConfigError, match="no such file"):
        tuning.load(tmp_path / "missing.json")


def test_other_version_warns(tuned_file):
    doc = json.loads(tuned_file.read_text())
    doc["epkern_version"] = "0.0.1"
    tuned_file.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="tuned with epkern 0.0.1"):
        tuning.load(tuned_file)


def test_precompile_builds_the_tuned_num_sms(tuned_file, monkeypatch, capsys):
    deployment = Deployment(hidden=2048, num_experts=32, num_topk=4, ep_sizes=(2,))
    base = set(specs_for([deployment]))
    extra = set(tuning.precompile_specs([deployment], tuned_file)) - base
    assert extra == {ik.dispatch_spec(2, 2048, k, fp8, 40) for k in (4, 0) for fp8 in (False, True)} | \
                    {ik.combine_spec(2, 2048, k, 36) for k in (4, 0)}
    assert set(tuning.precompile_specs([deployment])) == base   # no file: the deployment's specs only
    # the command: a build machine without a GPU takes a file tuned on any GPU
    other = tuning.save(tuned_file.parent / "h200.json", [_entry("dispatch", 2, 40)], device="NVIDIA H200")
    config = tuned_file.parent / "deploy.json"
    config.write_text(json.dumps({"hidden": 2048, "num_experts": 32, "num_topk": 4, "ep_sizes": [2]}))
    built = []
    from epkern.codegen import jit

    monkeypatch.setattr(jit, "build", lambda spec, arch: built.append(spec) or types.SimpleNamespace(fresh=True))
    monkeypatch.setenv("EPKERN_TUNED_CONFIG", str(other) if HERE == "cpu" else str(tuned_file))
    assert cli.main(["precompile", "--config", str(config), "--arch", "sm_90a", "--jobs", "1"]) == 0
    assert ik.dispatch_spec(2, 2048, 4, False, 40) in built and len(built) == len(set(built))
    assert ik.dispatch_spec(2, 2048, 4, False, 40).name in capsys.readouterr().out
    built.clear()
    assert cli.main(["precompile", "--config", str(config), "--arch", "sm_90a", "--tuned", str(tuned_file)]) == 0
    assert ik.combine_spec(2, 2048, 4, 36) in built

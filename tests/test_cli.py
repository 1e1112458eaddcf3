"""The `epkern` command: info, precompile (then all cache hits), cache list|clear, config errors."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from epkern import cli
from epkern.codegen import MissingKernelError, compiler
from epkern.deployment import Deployment, load_deployments, specs_for

SMALL = {"hidden": 2048, "num_experts": 32, "num_topk": 4, "ep_sizes": [2, 4]}


def _write(tmp_path, data, name="deployment.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _table(stdout: str) -> dict:
    """kernel name -> status, from the precompile table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in ("compiled", "cached"):
            rows[parts[0]] = parts[2]
    return rows


def test_info_console_script(isolated_cache):
    exe = shutil.which("epkern")
    command = [exe, "info"] if exe else [sys.executable, "-m", "epkern.cli", "info"]
    out = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), check=True).stdout
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines() if line.strip())
    assert fields["NVRTC"] == compiler.nvrtc_version()
    assert fields["cache dir"] == str(isolated_cache)
    assert fields["target arch"] in ("sm_90a", compiler.target_arch())
    assert fields["JIT"] == "on"
    assert "GPU" in fields and "cache size" in fields and "torch" in fields


def test_precompile_config_then_all_cache_hits(isolated_cache, tmp_path, capsys):
    config = _write(tmp_path, SMALL)
    expected = {s.name for s in specs_for(load_deployments(config))}
    assert cli.main(["precompile", "--config", str(config), "--arch", "sm_90a", "--jobs", "2"]) == 0
    first = capsys.readouterr().out
    assert _table(first) == {name: "compiled" for name in expected}
    assert f"{len(expected)} kernels for sm_90a: {len(expected)} compiled, 0 cache hits" in first

    assert cli.main(["precompile", "--config", str(config), "--arch", "sm_90a"]) == 0
    second = capsys.readouterr().out
    assert _table(second) == {name: "cached" for name in expected}
    assert f"{len(expected)} kernels for sm_90a: 0 compiled, {len(expected)} cache hits" in second

    # cache list names every kernel; clear empties it
    assert cli.main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    for name in expected:
        assert name in listing
    assert f"{len(expected)} kernels" in listing
    assert cli.main(["cache", "clear"]) == 0
    assert f"removed {len(expected)} cached kernels" in capsys.readouterr().out
    assert cli.main(["cache", "list"]) == 0
    assert "no cached kernels" in capsys.readouterr().out


def test_precompile_ignores_offline_mode(isolated_cache, tmp_path, monkeypatch, capsys):
    """EPKERN_JIT=0 made precompile fail with a hint naming precompile itself (issue 18 item 8)."""
    from epkern.codegen import cache, jit, knobs

    seen = []

    def fake_build(spec, arch):
        seen.append(knobs.jit_enabled())
        return cache.CacheEntry(path=tmp_path / "x", cubin=b"", meta={}, fresh=True)

    monkeypatch.setenv("EPKERN_JIT", "0")
    monkeypatch.setattr(jit, "build", fake_build)
    assert cli.main(["precompile", "--config", str(_write(tmp_path, SMALL)), "--arch", "sm_90a"]) == 0
    assert seen and all(seen)
    assert "EPKERN_JIT=0 is ignored by precompile" in capsys.readouterr().err


def test_offline_hint_names_a_command_that_works(isolated_cache, monkeypatch):
    from epkern.deployment import Deployment
    from epkern.layout import LayoutSpec

    monkeypatch.setenv("EPKERN_JIT", "0")
    in_default = LayoutSpec(num_experts=256, num_ranks=8, num_topk=8)
    with pytest.raises(MissingKernelError) as info:
        jit_build(in_default)
    assert info.value.hint == f"EPKERN_JIT=1 EPKERN_CACHE_DIR={isolated_cache} epkern precompile --arch sm_90a"
    with pytest.raises(MissingKernelError) as info:
        jit_build(LayoutSpec(num_experts=24, num_ranks=2, num_topk=3))
    assert info.value.hint.startswith(f"EPKERN_JIT=1 EPKERN_CACHE_DIR={isolated_cache} epkern precompile "
                                      "--arch sm_90a --config deploy.json")
    assert Deployment() == load_deployments(None)[0]


def jit_build(spec):
    from epkern.codegen import jit

    return jit.build(spec, "sm_90a")


def test_config_list_is_deduplicated(tmp_path):
    config = _write(tmp_path, [SMALL, dict(SMALL, hidden=4096, ep_sizes=[4, 8])])
    deployments = load_deployments(config)
    assert [d.ep_sizes for d in deployments] == [(2, 4), (4, 8)]
    specs = specs_for(deployments)
    assert len(specs) == len(set(specs))
    layout_ranks = sorted(s.num_ranks for s in specs if s.family == "layout")
    assert layout_ranks == [2, 4, 8]  # EP 4 appears in both deployments, built once


def test_default_deployment_is_deepseek_v3():
    (default,) = load_deployments(None)
    assert default == Deployment(hidden=7168, num_experts=256, num_topk=8, ep_sizes=(2, 4, 8))


@pytest.mark.parametrize("data, pattern", [
    (dict(SMALL, experts=8), r"unknown deployment fields \['experts'\]"),
    (dict(SMALL, ep_sizes=[3]), r"ep_sizes: 3 must be a positive int dividing num_experts=32"),
    (dict(SMALL, num_topk=0), r"num_topk=0: expected a positive int"),
])
def test_bad_config_names_the_field(tmp_path, data, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_deployments(_write(tmp_path, data))


def test_bad_arch_is_rejected(isolated_cache, capsys):
    assert cli.main(["precompile", "--arch", "hopper"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epkern precompile: error: --arch: arch='hopper'" in err and "sm_90a" in err


@pytest.mark.parametrize("text, pattern", [
    ('{"hidden": 2048,\n "ep_sizes": [2,}', r": line 2 column 17: invalid JSON \(Expecting value\)"),
    ('{"hidden": 2048, "ep_sizes": 4}', r": ep_sizes=4: expected a list of positive ints"),
    ("[1, 2, 3]", r": item 0: expected a deployment object such as \{.*, got 1"),
    ("7168", r": expected a deployment object such as .* or a list of them, got 7168"),
    ("[]", r": the list holds no deployment"),
    ('[{"hidden": 2048}, {"hidden": "big"}]', r": item 1: deployment hidden='big': expected a positive int"),
])
def test_config_errors_are_one_line_and_exit_2(tmp_path, capsys, text, pattern):
    path = tmp_path / "deploy.json"
    path.write_text(text)
    assert cli.main(["precompile", "--config", str(path), "--arch", "sm_90a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(rf"^epkern precompile: error: {re.escape(str(path))}{pattern}", err), err


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert cli.main(["precompile", "--config", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: cannot read the deployment config (No such file or directory)" in capsys.readouterr().err


def test_precompile_lists_skipped_families_and_strict_fails(tmp_path, capsys, monkeypatch):
    config = _write(tmp_path, dict(SMALL, hidden=1000, ep_sizes=[16]))
    assert cli.main(["precompile", "--config", str(config), "--arch", "sm_90a", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "skipped fp8_cast: hidden=1000 experts=32 top-4: hidden 1000 is not a multiple of 128: no FP8 cast" in err
    assert "skipped low_latency: hidden=1000 experts=32 top-4: hidden 1000 is not a multiple of 128" in err
    assert "skipped intranode: hidden=1000 experts=32 top-4: EP 16: more than 8 ranks" in err
    assert "skipped lplb_ipm" not in err  # EP 16 has its hypercube
    assert "--strict makes that an error" in err
    # without --strict the rest is built and the summary counts the skips
    from epkern.codegen import cache, jit

    monkeypatch.setattr(jit, "build", lambda spec, arch: cache.CacheEntry(path=tmp_path, cubin=b"", meta={}, fresh=False))
    assert cli.main(["precompile", "--config", str(config), "--arch", "sm_90a"]) == 0
    out, err = capsys.readouterr()
    assert "3 skipped (see above)" in out and err.count("skipped ") == 3


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert re.fullmatch(r"epkern \S+\n", capsys.readouterr().out)


def test_negative_jobs_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["precompile", "--jobs", "-3"])
    assert info.value.code == 2 and "--jobs" in capsys.readouterr().err


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["cache", "purge"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err

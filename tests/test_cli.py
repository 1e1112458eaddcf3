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


def test_precompile_offline_reports_missing_kernel(isolated_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("EPKERN_JIT", "0")
    with pytest.raises(MissingKernelError, match="epkern precompile"):
        cli.main(["precompile", "--config", str(_write(tmp_path, SMALL)), "--arch", "sm_90a"])


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


def test_bad_arch_is_rejected(isolated_cache):
    with pytest.raises(ValueError, match="sm_90a"):
        cli.main(["precompile", "--arch", "hopper"])


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["cache", "purge"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err

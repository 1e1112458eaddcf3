"""epkern as `deep_ep`: the alias, the runner (`python -m epkern.as_deep_ep`), and the DeepEP
names that only make sense on a live Buffer (one-process gloo group, CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = textwrap.dedent("""
    import sys
    import deep_ep
    from deep_ep import Buffer, Config, EventOverlap, topk_idx_t
    from deep_ep.utils import EventHandle, EventOverlap as UtilsEventOverlap, check_nvlink_connections
    import epkern
    assert deep_ep.Buffer is epkern.Buffer and Buffer is epkern.Buffer and Config is epkern.Config
    assert EventOverlap is UtilsEventOverlap is epkern.EventOverlap and topk_idx_t is __import__("torch").int64
    print("probe", __name__, repr(sys.argv))
    sys.exit(int(sys.argv[1]))
""")


def _run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "epkern.as_deep_ep", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_runner_script_sees_epkern_and_passes_argv_and_exit_code():
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "probe.py")
        with open(script, "w") as f:
            f.write(PROBE)
        done = _run(script, "7", "--flag", "x y")
        assert done.returncode == 7, done.stderr
        assert f"probe __main__ [{script!r}, '7', '--flag', 'x y']" in done.stdout
        assert _run(script, "0").returncode == 0


SPAWN_PROBE = textwrap.dedent("""
    import multiprocessing as mp, subprocess, sys

    def child(q):
        import deep_ep, epkern
        q.put(deep_ep.Buffer is epkern.Buffer)

    if __name__ == "__main__":
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        spawned = q.get(timeout=100)
        p.join()
        sub = subprocess.run([sys.executable, "-c", "import deep_ep, deep_ep.utils, epkern; "
                              "print(deep_ep.Buffer is epkern.Buffer and deep_ep.utils.EventHandle is epkern.EventHandle)"],
                             capture_output=True, text=True)
        print("spawned", spawned, "subprocess", sub.stdout.strip(), sub.stderr[-500:])
        sys.exit(0 if spawned and sub.stdout.strip() == "True" else 5)
""")


def test_runner_reaches_the_processes_the_program_starts():
    """vLLM's workers and torchrun's ranks are new processes: they import epkern as deep_ep too."""
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "spawner.py")
        with open(script, "w") as f:
            f.write(SPAWN_PROBE)
        done = _run(script)
        assert done.returncode == 0, done.stdout + done.stderr
    path = _run("--path").stdout.strip()
    assert os.path.isfile(os.path.join(path, "deep_ep", "__init__.py"))


def test_runner_module_mode():
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "pkg"))
        open(os.path.join(tmp, "pkg", "__init__.py"), "w").close()
        with open(os.path.join(tmp, "pkg", "probe.py"), "w") as f:
            f.write(PROBE)
        done = _run("-m", "pkg.probe", "3", "a", cwd=tmp)
        assert done.returncode == 3, done.stderr
        path = os.path.join(tmp, "pkg", "probe.py")
        assert f"probe __main__ [{path!r}, '3', 'a']" in done.stdout


def test_runner_uncaught_exception_and_usage():
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "boom.py")
        with open(script, "w") as f:
            f.write("raise KeyError('boom')\n")
        done = _run(script)
        assert done.returncode == 1 and "KeyError: 'boom'" in done.stderr
    assert _run().returncode == 2
    assert _run("/nonexistent/script.py").returncode == 2


def test_install_refuses_a_different_deep_ep():
    code = textwrap.dedent("""
        import sys, types
        fake = types.ModuleType("deep_ep"); fake.__file__ = "/opt/DeepEP/deep_ep/__init__.py"
        sys.modules["deep_ep"] = fake
        import epkern
        try:
            epkern.install_as_deep_ep()
        except RuntimeError as e:
            print("refused:", e)
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "refused:" in done.stdout and "'deep_ep'" in done.stdout and "/opt/DeepEP/deep_ep/__init__.py" in done.stdout


def test_install_twice_is_harmless():
    code = "import epkern; a = epkern.install_as_deep_ep(); b = epkern.install_as_deep_ep(); import deep_ep; " \
           "assert a is b is deep_ep; print('ok')"
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


# -- a live Buffer (one process, gloo, portable backend) -------------------------------------------
@pytest.fixture
def buffer():
    import epkern

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            b = epkern.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 16, backend="torch", explicitly_destroy=True)
            yield b
            b.destroy()
        finally:
            dist.destroy_process_group()


def test_buffer_instance_attributes(buffer):
    assert (buffer.rank, buffer.group_size, buffer.num_nvl_bytes, buffer.num_rdma_bytes) == (0, 1, 1 << 16, 0)
    assert buffer.group is dist.group.WORLD and buffer.low_latency_mode is False and buffer.explicitly_destroy
    assert getattr(buffer, "runtime", None) is None
    with pytest.raises(NotImplementedError, match="runtime"):
        buffer.runtime


def test_internode_names_on_one_node_point_to_dispatch(buffer):
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="one node; call Buffer.dispatch"):
        buffer.internode_dispatch(x)
    with pytest.raises(RuntimeError, match="one node; call Buffer.combine"):
        buffer.internode_combine(x, None)
    with pytest.raises(NotImplementedError, match="mpi4py"):
        __import__("epkern").Buffer(None, comm=object())


def test_get_local_buffer_tensor(buffer):
    whole = buffer.get_local_buffer_tensor(torch.float32)
    assert whole.dtype == torch.float32 and whole.numel() == (1 << 16) // 4
    part = buffer.get_local_buffer_tensor(torch.bfloat16, torch.Size([4, 8]), offset=64)
    part.fill_(3)
    raw = buffer.get_local_buffer_tensor(torch.uint8)
    assert part.shape == (4, 8) and torch.equal(raw[64:128].view(torch.bfloat16).view(4, 8), part)
    assert raw[:64].eq(0).all() and raw[128:].eq(0).all()
    assert buffer.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True).numel() == 0   # DeepEP: no RDMA buffer
    with pytest.raises(ValueError, match="size"):
        buffer.get_local_buffer_tensor(torch.float32, torch.Size([1 << 16]))


def test_set_num_sms_and_configs(buffer):
    import epkern

    saved = epkern.Buffer.num_sms
    try:
        epkern.Buffer.set_num_sms(24)
        assert epkern.Buffer.get_dispatch_config(8).num_sms == 24 and epkern.Buffer.get_combine_config(2).num_sms == 24
        with pytest.raises(ValueError, match="even"):
            epkern.Buffer.set_num_sms(23)
    finally:
        epkern.Buffer.num_sms = saved
    with pytest.raises(RuntimeError, match="low_latency_mode=True"):
        buffer.set_low_latency_num_sms(8)


def test_events_on_cpu(buffer):
    """Megatron's EventOverlap(EventHandle()) and vLLM's `event.event is not None` checks work without CUDA."""
    from epkern import EventHandle, EventOverlap

    previous = EventOverlap(EventHandle())
    topk = torch.tensor([[0], [0]], dtype=torch.int64)
    per_rank, _, per_expert, in_rank, event = buffer.get_dispatch_layout(topk, 2, previous_event=previous,
                                                                         async_finish=True, allocate_on_comm_stream=True)
    assert event.event is not None
    event.current_stream_wait()
    with event:
        pass
    with pytest.raises(RuntimeError, match="no event"):
        buffer.get_dispatch_layout(topk, 2)[4].current_stream_wait()


def test_return_shapes_match_deep_ep(buffer):
    """The tuple lengths of DeepEP's normal-mode calls (the table's "returns")."""
    import json

    returns = json.load(open(os.path.join(REPO, "tests", "data", "deep_ep_v1_2_1_signatures.json")))["returns"]
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    topk = torch.tensor([[0], [1], [-1], [0]], dtype=torch.int64)
    layout = buffer.get_dispatch_layout(topk, 2)
    assert len(layout) == returns["Buffer.get_dispatch_layout"] and layout[1] is None
    per_rank, _, per_expert, in_rank, _ = layout
    out = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                          topk_idx=topk, topk_weights=torch.ones(4, 1))
    assert len(out) == returns["Buffer.dispatch"] and len(out[4]) == 6 and out[3] == [2, 1]
    assert len(buffer.combine(out[0], out[4])) == returns["Buffer.combine"]
    cached = buffer.dispatch(x, handle=out[4])
    assert len(cached) == returns["Buffer.dispatch"] and cached[1:5] == (None, None, None, None)

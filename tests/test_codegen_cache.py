"""Disk cache: miss then hit, complete keys, one compile for N processes, corruption, offline mode."""
import hashlib
import multiprocessing
import os

import pytest

from epkern.codegen import MissingKernelError, cache, compiler, jit
from epkern.layout import LayoutSpec

ARCH = "sm_90a"
SPEC = LayoutSpec(num_experts=16, num_ranks=2, num_topk=2)


def _key(spec=SPEC, arch=ARCH):
    return cache.source_key(spec.render(), compiler.compile_options(arch), arch)


# -- miss, then hit -------------------------------------------------------------------------------
def test_miss_then_hit(isolated_cache):
    first = jit.build(SPEC, ARCH)
    assert first.fresh
    assert first.path.is_relative_to(isolated_cache)
    assert first.cubin.startswith(b"\x7fELF")
    second = jit.build(SPEC, ARCH)
    assert not second.fresh
    assert second.path == first.path and second.cubin == first.cubin
    assert second.meta["name"] == SPEC.name and second.meta["arch"] == ARCH
    assert second.meta["nvrtc"] == compiler.nvrtc_version()
    rows = cache.list_entries()
    assert [r["kernel"] for r in rows] == [SPEC.name]
    assert not [p for p in first.path.parent.iterdir() if p.name.endswith(".tmp")]


# -- the key covers every input -------------------------------------------------------------------
def test_key_changes_with_each_input(monkeypatch):
    source, options = SPEC.render(), compiler.compile_options(ARCH)
    base = cache.source_key(source, options, ARCH)
    assert base == cache.source_key(source, options, ARCH)
    changed = {
        "source": cache.source_key(source + "\n// edit", options, ARCH),
        "other spec": _key(LayoutSpec(num_experts=16, num_ranks=2, num_topk=3)),
        "options": cache.source_key(source, options + ("-lineinfo",), ARCH),
        "arch": cache.source_key(source, compiler.compile_options("sm_90"), "sm_90"),
    }
    with monkeypatch.context() as m:
        m.setattr(cache, "epkern_version", lambda: "999.0")
        changed["epkern version"] = cache.source_key(source, options, ARCH)
    monkeypatch.setenv("EPKERN_NVRTC_EXTRA_OPTIONS", "-DEPK_KNOB=1")
    changed["env knob"] = _key()
    # the knob reaches the key through the options only (hashed once)
    assert "-DEPK_KNOB=1" in compiler.compile_options(ARCH) and cache.source_key(source, options, ARCH) == base
    for what, key in changed.items():
        assert key != base, f"cache key ignores the {what}"
    assert len(set(changed.values())) == len(changed)


def test_nvrtc_version_is_part_of_the_entry_path():
    key = _key()
    assert cache.entry_path(SPEC.symbol, key, "13.0") != cache.entry_path(SPEC.symbol, key, "13.5")


def test_extra_options_knob_builds_a_separate_entry(isolated_cache, monkeypatch):
    plain = jit.build(SPEC, ARCH)
    monkeypatch.setenv("EPKERN_NVRTC_EXTRA_OPTIONS", "-lineinfo")
    tuned = jit.build(SPEC, ARCH)
    assert tuned.fresh and tuned.path != plain.path


def test_key_ignores_header_paths(isolated_cache, monkeypatch, tmp_path):
    """Headers live under a different site-packages on the GPU machine; the key must not see that."""
    built = jit.build(SPEC, ARCH)
    moved = []
    for i, d in enumerate(compiler.include_dirs()):
        link = tmp_path / f"inc{i}"
        link.symlink_to(d)
        moved.append(str(link))
    monkeypatch.setattr(compiler, "include_dirs", lambda: tuple(moved))
    again = jit.build(SPEC, ARCH)
    assert not again.fresh and again.path == built.path


# -- N processes, one compile ---------------------------------------------------------------------
def _build_in_child(barrier, results):
    from epkern.codegen import jit as child_jit

    barrier.wait(timeout=120)
    entry = child_jit.build(SPEC, ARCH)
    results.put((entry.fresh, hashlib.sha256(entry.cubin).hexdigest()))


def test_four_processes_compile_once(isolated_cache):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    fresh = [f for f, _ in outcomes]
    assert sum(fresh) == 1, f"expected exactly one compile, got fresh flags {fresh}"
    assert len({digest for _, digest in outcomes}) == 1
    assert len(cache.list_entries()) == 1


# -- corrupted entries are rebuilt, never loaded --------------------------------------------------
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def _garbage_header(path):
    data = path.read_bytes()
    path.write_bytes(b"{not json" + data[data.index(b"\n"):])


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _flip_payload_byte, _garbage_header, _empty])
def test_corrupted_entry_is_rebuilt(isolated_cache, damage):
    good = jit.build(SPEC, ARCH)
    damage(good.path)
    assert cache.load(good.path) is None  # detected and removed, never returned
    assert not good.path.exists()
    damage_again = jit.build(SPEC, ARCH)
    damage(damage_again.path)
    rebuilt = jit.build(SPEC, ARCH)
    assert rebuilt.fresh
    assert rebuilt.cubin == good.cubin


def test_corrupted_entry_is_not_loaded_offline(isolated_cache, monkeypatch):
    good = jit.build(SPEC, ARCH)
    _flip_payload_byte(good.path)
    monkeypatch.setenv("EPKERN_JIT", "0")
    with pytest.raises(MissingKernelError):
        jit.build(SPEC, ARCH)


# -- offline mode ---------------------------------------------------------------------------------
def test_offline_missing_kernel_names_spec_and_command(isolated_cache, monkeypatch):
    monkeypatch.setenv("EPKERN_JIT", "0")
    with pytest.raises(MissingKernelError) as info:
        jit.build(SPEC, ARCH)
    err = info.value
    assert err.spec is SPEC and err.arch == ARCH
    message = str(err)
    assert SPEC.name in message and str(SPEC) in message
    assert "epkern precompile --arch sm_90a" in message
    assert "EPKERN_JIT=0" in message
    assert not isolated_cache.joinpath("kernels").exists() or not cache.list_entries()


def test_offline_loads_an_entry_from_another_nvrtc(isolated_cache, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(compiler, "nvrtc_version", lambda: "99.1")
        foreign = jit.build(SPEC, ARCH)
    assert foreign.fresh and foreign.path.name.endswith("-nvrtc99.1.cubin")

    # JIT on: only the running NVRTC's entry counts, so this compiles anew
    monkeypatch.setenv("EPKERN_JIT", "1")
    native = jit.build(SPEC, ARCH)
    assert native.fresh and native.meta["nvrtc"] == compiler.nvrtc_version()
    native.path.unlink()

    # offline: the foreign entry is accepted, and no headers or compiler are needed to find it
    monkeypatch.setenv("EPKERN_JIT", "0")
    monkeypatch.setattr(compiler, "include_dirs", _no_headers)
    monkeypatch.setattr(compiler, "compile_cubin", _no_compiler)
    loaded = jit.build(SPEC, ARCH)
    assert not loaded.fresh
    assert loaded.meta["nvrtc"] == "99.1" and loaded.cubin == foreign.cubin


def _no_headers():
    raise RuntimeError("offline mode must not need CUDA headers")


def _no_compiler(*args, **kwargs):
    raise RuntimeError("offline mode must not compile")


def test_offline_prefers_the_newest_nvrtc(isolated_cache, monkeypatch):
    for version in ("13.0", "13.10", "13.5"):
        monkeypatch.setattr(compiler, "nvrtc_version", lambda v=version: v)
        jit.build(SPEC, ARCH)
    monkeypatch.setenv("EPKERN_JIT", "0")
    assert jit.build(SPEC, ARCH).meta["nvrtc"] == "13.10"


def test_store_is_atomic_and_replaces(isolated_cache):
    path = cache.entry_path(SPEC.symbol, _key(), "1.0")
    cache.store(path, b"first", {"name": "x"})
    cache.store(path, b"second", {"name": "x"})
    assert cache.load(path).cubin == b"second"
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")) == [path.name]


def test_clear_removes_every_entry(isolated_cache):
    jit.build(SPEC, ARCH)
    assert cache.total_size() > 0
    assert cache.clear() == 1
    assert cache.list_entries() == []
    assert cache.clear() == 0
    assert os.path.isdir(isolated_cache) or not cache.list_entries()

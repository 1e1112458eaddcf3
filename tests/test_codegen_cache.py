"""Disk cache: miss then hit, complete keys, one compile for N processes, corruption, offline mode."""
import hashlib
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

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


# -- shared and unusable caches (issue 18 items 4 and 9) ---------------------------------------------
OTHER = LayoutSpec(num_experts=16, num_ranks=2, num_topk=3)


def test_another_kernels_entry_at_the_path_is_never_loaded(isolated_cache, monkeypatch, caplog):
    mine, other = jit.build(SPEC, ARCH), jit.build(OTHER, ARCH)
    mine.path.write_bytes(other.path.read_bytes())  # a valid entry, of another kernel
    monkeypatch.setenv("EPKERN_JIT", "0")
    with pytest.raises(MissingKernelError):
        jit.build(SPEC, ARCH)
    assert mine.path.read_bytes() == other.path.read_bytes(), "offline mode must not delete or rewrite"
    assert "holds kernel" in caplog.text and OTHER.name in caplog.text
    monkeypatch.setenv("EPKERN_JIT", "1")
    rebuilt = jit.build(SPEC, ARCH)
    assert rebuilt.fresh and rebuilt.cubin == mine.cubin and rebuilt.meta["name"] == SPEC.name
    assert cache.load(mine.path, key=mine.meta["key"], name=SPEC.name).cubin == mine.cubin


def _unreadable(monkeypatch, target):
    real = type(target).read_bytes

    def read_bytes(self):
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)
    monkeypatch.setattr(type(target), "read_bytes", read_bytes)


def test_unreadable_entry_is_kept_and_reported(isolated_cache, monkeypatch, caplog):
    built = jit.build(SPEC, ARCH)
    _unreadable(monkeypatch, built.path)
    monkeypatch.setenv("EPKERN_JIT", "0")
    with pytest.raises(cache.CacheUnreadable, match=r"cannot read .*the entry is kept.*EPKERN_CACHE_DIR"):
        jit.build(SPEC, ARCH)
    assert built.path.exists()
    monkeypatch.setenv("EPKERN_JIT", "1")
    monkeypatch.setattr(cache, "_fallback", None)
    again = jit.build(SPEC, ARCH)  # compiles into a private temporary cache, one warning
    assert again.fresh and not again.path.is_relative_to(isolated_cache) and again.cubin == built.cubin
    assert built.path.exists() and caplog.text.count("temporary cache") == 1
    assert not jit.build(SPEC, ARCH).fresh and caplog.text.count("temporary cache") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files of mode 0")
def test_unreadable_entry_of_mode_0_is_not_deleted(isolated_cache, monkeypatch):
    built = jit.build(SPEC, ARCH)
    built.path.chmod(0)
    monkeypatch.setenv("EPKERN_JIT", "0")
    with pytest.raises(cache.CacheUnreadable):
        jit.build(SPEC, ARCH)
    assert built.path.exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_entries_and_locks_follow_the_umask(isolated_cache, umask, mode):
    old = os.umask(umask)
    try:
        built = jit.build(SPEC, ARCH)
    finally:
        os.umask(old)
    assert built.path.stat().st_mode & 0o777 == mode
    assert os.stat(str(built.path) + ".lock").st_mode & 0o777 == mode


def test_lock_wait_names_the_holder_and_ends(isolated_cache, monkeypatch):
    path = cache.entry_path(SPEC.symbol, _key(), compiler.nvrtc_version())
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from epkern.codegen import cache\n"
         "with cache.lock_for(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("EPKERN_LOCK_TIMEOUT_S", "0.3")
        with pytest.raises(cache.CacheLockTimeout, match=rf"held by pid {holder.pid} on host .* since .*EPKERN_LOCK_TIMEOUT_S"):
            jit.build(SPEC, ARCH)
    finally:
        holder.kill()
        holder.wait()
    assert jit.build(SPEC, ARCH).fresh  # the lock freed with its holder


@pytest.mark.parametrize("raw", ["nan", "inf", "-1", "0", "1e30", "soon"])
def test_bad_lock_timeout_is_rejected(monkeypatch, raw):
    monkeypatch.setenv("EPKERN_LOCK_TIMEOUT_S", raw)
    with pytest.raises(ValueError, match="EPKERN_LOCK_TIMEOUT_S"):
        cache.lock_for(Path("/nonexistent/x"))


def test_cache_dir_that_is_a_file(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("EPKERN_CACHE_DIR", str(blocker))
    monkeypatch.setattr(cache, "_fallback", None)
    with pytest.raises(cache.CacheUnwritable, match=rf"{blocker} is a file.*EPKERN_CACHE_DIR={blocker}"):
        cache.prepare_dir(cache.entry_path(SPEC.symbol, _key(), "1.0").parent)
    entry = jit.build(SPEC, ARCH)  # JIT on: falls back to a temporary cache with one warning
    assert entry.path.is_relative_to(cache.fallback_root("")) and entry.cubin.startswith(b"\x7fELF")
    assert caplog.text.count(f"EPKERN_CACHE_DIR={blocker}") == 1
    monkeypatch.setenv("EPKERN_JIT", "0")
    with pytest.raises(cache.CacheUnwritable, match=r"is a file, not a directory.*EPKERN_CACHE_DIR"):
        jit.build(SPEC, ARCH)


def test_unwritable_home_names_the_knob(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("x")
    monkeypatch.delenv("EPKERN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "file" / "home"))
    monkeypatch.setattr(cache, "_fallback", None)
    with pytest.raises(cache.CacheUnwritable, match=r"EPKERN_CACHE_DIR is unset.*set EPKERN_CACHE_DIR to a directory"):
        cache.store(cache.entry_path(SPEC.symbol, _key(), "1.0"), b"x", {})
    assert jit.build(SPEC, ARCH).cubin.startswith(b"\x7fELF")
    assert "EPKERN_CACHE_DIR is unset" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only directories")
def test_read_only_cache_dir_falls_back(isolated_cache, monkeypatch, caplog):
    isolated_cache.mkdir(parents=True)
    isolated_cache.chmod(0o555)
    monkeypatch.setattr(cache, "_fallback", None)
    try:
        assert jit.build(SPEC, ARCH).fresh
    finally:
        isolated_cache.chmod(0o755)
    assert "not writable" in caplog.text or "cannot create" in caplog.text

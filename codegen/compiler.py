"""NVRTC: rendered CUDA C++ -> cubin (SASS) for one architecture.

Headers come from the pip packages (CUDA runtime, CCCL, CUTLASS/CuTe),
located with cuda.pathfinder; no system CUDA toolkit is needed.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from . import knobs

BASE_OPTIONS = ("-std=c++17", "-default-device", "-DNDEBUG")


class CompileError(RuntimeError):
    """NVRTC refused a kernel. Carries the spec, options, log and offending source lines."""

    def __init__(self, spec, options, log: str, source: str):
        self.spec = spec
        self.options = list(options)
        self.log = log
        self.source = source
        self.source_lines = _offending_lines(log, source)
        excerpt = "\n".join(f"  {n:5d} | {text}" for n, text in self.source_lines)
        super().__init__(
            f"NVRTC failed to compile {getattr(spec, 'name', spec)}\n"
            f"spec: {spec}\noptions: {' '.join(self.options)}\n"
            f"log:\n{log.strip()}\n"
            + (f"source lines:\n{excerpt}" if excerpt else "")
        )


def _offending_lines(log: str, source: str, context: int = 1) -> list[tuple[int, str]]:
    """Source lines named by 'file(LINE): error' entries of an NVRTC log, with context."""
    import re

    lines = source.splitlines()
    wanted: set[int] = set()
    for match in re.finditer(r"\((\d+)\): (?:error|catastrophic error)", log):
        n = int(match.group(1))
        wanted.update(range(max(1, n - context), min(len(lines), n + context) + 1))
    return [(n, lines[n - 1]) for n in sorted(wanted)]


@functools.lru_cache(maxsize=1)
def nvrtc_version() -> str:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"nvrtcVersion failed: {err}")
    return f"{major}.{minor}"


@functools.lru_cache(maxsize=1)
def include_dirs() -> tuple[str, ...]:
    """CUDA runtime headers, CCCL (cuda/std, cub) and CUTLASS/CuTe, from pip packages."""
    from cuda.pathfinder import find_nvidia_header_directory

    dirs = []
    for lib in ("cudart", "cccl"):
        path = find_nvidia_header_directory(lib)
        if path is None:
            raise RuntimeError(f"CUDA headers for {lib!r} not found: pip install nvidia-cuda-runtime nvidia-cuda-cccl")
        dirs.append(path)
    cutlass = _cutlass_include_dir()
    if cutlass:
        dirs.append(cutlass)
    return tuple(dirs)


def _cutlass_include_dir() -> str | None:
    try:
        import cutlass_library
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.isdir(path) else None


@functools.lru_cache(maxsize=1)
def detected_arch() -> str | None:
    """sm_XY(a) of the current GPU, or None without one. Hopper gets sm_90a (wgmma, setmaxnreg)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
    except Exception:
        return None
    suffix = "a" if (major, minor) in ((9, 0), (10, 0), (10, 3)) else ""
    return f"sm_{major}{minor}{suffix}"


def target_arch(arch: str | None = None) -> str:
    if arch is not None:
        return knobs.validate_arch(arch)
    return knobs.arch_override() or detected_arch() or "sm_90a"


def compile_options(arch: str) -> tuple[str, ...]:
    """The options that decide the generated code (part of the cache key): the base options, the
    architecture and EPKERN_NVRTC_EXTRA_OPTIONS.

    Header search paths are left out: they name this machine's site-packages
    (python3.11 here, python3.12 there), so keying on them would stop cubins
    built ahead on one machine from loading offline on another. The headers
    belong to the CUDA toolkit, identified by the NVRTC version instead.
    compile_cubin adds them."""
    return (*BASE_OPTIONS, f"-arch={arch}", *knobs.extra_nvrtc_options())


def include_options() -> tuple[str, ...]:
    return tuple(f"-I{d}" for d in include_dirs())


@dataclass(frozen=True)
class CompiledKernel:
    cubin: bytes
    log: str


def compile_cubin(spec, source: str, options: tuple[str, ...]) -> CompiledKernel:
    """Compile with NVRTC through cuda.bindings; options from compile_options, headers added here.

    cuda.bindings rather than cuda.core's Program: the option strings are
    passed verbatim, so the cache key, the error and the compile agree (up to
    the header paths), and the log is available as text on failure.
    """
    from cuda.bindings import nvrtc

    def check(result, what):
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{what} failed for {spec.name}: {result[0]}")
        return result[1] if len(result) > 1 else None

    options = tuple(options) + include_options()
    prog = check(nvrtc.nvrtcCreateProgram(source.encode(), f"{spec.symbol}.cu".encode(), 0, [], []),
                 "nvrtcCreateProgram")
    try:
        encoded = [o.encode() for o in options]
        result = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)
        size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        buf = b" " * size
        check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.decode(errors="replace").rstrip("\x00 ")
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(spec, options, log, source)
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return CompiledKernel(cubin=bytes(cubin), log=log)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)

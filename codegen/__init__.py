"""epkern.codegen: spec -> render (Jinja) -> NVRTC -> disk cache -> load & launch."""
from .cache import list_entries as cache_entries
from .compiler import CompileError, nvrtc_version, target_arch
from .jit import MissingKernelError, build
from .launch import KernelParams
from .runtime import LaunchError, LoadedModule, get_module
from .spec import KernelSpec, check_choice, check_int

__all__ = [
    "KernelSpec", "KernelParams", "check_choice", "check_int", "build", "get_module", "LoadedModule",
    "CompileError", "MissingKernelError", "LaunchError", "nvrtc_version", "target_arch", "cache_entries",
]

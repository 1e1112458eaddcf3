"""Shared test set-up: one compile cache for the whole run, GPU tests skipped without a GPU."""
import os
import tempfile

import pytest

# One cache directory for the whole test session (set before epkern reads it), so the NVRTC
# matrix compiles each kernel once; CI may point EPKERN_CACHE_DIR elsewhere to share it.
os.environ.setdefault("EPKERN_CACHE_DIR", tempfile.mkdtemp(prefix="epkern-test-cache-"))


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def pytest_collection_modifyitems(config, items):
    n = _gpu_count()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and n == 0:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n < 2:
            item.add_marker(skip_multi)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A fresh, empty kernel cache for tests that count compiles or corrupt entries."""
    monkeypatch.setenv("EPKERN_CACHE_DIR", str(tmp_path / "cache"))
    from epkern.codegen import runtime

    saved = dict(runtime._modules)
    runtime._modules.clear()
    yield tmp_path / "cache"
    runtime._modules.clear()
    runtime._modules.update(saved)

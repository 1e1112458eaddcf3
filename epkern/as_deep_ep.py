"""Run a program unchanged with epkern as `deep_ep`:

    python -m epkern.as_deep_ep script.py [args]
    python -m epkern.as_deep_ep -m package.module [args]

installs the alias (epkern.install_as_deep_ep) and runs the target as `python` would: sys.argv is
the target's own (script or module path first), it runs as __main__, the script's folder leads
sys.path, and its exit status (sys.exit, an uncaught exception) is the process's. Processes the
target starts (vLLM's workers, multiprocessing "spawn" children, subprocesses) see epkern as deep_ep
as well: a stand-in deep_ep package leads their PYTHONPATH.

    python -m epkern.as_deep_ep --path

prints that folder, for launchers that start the ranks themselves:
`PYTHONPATH=$(python -m epkern.as_deep_ep --path):$PYTHONPATH torchrun ... pretrain_gpt.py`.
"""
from __future__ import annotations

import os
import runpy
import sys

from .deep_ep_compat.alias import SHIM_DIR, install_as_deep_ep

USAGE = "usage: python -m epkern.as_deep_ep script.py [args] | -m package.module [args] | --path"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    if argv[0] == "--path":
        print(SHIM_DIR)
        return 0
    if argv[0] == "-m" and len(argv) < 2:
        print(f"{USAGE}\nerror: -m needs a module name", file=sys.stderr)
        return 2
    install_as_deep_ep()
    # children import the stand-in deep_ep first, and it installs the alias there: subprocesses
    # through PYTHONPATH, multiprocessing "spawn" children through the sys.path they are handed
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SHIM_DIR, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(1, SHIM_DIR)
    if argv[0] == "-m":
        sys.argv = [argv[1]] + argv[2:]   # run_module puts the module's file path first, as python -m does
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        script = argv[0]
        if not os.path.exists(script):
            print(f"epkern.as_deep_ep: can't open file {script!r}: no such file", file=sys.stderr)
            return 2
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())

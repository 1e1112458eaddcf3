"""Check that a refactor left the generated code alone: compile every kernel spec, compare the SASS.

    python3 scripts/compare_sass.py dump BEFORE_DIR        # on the old tree
    python3 scripts/compare_sass.py dump AFTER_DIR         # on the new tree
    python3 scripts/compare_sass.py compare BEFORE_DIR AFTER_DIR

`dump` compiles (NVRTC, sm_90a, no cache) every spec the default deployment needs (EP 2, 4, 8, every
family in epkern.deployment) and writes <symbol>.cubin, <symbol>.sass (cuobjdump -sass) and
<symbol>.res (cuobjdump -res-usage), cuobjdump from PATH or from the nvidia-cuda-cuobjdump wheel.
`compare` counts the byte-identical cubins, then compares every kernel function (entry point) of
before with after: its SASS (whitespace-normalized, its own name replaced by a placeholder) and its
resource usage (registers, stack, shared, constant bank 0). A function whose name is gone passes
if a new function has the same SASS (a kernel renamed or moved to another cubin); anything else is
printed with a diff and makes the exit status 1. Without cuobjdump at dump time it compares the
.text.<kernel> sections of the ELF (the machine code) per cubin instead. `--only PREFIX` limits
both steps to the kernels whose symbol starts with PREFIX.
"""
from __future__ import annotations

import argparse
import difflib
import glob
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

ARCH = "sm_90a"


def cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for site in sys.path:
        for path in glob.glob(os.path.join(site, "nvidia", "cu*", "bin", "cuobjdump")):
            return path
    return None


def text_sections(cubin: bytes) -> dict[str, bytes]:
    """name -> bytes of every .text.* section of an ELF64 (little-endian) cubin."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("not an ELF64 cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)

    def header(i):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = header(shstrndx)
    out = {}
    for i in range(shnum):
        name_off, offset, size = header(i)
        end = cubin.index(b"\0", str_off + name_off)
        name = cubin[str_off + name_off:end].decode()
        if name.startswith(".text."):
            out[name] = cubin[offset:offset + size]
    return out


def dump(out_dir: Path, only: str = "") -> None:
    from epkern.codegen import compiler
    from epkern.deployment import Deployment, specs_for

    out_dir.mkdir(parents=True, exist_ok=True)
    tool = cuobjdump()
    specs = [s for s in specs_for([Deployment()]) if s.symbol.startswith(only)]
    options = compiler.compile_options(ARCH)
    for n, spec in enumerate(specs, 1):
        cubin = compiler.compile_cubin(spec, spec.render(), options).cubin
        (out_dir / f"{spec.symbol}.cubin").write_bytes(cubin)
        if tool:
            sass = subprocess.run([tool, "-sass", str(out_dir / f"{spec.symbol}.cubin")], check=True,
                                  capture_output=True, text=True).stdout
            (out_dir / f"{spec.symbol}.sass").write_text(sass)
            res = subprocess.run([tool, "-res-usage", str(out_dir / f"{spec.symbol}.cubin")], check=True,
                                 capture_output=True, text=True).stdout
            (out_dir / f"{spec.symbol}.res").write_text(res)
        print(f"[{n}/{len(specs)}] {spec.symbol}", flush=True)
    print(f"{len(specs)} kernels in {out_dir}" + ("" if tool else " (no cuobjdump: cubins only)"))


def functions(folder: Path, only: str = "") -> dict[str, str]:
    """kernel name -> its SASS text plus its resource usage line, over every cubin dumped in folder."""
    out = {}
    for sass in sorted(folder.glob(f"{only}*.sass")):
        usage = {}
        res = sass.with_suffix(".res")
        if res.exists():
            for name, line in re.findall(r"Function (\S+):\n(.*)", res.read_text()):
                usage[name] = line.strip()
        for chunk in sass.read_text().split("Function : ")[1:]:
            name, _, body = chunk.partition("\n")
            name = name.strip()
            body = body.split("\n\n\n")[0].replace(name, "<KERNEL>")   # a body may name its own symbol
            body = re.sub(r"[ \t]+", " ", body)   # cuobjdump pads columns by the longest name in the cubin
            out[name] = f"{usage.get(name, '?')}\n{body}"
    return out


def compare(before: Path, after: Path, only: str = "") -> int:
    """0 when every kernel of `before` has the same SASS and resources in `after` (possibly renamed)."""
    old_cubins = {p.stem: p.read_bytes() for p in before.glob(f"{only}*.cubin")}
    new_cubins = {p.stem: p.read_bytes() for p in after.glob(f"{only}*.cubin")}
    same = sum(1 for k, v in old_cubins.items() if new_cubins.get(k) == v)
    print(f"{same} of {len(old_cubins)} cubins byte-identical ({len(new_cubins)} cubins after)")
    old, new = functions(before, only), functions(after, only)
    if not old or not new:
        print("no .sass files (cuobjdump missing at dump time): comparing .text sections per cubin")
        return _compare_text(old_cubins, new_cubins)
    status, identical, renamed = 0, 0, []
    unmatched_new = {body: name for name, body in new.items() if name not in old}
    for name, body in sorted(old.items()):
        if name in new:
            if new[name] == body:
                identical += 1
                continue
            print(f"DIFFERENT: {name}")
            sys.stdout.writelines(list(difflib.unified_diff(body.splitlines(True), new[name].splitlines(True),
                                                            "before", "after", n=2))[:60])
            status = 1
        elif body in unmatched_new:
            renamed.append((name, unmatched_new[body]))
        else:
            print(f"MISSING after (no kernel with its SASS): {name}")
            status = 1
    for old_name, new_name in renamed:
        print(f"renamed, same SASS: {old_name} -> {new_name}")
    extra = sorted(set(new) - set(old) - {n for _, n in renamed})
    for name in extra:
        print(f"new kernel (not in before): {name}")
    print(f"{len(old)} kernels before: {identical} identical under the same name, {len(renamed)} identical under "
          f"a new name, {len(old) - identical - len(renamed)} different; {len(extra)} new")
    return status


def _compare_text(old: dict, new: dict) -> int:
    status = 0
    for name in sorted(old):
        if name not in new or list(text_sections(old[name]).values()) != list(text_sections(new[name]).values()):
            print(f"DIFFERENT machine code (or missing): {name}")
            status = 1
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    dmp = sub.add_parser("dump")
    dmp.add_argument("out_dir", type=Path)
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    for p in (dmp, cmp):
        p.add_argument("--only", default="", metavar="PREFIX", help="only kernels whose symbol starts with PREFIX")
    args = parser.parse_args()
    if args.cmd == "dump":
        dump(args.out_dir, args.only)
        return 0
    return compare(args.before, args.after, args.only)


if __name__ == "__main__":
    sys.exit(main())

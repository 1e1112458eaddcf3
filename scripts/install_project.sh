# Sourced by the GPU-machine scripts (gpu_session.sh, record_bench_h200.sh): install_project puts
# this checkout's epkern on the python in $PY (default python3) without touching the image's torch,
# offline, so without build isolation. Needs REPO (the repository root).
PY=${PY:-python3}

make_source_shim() {
    # Fallback when the editable install cannot run (e.g. a setuptools without bdist_wheel): what
    # an editable install does, by hand. A .pth in site-packages puts a finder first in sys.meta_path
    # that maps epkern, epkern.codegen, ... onto the checkout (the repository's own epkern/ folder
    # would otherwise shadow it from the current directory), and a dist-info gives the version
    # that goes into every cache key.
    "$PY" - "$REPO" <<'PYEOF'
import pathlib, re, sys, sysconfig
repo = pathlib.Path(sys.argv[1])
site = pathlib.Path(sysconfig.get_paths()["purelib"])
version = re.search(r'^version = "(.+)"', (repo / "pyproject.toml").read_text(), re.M).group(1)
roots = {"epkern": "epkern", "epkern.codegen": "codegen", "epkern.templates": "templates",
         "epkern.solver": "solver", "epkern.hooks": "hooks"}
roots = {name: str(repo / folder) for name, folder in roots.items() if (repo / folder).is_dir()}
(site / "_epkern_source_finder.py").write_text(f"""import importlib.abc, importlib.util, os, sys
ROOTS = {roots!r}
class SourceFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        root = ROOTS.get(name)
        if root is None:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
sys.meta_path.insert(0, SourceFinder())
""")
(site / "_epkern_source.pth").write_text("import _epkern_source_finder\n")
meta = site / f"epkern-{version}.dist-info"
meta.mkdir(exist_ok=True)
(meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: epkern\nVersion: {version}\n")
print(f"epkern {version} mapped onto {repo} via {site / '_epkern_source.pth'}")
PYEOF
}

install_project() {
    if "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .; then
        return 0
    fi
    echo "editable install failed; falling back to a source shim on PYTHONPATH"
    make_source_shim
    "$PY" -c "import epkern, epkern.codegen; print('epkern imports from', epkern.__file__)"
}

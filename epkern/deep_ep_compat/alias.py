"""Register epkern under DeepEP's module names, so `import deep_ep` finds epkern."""
from __future__ import annotations

import os
import sys
import types


SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim")  # holds a stand-in deep_ep package


def _aliases() -> dict[str, types.ModuleType]:
    from .. import deep_ep_compat as compat

    return {"deep_ep": compat, "deep_ep.utils": compat.utils, "deep_ep.buffer": compat.buffer}


def install_as_deep_ep() -> types.ModuleType:
    """Make `import deep_ep` (and deep_ep.utils, deep_ep.buffer) resolve to epkern; returns the module.

    Call it before anything imports deep_ep. Raises RuntimeError naming the module and its file if
    a different deep_ep is already imported (two implementations side by side would split state,
    e.g. Buffer.num_sms). Calling it again is harmless."""
    aliases = _aliases()
    for name, module in aliases.items():
        present = sys.modules.get(name)
        if present is not None and present is not module and not getattr(present, "__epkern_shim__", False):
            where = getattr(present, "__file__", None) or repr(present)
            raise RuntimeError(f"install_as_deep_ep: a different module {name!r} is already imported (from {where}); "
                               "install the alias before anything imports deep_ep, or run the program through "
                               "`python -m epkern.as_deep_ep`")
    sys.modules.update(aliases)
    return aliases["deep_ep"]

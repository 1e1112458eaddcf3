"""A stand-in `deep_ep` that `python -m epkern.as_deep_ep` puts first on PYTHONPATH, so processes
the program starts (vLLM's workers, torchrun's ranks, multiprocessing "spawn" children) import
epkern as deep_ep too. Importing it installs the alias, which replaces this module in sys.modules
(the import then returns epkern's deep_ep module)."""
__epkern_shim__ = True

from epkern.deep_ep_compat.alias import install_as_deep_ep  # noqa: E402

install_as_deep_ep()

"""`epkern bench` and `epkern tune`: per-shape benchmarks for users, and tuned configs.

  sweep.py   what a run measures (families, shapes, tokens, ranks) from the options or a deployment
  timing.py  CUDA-event timing over graph replays and eager calls, the host clock on CPU, floors
  devices.py the rates the floors take from a GPU's name (NVLink one way, dense BF16 peak)
  local.py   single-process families: FP8 cast, dispatch layout, LPLB planner, the MoE layer
  comm.py    multi-rank families inside each rank: dispatch / combine, low latency
  nccl_ep.py NCCL EP's runner for those, inside the same ranks
  ranks.py   starting the ranks (NCCL with a GPU each, gloo when they share GPUs or on CPU)
  impls.py   which implementations run side by side (epkern, its torch backend, DeepEP, NCCL EP)
  report.py  results.json, results.csv, PNG plots, the summary table
  run.py     one bench run end to end;  tune.py  the num_sms sweep behind `epkern tune`
  cli.py     the two subcommands' options
"""
from .cli import add_parsers

__all__ = ["add_parsers"]

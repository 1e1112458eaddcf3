"""Normal mode (training, prefill): dispatch/combine through NVLink peer buffers or torch.distributed.

`kernels` owns the intranode specs, their template constants and launchers; `nvlink` and
`torch_backend` are the two backends `epkern.Buffer` chooses between; `handle` is the dispatch
handle both of them produce and `combine` consumes.
"""

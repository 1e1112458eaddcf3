"""The call sequences real frameworks make on `deep_ep.Buffer`, replayed against epkern through the alias.

Each replay builds the Buffer the way its framework does (same arguments, same size hints) and issues
the same calls in the same order with the same keyword arguments, then checks every received row
against its source (all ranks' inputs are gathered through the CPU, so the checks run under gloo):
  sglang_normal    SGLang's DeepEP token dispatcher, normal mode (python/sglang/srt/layers/moe/
                   token_dispatcher/deepep.py): FP8 with column-major scales from
                   per_token_group_quant_fp8(column_major_scales=True, scale_tma_aligned=True)
                   (fp32, or packed UE8M0 int32 with scale_ue8m0=True), async with Buffer.capture()
                   events, expert_alignment=128, config=None.
  vllm_ht          vLLM's DeepEP high-throughput all2all manager (Buffer over the CPU group, 1 GiB)
                   and DeepEPHTPrepareAndFinalize: FP8 block-quantized dispatch, `event.event is not
                   None` checks, the -1 -> expert remap, combine with topk_weights=None.
  megatron         Megatron-LM's fused_a2a: get_buffer's size hints, EventOverlap(EventHandle())
                   events, async with allocate_on_comm_stream, and the backward passes (combine with
                   top-k probabilities, cached-handle dispatch).
Used by test_deep_ep_replay.py (portable backend, CPU) and test_deep_ep_replay_gpu.py (NVLink kernels).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

FP8_MAX = 448.0


# -- inputs and the reference ------------------------------------------------------------------------
def gather(t: torch.Tensor, group, num_ranks: int) -> list[torch.Tensor]:
    """all_gather through the CPU (gloo gathers CPU tensors), results on t's device."""
    raw = _bytes(t).cpu()                     # as bytes: gloo has no fp8
    parts = [torch.empty_like(raw) for _ in range(num_ranks)]
    dist.all_gather(parts, raw, group=group)
    return [p.view(t.dtype).view(t.shape).to(t.device) for p in parts]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """t's bytes, flat. Through reshape: a [T, 1] column-major view counts as contiguous yet keeps a
    last stride != 1, which a dtype view refuses."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def make_inputs(rank: int, num_tokens: int, hidden: int, num_experts: int, num_topk: int, seed: int, device):
    gen = torch.Generator().manual_seed(seed * 1009 + rank)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    x[:, 0] = rank                              # a row names its source rank ...
    x[:, 1] = torch.arange(num_tokens) % 256    # ... and token (with column 2)
    x[:, 2] = torch.arange(num_tokens) // 256
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    topk_idx = torch.topk(scores, num_topk, dim=-1).indices
    topk_idx[torch.rand(num_tokens, num_topk, generator=gen) < 0.05] = -1
    if num_tokens > 7:
        topk_idx[7] = -1                        # a token that goes nowhere
    weights = torch.rand(num_tokens, num_topk, generator=gen)
    return x.to(device), topk_idx.to(device), weights.to(device)


def sglang_quant(x: torch.Tensor, ue8m0: bool = False):
    """per_token_group_quant_fp8(x, 128, column_major_scales=True, scale_tma_aligned=True[, scale_ue8m0]):
    e4m3 [T, H] and scales as SGLang lays them out: fp32 [T, H/128] viewing a [H/128, T rounded to 4]
    tensor transposed, or (UE8M0) int32 [T, ceil(H/128 / 4)] over [.., T rounded to 4] transposed."""
    T, H = x.shape
    groups = x.float().view(T, H // 128, 128)
    scale = groups.abs().amax(-1).clamp_min(1e-10) / FP8_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (groups / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(T, H)
    aligned_t = -(-T // 4) * 4
    if not ue8m0:
        s = torch.empty(H // 128, aligned_t, dtype=torch.float32, device=x.device).t()[:T]
        s.copy_(scale)
        return q, s
    exps = (torch.log2(scale).round().to(torch.int32) + 127).to(torch.uint8)      # [T, H/128]
    packs = -(-(H // 128) // 4)
    padded = torch.zeros(T, packs * 4, dtype=torch.uint8, device=x.device)
    padded[:, :H // 128] = exps
    s = torch.empty(packs, aligned_t, dtype=torch.int32, device=x.device).t()[:T]
    s.copy_(padded.view(torch.int32))
    return q, s


def dequant(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """bf16 rows back from e4m3 and either scale format (what an expert layer would compute on)."""
    T, H = q.shape
    if scales.dtype == torch.int32:
        exps = _bytes(scales).view(T, -1)[:, :H // 128]
        scale = torch.exp2(exps.float() - 127)
    else:
        scale = scales.float()
    return (q.float().view(T, H // 128, 128) * scale.unsqueeze(-1)).view(T, H).to(torch.bfloat16)


class Reference:
    """What `rank` must receive from all ranks' inputs: rows by source rank, then token order."""

    def __init__(self, all_topk: list[torch.Tensor], rank: int, num_ranks: int, num_experts: int):
        epr = num_experts // num_ranks
        lo, hi = rank * epr, (rank + 1) * epr
        self.src_rank, self.src_token, self.local_idx, self.weight_mask = [], [], [], []
        for s, topk in enumerate(all_topk):
            mine = (topk >= lo) & (topk < hi)
            tokens = mine.any(dim=1).nonzero().view(-1)
            self.src_rank.append(torch.full_like(tokens, s))
            self.src_token.append(tokens)
            self.local_idx.append(torch.where(mine[tokens], topk[tokens] - lo, torch.full_like(topk[tokens], -1)))
            self.weight_mask.append(mine[tokens])
        self.src_rank = torch.cat(self.src_rank)
        self.src_token = torch.cat(self.src_token)
        self.local_idx = torch.cat(self.local_idx)
        self.weight_mask = torch.cat(self.weight_mask)
        flat = torch.cat([t.reshape(-1) for t in all_topk])
        self.per_expert = torch.bincount(flat[(flat >= lo) & (flat < hi)] - lo, minlength=epr).tolist()
        self.num_rows = len(self.src_token)

    def rows(self, all_rows: list[torch.Tensor]) -> torch.Tensor:
        """The source rows in receive order (all_rows[s] = rank s's [T, ...] tensor)."""
        dtype, width = all_rows[0].dtype, all_rows[0].shape[1]
        raw = torch.stack([_bytes(r).view(r.shape[0], -1) for r in all_rows])  # as bytes:
        return raw[self.src_rank, self.src_token].view(dtype).view(-1, width)       # any dtype indexes


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b))


def _aligned(counts: list[int], alignment: int) -> list[int]:
    return [-(-c // alignment) * alignment for c in counts]


def _reached(topk_idx: torch.Tensor, num_ranks: int, num_experts: int) -> torch.Tensor:
    """[T, 1]: how many ranks each token reaches."""
    epr = num_experts // num_ranks
    hit = torch.zeros(topk_idx.shape[0], num_ranks, dtype=torch.bool, device=topk_idx.device)
    for r in range(num_ranks):
        hit[:, r] = ((topk_idx >= r * epr) & (topk_idx < (r + 1) * epr)).any(dim=1)
    return hit.sum(1, keepdim=True)


# -- the replays ---------------------------------------------------------------------------------------
def sglang_normal(deep_ep, group, rank, num_ranks, device, *, num_tokens, hidden=256, num_experts=None,
                  num_topk=8, ue8m0=False, seed=0, backend="auto"):
    """SGLang: DeepEPBuffer.get_deepep_buffer + _DeepEPDispatcherImplNormal dispatch_a/b, combine_a/b."""
    Buffer, Config = deep_ep.Buffer, deep_ep.Config
    num_experts = num_experts or 8 * num_ranks
    x, topk_ids, topk_weights = make_inputs(rank, num_tokens, hidden, num_experts, num_topk, seed, device)

    # get_deepep_buffer: FP8 output dtype -> param_bytes = 1; normal mode only
    hidden_bytes = hidden * 1
    num_nvl_bytes = num_rdma_bytes = 0
    for config in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks), num_rdma_bytes)
    buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=False, num_qps_per_rank=Buffer.num_sms,
                    allow_mnnvl=True, backend=backend)
    assert isinstance(Config(num_sms=Buffer.num_sms), Config)

    # dispatch_a
    topk_ids = topk_ids.to(torch.int64)
    hidden_states = sglang_quant(x, ue8m0=ue8m0)
    previous_event = Buffer.capture()
    # _dispatch_core
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
        buffer.get_dispatch_layout(topk_ids, num_experts, previous_event=previous_event, async_finish=True,
                                   allocate_on_comm_stream=previous_event is not None)
    recv_x, recv_topk_ids, recv_topk_weights, num_recv_tokens_per_expert, handle, event = buffer.dispatch(
        hidden_states, topk_idx=topk_ids, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=True,
        allocate_on_comm_stream=(previous_event is not None) and True, expert_alignment=128, config=None)
    # dispatch_b
    event.current_stream_wait()
    assert isinstance(recv_x, tuple)
    recv_hidden, recv_scale = recv_x

    all_q = gather(hidden_states[0], group, num_ranks)
    all_s = gather(hidden_states[1], group, num_ranks)
    ref = Reference(gather(topk_ids, group, num_ranks), rank, num_ranks, num_experts)
    assert recv_hidden.dtype == torch.float8_e4m3fn and _same_bits(recv_hidden, ref.rows(all_q)), "sglang: recv x"
    assert recv_scale.dtype == hidden_states[1].dtype and recv_scale.is_contiguous(), "sglang: scale layout"
    assert _same_bits(recv_scale, ref.rows(all_s)), "sglang: recv scales"
    assert torch.equal(recv_topk_ids, ref.local_idx), "sglang: recv topk ids"
    all_w = gather(topk_weights, group, num_ranks)
    expect_w = torch.where(ref.weight_mask, ref.rows(all_w), torch.zeros_like(recv_topk_weights))
    assert torch.equal(recv_topk_weights, expect_w), "sglang: recv weights"
    assert num_recv_tokens_per_expert == _aligned(ref.per_expert, 128), "sglang: per-expert counts"

    # combine_a / combine_b: the expert output (here: each row dequantized) goes back to its source
    output = dequant(recv_hidden, recv_scale)
    previous_event = Buffer.capture()
    combined_x, _, event = buffer.combine(output, handle, async_finish=True, previous_event=previous_event,
                                          allocate_on_comm_stream=previous_event is not None, config=None)
    event.current_stream_wait()
    mine = dequant(*hidden_states).float() * _reached(topk_ids, num_ranks, num_experts)
    assert torch.equal(combined_x, mine.to(torch.bfloat16)), "sglang: combine"
    buffer.destroy()
    return ref.num_rows


def vllm_ht(deep_ep, group, rank, num_ranks, device, *, num_tokens, hidden=256, num_experts=None, num_topk=8,
            seed=1, backend="auto"):
    """vLLM: DeepEPHTAll2AllManager.get_handle + DeepEPHTPrepareAndFinalize.prepare/finalize."""
    num_experts = num_experts or 8 * num_ranks
    x, topk_ids, topk_weights = make_inputs(rank, num_tokens, hidden, num_experts, num_topk, seed, device)

    # _make_all2all_kwargs (intranode) and Cache.get_or_create(kwargs, deep_ep.Buffer)
    kwargs = dict(group=group, num_nvl_bytes=1024 * 1024 * 1024, num_rdma_bytes=0, low_latency_mode=False,
                  num_qps_per_rank=1, explicitly_destroy=True)
    buffer = deep_ep.Buffer(**kwargs, backend=backend)
    deep_ep.Buffer.set_num_sms(20)
    available_rank_configs = [2, 4, 8, 16, 24, 32, 64, 128, 144, 160]
    dispatch_config = deep_ep.Buffer.get_dispatch_config(num_ranks) if num_ranks in available_rank_configs else None
    combine_config = deep_ep.Buffer.get_combine_config(num_ranks) if num_ranks in available_rank_configs else None

    # prepare_async: block-quantized FP8 before dispatch; _do_dispatch
    a1q, a1q_scale = sglang_quant(x)
    previous_event = None   # dbo_get_previous_event without DBO
    num_tokens_per_rank, num_tokens_per_rdma_rank, dispatch_expert_num_tokens, is_token_in_rank, event = \
        buffer.get_dispatch_layout(topk_idx=topk_ids, num_experts=num_experts, previous_event=previous_event,
                                   async_finish=False, allocate_on_comm_stream=False)
    token_data, expert_topk_ids, expert_topk_weights, expert_num_tokens_per_expert_list, handle, event = \
        buffer.dispatch(x=(a1q, a1q_scale), handle=None, num_tokens_per_rank=num_tokens_per_rank,
                        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                        num_tokens_per_expert=dispatch_expert_num_tokens, topk_idx=topk_ids,
                        topk_weights=topk_weights, expert_alignment=1, config=dispatch_config,
                        previous_event=previous_event, async_finish=True, allocate_on_comm_stream=False)
    # _receiver
    if event.event is not None:
        event.current_stream_wait()
    expert_x, expert_x_scale = token_data
    rank_expert_offset = rank * (num_experts // num_ranks)
    global_ids = torch.where(expert_topk_ids == -1, num_experts - 1 if rank_expert_offset == 0 else 0,
                             expert_topk_ids + rank_expert_offset)

    ref = Reference(gather(topk_ids, group, num_ranks), rank, num_ranks, num_experts)
    assert _same_bits(expert_x, ref.rows(gather(a1q, group, num_ranks))), "vllm: recv x"
    assert _same_bits(expert_x_scale, ref.rows(gather(a1q_scale, group, num_ranks))), "vllm: recv scales"
    assert torch.equal(expert_topk_ids, ref.local_idx), "vllm: recv topk ids"
    mine = ref.local_idx >= 0
    assert torch.equal(global_ids[mine], ref.local_idx[mine] + rank_expert_offset), "vllm: global ids"
    assert expert_num_tokens_per_expert_list == ref.per_expert, "vllm: per-expert counts"

    # _finalize: the weighted expert output, bf16, combined without weights
    fused_expert_output = dequant(expert_x, expert_x_scale)
    assert fused_expert_output.dtype == torch.bfloat16
    output = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=device)
    combined_x, _, event = buffer.combine(x=fused_expert_output, handle=handle, topk_weights=None,
                                          config=combine_config, previous_event=None, async_finish=True,
                                          allocate_on_comm_stream=False)
    if event.event is not None:
        event.current_stream_wait()
    output.copy_(combined_x, non_blocking=True)
    expect = dequant(a1q, a1q_scale).float() * _reached(topk_ids, num_ranks, num_experts)
    assert torch.equal(output, expect.to(torch.bfloat16)), "vllm: combine"
    buffer.destroy()
    return ref.num_rows


def megatron(deep_ep, deep_ep_utils, group, rank, num_ranks, device, *, num_tokens, hidden=256, num_experts=None,
             num_topk=8, seed=2, backend="auto"):
    """Megatron-LM fused_a2a: get_buffer, FusedDispatch/FusedCombine forward and backward."""
    Buffer = deep_ep.Buffer
    EventHandle, EventOverlap = deep_ep_utils.EventHandle, deep_ep_utils.EventOverlap
    num_experts = num_experts or 8 * num_ranks
    x, token_indices, token_probs = make_inputs(rank, num_tokens, hidden, num_experts, num_topk, seed, device)
    async_finish, allocate_on_comm_stream = True, True

    # get_buffer(group, get_hidden_bytes(x))
    hidden_bytes = x.size(1) * max(x.element_size(), 2)
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks), num_rdma_bytes)
    buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes, backend=backend)
    assert buffer.group is group and buffer.num_nvl_bytes >= num_nvl_bytes
    Buffer.set_num_sms(24)   # set_deepep_num_sms

    # FusedDispatch.forward
    previous_event = EventOverlap(EventHandle())
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
        buffer.get_dispatch_layout(token_indices, num_experts, previous_event=previous_event,
                                   async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
    recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle, after_event_overlap = \
        buffer.dispatch(x, topk_idx=token_indices, topk_weights=token_probs, num_tokens_per_rank=num_tokens_per_rank,
                        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                        num_tokens_per_expert=num_tokens_per_expert, previous_event=event, async_finish=async_finish,
                        allocate_on_comm_stream=allocate_on_comm_stream)
    if async_finish:
        after_event_overlap.current_stream_wait()
    tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list)

    all_x = gather(x, group, num_ranks)
    ref = Reference(gather(token_indices, group, num_ranks), rank, num_ranks, num_experts)
    assert _same_bits(recv_x, ref.rows(all_x)), "megatron: recv x"
    assert torch.equal(recv_token_indices, ref.local_idx), "megatron: recv indices"
    expect_p = torch.where(ref.weight_mask, ref.rows(gather(token_probs, group, num_ranks)),
                           torch.zeros_like(recv_token_probs))
    assert torch.equal(recv_token_probs, expect_p), "megatron: recv probs"
    assert tokens_per_expert.tolist() == ref.per_expert, "megatron: tokens per expert"
    reached = _reached(token_indices, num_ranks, num_experts)

    # FusedCombine.forward(x, group, handle, async_finish, allocate_on_comm_stream)
    previous_event = EventOverlap(EventHandle())
    combined_x, _, after_event = buffer.combine(recv_x, handle=handle, async_finish=async_finish,
                                                previous_event=previous_event,
                                                allocate_on_comm_stream=allocate_on_comm_stream)
    if async_finish:
        after_event.current_stream_wait()
    assert torch.equal(combined_x, (x.float() * reached).to(torch.bfloat16)), "megatron: combine"

    # FusedCombine.backward: dispatch the gradient with the cached handle
    grad_output = (combined_x.float() * 0 + x.float() * 2).to(torch.bfloat16)
    previous_event = EventOverlap(EventHandle())
    grad_x, _, _, _, _, after_event = buffer.dispatch(grad_output.contiguous(), handle=handle,
                                                      previous_event=previous_event, async_finish=async_finish,
                                                      allocate_on_comm_stream=allocate_on_comm_stream)
    if async_finish:
        after_event.current_stream_wait()
    assert _same_bits(grad_x, ref.rows([(a.float() * 2).to(torch.bfloat16) for a in all_x])), "megatron: cached"

    # FusedDispatch.backward: combine the gradient and the top-k probabilities' gradient
    previous_event = EventOverlap(EventHandle())
    grad_x, grad_token_probs, after_event = buffer.combine(grad_x.contiguous(), handle,
                                                           topk_weights=recv_token_probs.float(),
                                                           previous_event=previous_event, async_finish=async_finish,
                                                           allocate_on_comm_stream=allocate_on_comm_stream)
    if async_finish:
        after_event.current_stream_wait()
    assert torch.equal(grad_x, (x.float() * 2 * reached).to(torch.bfloat16)), "megatron: backward combine"
    expect_grad_p = torch.where(token_indices >= 0, token_probs, torch.zeros_like(token_probs))
    assert torch.equal(grad_token_probs, expect_grad_p), "megatron: backward probs"
    buffer.destroy()
    return ref.num_rows


def run_all(group, rank, num_ranks, device, num_tokens, backend="auto", hidden=256) -> dict:
    """Every replay through the deep_ep alias; returns rows received per replay (for the log)."""
    import epkern

    deep_ep = epkern.install_as_deep_ep()
    import deep_ep.utils as deep_ep_utils

    saved = deep_ep.Buffer.num_sms
    try:
        rows = {}
        rows["sglang_normal"] = sglang_normal(deep_ep, group, rank, num_ranks, device, num_tokens=num_tokens,
                                              hidden=hidden, backend=backend)
        rows["sglang_normal_ue8m0"] = sglang_normal(deep_ep, group, rank, num_ranks, device, num_tokens=num_tokens,
                                                    hidden=hidden, ue8m0=True, seed=3, backend=backend)
        rows["vllm_ht"] = vllm_ht(deep_ep, group, rank, num_ranks, device, num_tokens=num_tokens, hidden=hidden,
                                  backend=backend)
        rows["megatron"] = megatron(deep_ep, deep_ep_utils, group, rank, num_ranks, device, num_tokens=num_tokens,
                                    hidden=hidden, backend=backend)
        return rows
    finally:
        deep_ep.Buffer.num_sms = saved

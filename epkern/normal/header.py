"""The call header of the torch.distributed backends: every rank agrees on a call before its collectives.

Each dispatch and combine of `epkern.normal.torch_backend.TorchBackend` and
`epkern.internode.torch_backend.HierarchicalTorchBackend` first posts a small JSON header to the
group's store and waits, under timeout_s, for every rank's header of the same call:

    op + seq   which call this is (dispatch or combine) and its sequence number on this backend;
    agree      fields every rank must share (hidden size, dtypes, top-k, cached or not, ...);
    counts     this rank's counts, returned to every rank (the counts a fresh dispatch gathers,
               so it costs no collective of its own);
    flows      per hop, rows this rank sends to each rank and expects from each: rank r's send[s]
               must equal rank s's recv[r] (handles of different dispatches fail this).

A rank that does not post within timeout_s makes every waiting rank raise PeerTimeoutError naming
it; ranks that disagree all raise the same ValueError naming the field and each rank's value,
before any collective whose sizes would disagree (gloo aborts the process on those). The data
collectives themselves (`all_to_all`) also wait under timeout_s where the group runs on the host.
"""
from __future__ import annotations

import datetime
import json

import torch
import torch.distributed as dist

from .nvlink import PeerTimeoutError

_INSTANCES: dict[str, int] = {}  # header users created per group (the same order on every rank)


class CallHeaders:
    """The header exchange of one backend instance over `group` (every rank creates it, in one order)."""

    def __init__(self, group, rank: int, num_ranks: int, timeout_s: float | None, backend: str):
        from epkern.codegen import knobs

        self.group, self.rank, self.num_ranks, self.backend = group, rank, num_ranks, backend
        self.timeout_s = knobs.peer_timeout_s() if timeout_s is None else float(timeout_s)
        self.seq = 0
        self._store = None
        if num_ranks > 1:
            from torch.distributed import distributed_c10d

            self._store = distributed_c10d._get_default_store()
            ranks = ",".join(map(str, dist.get_process_group_ranks(group)))
            _INSTANCES[ranks] = n = _INSTANCES.get(ranks, 0) + 1
            self._prefix = f"epkern/headers/{ranks}/{n}/"

    def _where(self, op: str) -> str:
        return f"{op} #{self.seq} on rank {self.rank} ({self.backend} backend)"

    # -- the exchange ------------------------------------------------------------------------------
    def exchange(self, op: str, agree: dict, counts: list | None = None,
                 flows: dict[str, tuple[list[int], list[int]]] | None = None) -> list:
        """Every rank's `counts` of this call, in rank order (this rank's included), once every rank
        has posted a header that agrees with ours; else PeerTimeoutError / ValueError on every rank.
        flows: {hop name: (rows sent to each rank, rows expected from each rank)}, each of length R."""
        self.seq += 1
        header = dict(op=op, seq=self.seq, agree=agree, counts=counts, flows=flows or {})
        if self._store is None:
            return [counts]
        store = self._store
        keys = [f"{self._prefix}{self.seq}/{r}" for r in range(self.num_ranks)]
        store.set(keys[self.rank], json.dumps(header))
        if self.seq > 2:  # every rank has read call seq - 2's headers: it posted seq - 1 after them
            try:
                store.delete_key(f"{self._prefix}{self.seq - 2}/{self.rank}")
            except (RuntimeError, NotImplementedError):
                pass
        try:
            store.wait(keys, datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError:  # DistStoreError: the timeout
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            if not missing:
                raise
            who = ", ".join(map(str, missing))
            raise PeerTimeoutError(
                f"{self._where(op)}: rank{'s' if len(missing) > 1 else ''} {who} did not arrive within "
                f"{self.timeout_s:g} s (timeout_s / EPKERN_TIMEOUT_S); every rank of the group must make the "
                f"same dispatch and combine calls") from None
        headers = [json.loads(v) for v in store.multi_get(keys)]
        self._check_agree(op, headers)
        self._check_flows(op, headers)
        return [h["counts"] for h in headers]

    def _check_agree(self, op: str, headers: list[dict]) -> None:
        fields = ["op"] + list(dict.fromkeys(k for h in headers for k in h["agree"]))  # op first, then in order
        for field in fields:
            values = [h["op"] if field == "op" else h["agree"].get(field) for h in headers]
            if any(v != values[0] for v in values):
                per_rank = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                raise ValueError(f"{self._where(op)}: the ranks disagree on {field} ({per_rank}); every rank must "
                                 f"pass the same hidden size, dtypes and top-k, and handles of the same dispatch")

    def _check_flows(self, op: str, headers: list[dict]) -> None:
        R = self.num_ranks
        for hop in headers[self.rank]["flows"]:  # every rank has the same hops: op and cached agree
            for r in range(R):
                for s in range(R):
                    sent, expected = headers[r]["flows"][hop][0][s], headers[s]["flows"][hop][1][r]
                    if sent != expected:
                        over = f" over the {hop} hop" if len(headers[self.rank]["flows"]) > 1 else ""
                        raise ValueError(f"{self._where(op)}: rank {r} sends {sent} rows to rank {s}{over}, which "
                                         f"expects {expected}: the handles come from different dispatches")

    # -- the data collective -----------------------------------------------------------------------
    def all_to_all(self, recv: torch.Tensor, send: torch.Tensor, recv_splits: list[int], send_splits: list[int],
                   group, op: str) -> None:
        """all_to_all_single over `group` (this backend's group or a subgroup of it); on a host (gloo)
        group it waits under the timeout. A one-rank group copies."""
        if len(send_splits) == 1:
            recv.copy_(send)
            return
        self.start_all_to_all(recv, send, recv_splits, send_splits, group, op)()

    def start_all_to_all(self, recv: torch.Tensor, send: torch.Tensor, recv_splits: list[int] | None,
                         send_splits: list[int] | None, group, op: str):
        """Issue all_to_all_single over `group` without waiting (None splits: equal blocks); returns
        wait(). On a host (gloo) group wait() blocks until recv is filled, under the timeout
        (PeerTimeoutError); on a device (NCCL) group the transfer is NCCL's own kernel on NCCL's
        stream and wait() orders the current stream after it, without blocking the host (the
        group's timeout, set at init_process_group, bounds it there)."""
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group, async_op=True)
        on_host = send.device.type == "cpu"

        def wait(tensors=(recv, send)) -> None:   # the tensors live until the transfer is waited for
            if not on_host:
                work.wait()
                return
            try:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as exc:
                raise PeerTimeoutError(f"{self._where(op)}: the data exchange did not complete within "
                                       f"{self.timeout_s:g} s ({exc})") from None
        return wait

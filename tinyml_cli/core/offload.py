"""Activation offloading (`train.offload_activations`): the tensors autograd saves for the backward pass wait in
CPU memory instead of on the device, through `torch.autograd.graph.saved_tensors_hooks` (the technique of
torchtune's `OffloadActivations`; tinyml's own code).

With gradient checkpointing the tensors saved outside the checkpointed layers are each layer's input (and a few
of the loss's), so the device holds one layer's input and that layer's recomputation at a time, instead of every
layer's input. Without checkpointing every saved activation is offloaded and the backward pass brings each back
when its layer needs it.

What stays: weights and buffers (and views of them), leaves that require grad (autograd holds them anyway),
tensors under `min_bytes`, tensor subclasses. A storage saved several times (one input read by q, k and v) is
copied once and restored once.
On CUDA the host copies are pinned; the device-to-host copies run on a side stream, overlapped with the forward
pass, and in the backward pass the next `prefetch` storages are copied back on that stream while the current
layer computes. On CPU there is no device memory to spare: offloaded bytes are kept as numpy arrays, outside
torch's tensors, and restored as new tensors, so that a tensor meter (`PeakTensorMemory`) sees what a GPU would
hold. That is for measuring the effect; it saves no memory on a CPU.
"""

from __future__ import annotations

import contextlib

import torch
from torch.multiprocessing.reductions import StorageWeakRef


class _Stored:
    """One offloaded storage: its host copy, and its device copy while the backward pass uses it."""

    def __init__(self, storage, version: int, device, host, event=None, source=None):
        self.ref, self.version, self.device = StorageWeakRef(storage), version, device
        self.nbytes = storage.nbytes()
        self.host, self.event, self.source = host, event, source  # source: the device bytes until copied
        self.restored, self.ready, self.uses = None, None, 0


def _bytes_of(storage, device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class OffloadActivations:
    """`with offloader.forward(): loss = ...` keeps what that forward saves in CPU memory; `loss.backward()` (after
    the block) brings it back. One offloader serves a whole run: `keep` are the model's weights and buffers."""

    prefetch_default = 2  # storages copied back ahead of need on CUDA (the estimate counts them)

    def __init__(self, keep, min_bytes: int = 1024, prefetch: int = prefetch_default):
        self.keep = {t.untyped_storage().data_ptr() for t in keep if t.device.type != "meta"}
        self.min_bytes, self.prefetch = min_bytes, prefetch
        self.side = None

    def _eligible(self, t: torch.Tensor) -> bool:
        return (type(t) is torch.Tensor and t.layout == torch.strided and t.device.type in ("cuda", "cpu")
                and not (t.is_leaf and t.requires_grad) and t.untyped_storage().nbytes() >= self.min_bytes
                and t.untyped_storage().data_ptr() not in self.keep)

    @contextlib.contextmanager
    def forward(self):
        cuda = torch.cuda.is_available()
        if cuda and self.side is None:
            self.side = torch.cuda.Stream()
        order: list[_Stored] = []  # in forward order: the backward pass wants them roughly in reverse
        by_ptr: dict[int, _Stored] = {}
        pending: list[_Stored] = []  # CUDA: copies still reading their device source
        synced = [False]

        def pack(t):
            if not self._eligible(t):
                return t
            storage = t.untyped_storage()
            entry = by_ptr.get(storage.data_ptr())
            if entry is None or entry.ref.expired() or entry.version != t._version:
                entry = self._offload(storage, t._version, t.device, pending)
                by_ptr[storage.data_ptr()] = entry
                entry.index = len(order)
                order.append(entry)
            entry.uses += 1
            return entry, t.dtype, t.shape, t.stride(), t.storage_offset()

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            entry, dtype, shape, stride, offset = packed
            if entry.device.type == "cuda" and not synced[0]:  # backward starts: the offload copies are done
                torch.cuda.current_stream().wait_stream(self.side)
                for e in pending:
                    e.source = None
                pending.clear()
                synced[0] = True
            if entry.restored is None:
                self._restore(entry)
            if entry.device.type == "cuda":
                for e in order[max(0, entry.index - self.prefetch):entry.index]:  # the next ones, ahead of need
                    if e.restored is None:
                        self._restore(e)
                torch.cuda.current_stream().wait_event(entry.ready)
            storage = entry.restored.untyped_storage()
            entry.uses -= 1
            if entry.uses == 0:  # every saver has its tensor: from here autograd alone decides when it dies
                entry.restored = entry.host = None
            return torch.empty(0, dtype=dtype, device=entry.device).set_(storage, offset, shape, stride)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def _offload(self, storage, version, device, pending) -> _Stored:
        src = _bytes_of(storage, device)
        if device.type == "cpu":  # numpy bytes stand for host memory (see the module docstring)
            return _Stored(storage, version, device, src.numpy().copy())
        # drop copies that have finished: their sources may go
        while pending and pending[0].event.query():
            pending.pop(0).source = None
        host = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=True)
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            host.copy_(src, non_blocking=True)
            event = self.side.record_event()
        entry = _Stored(storage, version, device, host, event, src)
        pending.append(entry)
        return entry

    def _restore(self, entry: _Stored) -> None:
        if entry.device.type == "cpu":
            dev = torch.empty(entry.nbytes, dtype=torch.uint8)
            dev.numpy()[:] = entry.host
            entry.restored = dev
            return
        # allocated on the compute stream (so the allocator orders its reuse there), filled on the side stream
        dev = torch.empty(entry.nbytes, dtype=torch.uint8, device=entry.device)
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            dev.copy_(entry.host, non_blocking=True)
            entry.ready = self.side.record_event()
        entry.restored = dev


def offloader(model, enabled: bool):
    """The run's offloader (None when off): the model's weights and buffers are never offloaded."""
    if not enabled:
        return None
    return OffloadActivations(list(model.parameters()) + list(model.buffers()))

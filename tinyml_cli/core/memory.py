"""Peak tensor memory of a block of PyTorch code on CPU, where there is no `torch.cuda.max_memory_allocated`.

A `TorchDispatchMode` sees the output of every aten op run inside it (forward, autograd's backward, the
optimizer); each output's storage is tracked through a weak reference until it dies, and the largest sum of
live storage bytes is the peak. That is the quantity CUDA's allocator statistics report (tensor memory, not
process RSS). Storages made before the block are registered up front (the modules given), or when an op first
reads them (`inputs=True`: what the benchmarks use, whose two sides build their models differently). Scratch
memory an op allocates and frees inside its own kernel is not seen.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """`with PeakTensorMemory(model) as mem: ...` then `mem.peak` (bytes) and `mem.current`."""

    def __init__(self, *modules: torch.nn.Module, inputs: bool = False):
        super().__init__()
        self.inputs = inputs
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                self.track(t)
        self.peak = self.current

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        ref = StorageWeakRef(storage)
        if ref.cdata not in self.live:
            self.live[ref.cdata] = (ref, nbytes)
            self.current += nbytes

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Frees happen between ops: sweeping first gives the live set at the moment the outputs are allocated.
        self._sweep()
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out) if self.inputs else out)[0]:
            self.track(t)
        self.peak = max(self.peak, self.current)
        return out

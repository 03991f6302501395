"""Batched generation in length order: the batching both the PyTorch and the ONNX generation loops use."""

from __future__ import annotations


def in_length_order(examples: list, batch_size: int, run_batch, progress=None) -> list:
    """`run_batch(examples) -> one result per example` over batches of similar prompt length; results come back
    in the order of `examples`. Sorting by length keeps the left padding of each batch short."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    found = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        found.update(zip(idx, run_batch([examples[i] for i in idx])))
        if progress:
            progress(min(s + batch_size, len(order)), len(order))
    return [found[i] for i in range(len(examples))]

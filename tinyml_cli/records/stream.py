"""Streamed training records (`data.streaming`): a parquet file or folder, a `datasets` folder or a hub id read a
block of records at a time through `datasets`' IterableDataset, encoded as training needs them, never copied,
cached or held whole.

Order: the source's own order, shuffled within blocks of `data.stream_block` records (each block's permutation
seeded by the seed, the epoch and the block's number), epoch after epoch. Shuffle a data set once when you write it
if its order is not random already; a block shuffle cannot move records further than a block.

Exact resume: the stream's position is the `datasets` iterator state at the start of the current block (its
shard and row) plus how many of the block's records have been taken. A resumed run reads that block again,
encodes it again, permutes it the same way and goes on from the same record, so it sees the records an
uninterrupted run would, in the same order.
"""

from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path

from .. import UserError
from .sources import (
    _need_datasets,
    _split,
    is_hub_id,
    is_saved_dataset,
    is_table,
    parquet_files,
    rename_columns,
    source_problem,
)


def streamable(source: str) -> bool:
    """What `data.streaming` reads: parquet files and folders, `datasets` folders, hub ids (not JSON / JSONL)."""
    return is_table(source) or is_hub_id(source)


def open_stream(source: str):
    """The data set as a `datasets` IterableDataset in its own order, image columns left as undecoded bytes."""
    datasets = _need_datasets()
    p = Path(source)
    if is_saved_dataset(p):
        ds = _split(datasets.load_from_disk(source), source, None).to_iterable_dataset()
    elif p.is_dir() or p.suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files=parquet_files(p), split="train", streaming=True)
    else:
        problem = source_problem(source)
        if problem:
            raise UserError(problem)
        name, _, split = source.partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train", streaming=True)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"cannot stream data set {source}: {e}") from None
    return ds.decode(False)  # images reach the encoder as {"bytes", "path"}, decoded only when batched


class RecordStream:
    """Encoded records of a streamed data set, without end: `parse(record)` makes each record an Example (or raises
    ValueError). A bad record fails the run naming its row, or with on_error=skip is listed in `skipped`."""

    def __init__(self, source: str, parse, seed: int, block: int, on_error: str = "fail", columns: dict | None = None):
        self.source, self.parse, self.seed, self.block = source, parse, seed, block
        self.on_error, self.columns = on_error, columns
        # the position: epoch, block number and row of the block's first record, the iterator state there
        # (None: the epoch's start) and the records of the block taken so far
        self.epoch, self.block_no, self.row, self.block_state, self.taken = 0, 0, 0, None, 0
        self.skipped: list[str] = []
        self.used = 0  # records taken in this run (resumed runs count from the checkpoint)

    def _examples(self, rows: list) -> list:
        out, problems = [], []
        for k, rec in enumerate(rows, self.row + 1):
            where = f"{self.source} row {k}"
            try:
                ex = self.parse(rename_columns(rec, self.columns))
            except ValueError as e:
                if self.on_error == "fail":
                    raise UserError(f"{where}: {e}") from None
                problems.append(f"{where}: {e}")
                continue
            ex.meta["where"] = where
            out.append(ex)
        if self.taken == 0 and self.epoch == 0:  # listed once: not again in later epochs, nor when a resumed run
            self.skipped += problems            # reads its block again (counted before the checkpoint)
        return out

    def __iter__(self):
        while True:
            ds = open_stream(self.source)
            if self.block_state is not None:
                ds.load_state_dict(self.block_state)
            rows_of_epoch = iter(ds)
            usable = self.taken > 0 or self.block_no > 0
            while rows := list(itertools.islice(rows_of_epoch, self.block)):
                next_state = copy.deepcopy(ds.state_dict())
                examples = self._examples(rows)
                order = list(range(len(examples)))
                random.Random(f"{self.seed}:{self.epoch}:{self.block_no}").shuffle(order)
                usable = usable or bool(examples)
                while self.taken < len(order):
                    self.taken += 1
                    self.used += 1
                    yield examples[order[self.taken - 1]]
                self.block_no, self.row, self.block_state, self.taken = (self.block_no + 1, self.row + len(rows),
                                                                          next_state, 0)
            if not usable:
                raise UserError(f"{self.source}: no usable record" + (" (the data set is empty)" if not self.row else ""))
            self.epoch, self.block_no, self.row, self.block_state = self.epoch + 1, 0, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "block_no": self.block_no, "row": self.row, "block_state": self.block_state,
                "taken": self.taken, "skipped": list(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.block_no, self.row = state["epoch"], state["block_no"], state["row"]
        self.block_state, self.taken, self.skipped = state["block_state"], state["taken"], list(state["skipped"])

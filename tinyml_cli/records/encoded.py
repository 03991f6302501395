"""Encoded records on disk: a JSON / JSONL data file encoded once, by several processes, into a cache folder that
later runs, resumes and stages read back in seconds.

The cache entry's name is a hash of the data file's bytes, the tokenizer (its full serialisation), the chat
template, the image tokens and the encoding settings (max_length, system prompt, columns, image folder), so
anything that would change an encoded record makes a new entry. An entry is a few flat numpy arrays: every
record's token ids and labels end to end (int32) with their offsets, its line in the file, its images as indices
into one list of image paths, and the records that failed (`skipped.txt`). They are opened as memory maps, so
a run holds only the records of the batches in flight.

Records are read in blocks of whole lines (a JSON list is parsed first); worker processes (forked, so the encoder
is shared, not pickled) encode a block each into files of their own, which are then joined in file order.
Problems are those of `sources.parse_all`: with on_error=fail the first bad record in file order is named, with
skip every bad record is listed, whichever process met it. Images are checked lazily (they must exist; their
pixels are read when their batch is made). Parquet, `datasets` folders and hub ids are encoded in memory as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from pathlib import Path

import numpy as np

from .. import UserError
from .conversations import Example, parse_record
from .sources import (
    is_json_list,
    is_table,
    jsonl_records,
    read_records,
    rename_columns,
    where,
)

VERSION = 1  # part of every cache name: bump when the layout or the encoding changes
BLOCK = 4 << 20  # bytes of JSONL per unit of work
_JOB: dict = {}  # what forked workers inherit: the encoder, the settings, a JSON list's records


def default_cache_dir() -> Path:
    """Where encoded data sets live unless `data.cache_dir` says otherwise: the user's cache folder."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinyml" / "encoded"


def _tokenizer_text(tok) -> str:
    """Everything of a tokenizer that decides its ids: the fast tokenizer's JSON, else its vocabulary."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return json.dumps([type(tok).__name__, body, tok.chat_template, str(tok.special_tokens_map)], default=str)


def _scan(path: Path) -> tuple[str, list[tuple[int, int, int]]]:
    """(sha256 of the file, JSONL blocks as (start byte, end byte, first line)), in one read of the file."""
    h, blocks, pos, newlines, start, start_line = hashlib.sha256(), [], 0, 0, 0, 1
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK):
            h.update(chunk)
            cut = chunk.rfind(b"\n")
            if cut >= 0:  # a block ends after the last whole line read so far
                blocks.append((start, pos + cut + 1, start_line))
                start, start_line = pos + cut + 1, 1 + newlines + chunk.count(b"\n", 0, cut + 1)
            newlines += chunk.count(b"\n")
            pos += len(chunk)
    if pos > start:
        blocks.append((start, pos, start_line))
    return h.hexdigest(), blocks


def cache_name(digest: str, encoder, root: Path, columns: dict | None) -> str:
    images = encoder.images
    parts = [VERSION, digest, _tokenizer_text(encoder.tok), encoder.n_img, encoder.max_length, encoder.system,
             encoder.placeholder, str(root.resolve()), json.dumps(columns or {}, sort_keys=True)]
    if images is not None:  # a processor-based model: its template and image processing decide the tokens
        proc = images.processor
        parts += [type(proc).__name__, getattr(proc, "chat_template", ""),
                  proc.image_processor.to_json_string() if hasattr(proc, "image_processor") else ""]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def _encode_block(job: tuple) -> tuple[int, list[str]]:
    """Encode one block of records into `<tmp>/<n>.*` files: (records written, problems)."""
    n, kind, a, b, first = job
    enc, root, columns, on_error, path, tmp = (_JOB[k] for k in ("enc", "root", "columns", "on_error", "path", "tmp"))
    if kind == "lines":
        with open(path, "rb") as f:
            f.seek(a)
            records = jsonl_records(f.read(b - a), first)
    else:
        records = _JOB["records"][a:b]
    ids, labels, lens, lines, nimg, imgs = (array("i") for _ in range(6))
    problems, seen, names = [], {}, {}
    for line, rec in records:
        try:
            ex = parse_record(rename_columns(rec, columns) if not isinstance(rec, ValueError) else rec,
                              root, enc, lazy=seen)
        except ValueError as e:
            problems.append(f"{where(path, line)}: {e}")
            if on_error == "fail":
                break
            continue
        ids.extend(ex.input_ids)
        labels.extend(ex.labels)
        lens.append(len(ex.input_ids))
        lines.append(line)
        nimg.append(len(ex.images))
        imgs.extend(names.setdefault(str(p), len(names)) for p in ex.images)
    for name, arr in (("ids", ids), ("labels", labels), ("lens", lens), ("lines", lines), ("nimg", nimg),
                      ("imgs", imgs)):
        with open(tmp / f"{n}.{name}", "wb") as f:
            arr.tofile(f)
    (tmp / f"{n}.names.json").write_text(json.dumps(list(names)))
    return len(lens), problems


def _join(tmp: Path, blocks: int, out: Path) -> None:
    """Join the blocks' files, in file order, into the entry's arrays (image indices made global)."""
    names: dict = {}
    with (open(out / "ids.bin", "wb") as ids, open(out / "labels.bin", "wb") as labels,
          open(out / "lens.bin", "wb") as lens, open(out / "lines.bin", "wb") as lines,
          open(out / "nimg.bin", "wb") as nimg, open(out / "imgs.bin", "wb") as imgs):
        for n in range(blocks):
            for name, f in (("ids", ids), ("labels", labels), ("lens", lens), ("lines", lines), ("nimg", nimg)):
                with open(tmp / f"{n}.{name}", "rb") as src:
                    shutil.copyfileobj(src, f)
            local = [names.setdefault(s, len(names)) for s in json.loads((tmp / f"{n}.names.json").read_text())]
            idx = np.fromfile(tmp / f"{n}.imgs", dtype=np.int32)
            if len(idx):
                np.asarray(local, dtype=np.int32)[idx].tofile(imgs)
    (out / "images.json").write_text(json.dumps(list(names)))


def _array(path: Path, dtype) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)


class EncodedRecords:
    """A cache entry read back: a sequence of Examples (made on demand from the memory maps) and their lengths."""

    def __init__(self, folder: Path, source: Path):
        self.folder, self.source = folder, source
        self.ids, self.labels = _array(folder / "ids.bin", np.int32), _array(folder / "labels.bin", np.int32)
        self.lengths = np.fromfile(folder / "lens.bin", dtype=np.int32)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        self.lines = _array(folder / "lines.bin", np.int32)
        nimg = np.fromfile(folder / "nimg.bin", dtype=np.int32)
        self.img_offsets = np.concatenate([[0], np.cumsum(nimg, dtype=np.int64)])
        self.imgs = _array(folder / "imgs.bin", np.int32)
        self.images = json.loads((folder / "images.json").read_text())
        skipped = folder / "skipped.txt"
        self.problems = skipped.read_text().splitlines() if skipped.is_file() else []

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Example:
        a, b = self.offsets[i], self.offsets[i + 1]
        imgs = [Path(self.images[k]) for k in self.imgs[self.img_offsets[i]:self.img_offsets[i + 1]]]
        return Example(self.ids[a:b].tolist(), self.labels[a:b].tolist(), imgs,
                       {"where": where(self.source, int(self.lines[i]))})


def cacheable(path: str | Path) -> bool:
    """Whether a data source is encoded into the cache: local JSON / JSONL files (tables are encoded in memory)."""
    return Path(path).is_file() and not is_table(path)


def encode_cached(path: str | Path, encoder, cache_dir: str | Path, on_error: str = "fail", num_proc: int = 0,
                  columns: dict | None = None, image_root: str | Path | None = None,
                  progress=None) -> tuple[EncodedRecords, list[str], bool]:
    """The encoded records of a JSON / JSONL file, from the cache or encoded now with `num_proc` processes (0:
    one per CPU, up to 8, one for a small file): (records, skipped records' problems, whether from the cache).
    `progress(blocks done, blocks)` hears the encoding's progress."""
    p = Path(path)
    root = Path(image_root) if image_root else p.parent
    digest, blocks = _scan(p)
    folder = Path(cache_dir).expanduser() / cache_name(digest, encoder, root, columns)
    hit = (folder / "meta.json").is_file()
    if not hit:
        _encode(p, encoder, root, columns, on_error, num_proc, blocks, folder, progress)
    recs = EncodedRecords(folder, p)
    if recs.problems and on_error == "fail":  # the entry was made with on_error=skip
        raise UserError(recs.problems[0])
    if not len(recs):
        raise UserError(f"{p}: no usable record" + ("" if recs.problems else " (the data set is empty)"))
    return recs, recs.problems, hit


def _encode(p, encoder, root, columns, on_error, num_proc, blocks, folder, progress) -> None:
    import multiprocessing as mp
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "blocks").mkdir(parents=True)
    _JOB.update(enc=encoder, root=root, columns=columns, on_error=on_error, path=p, tmp=tmp / "blocks")
    if is_json_list(p):  # one JSON document: parsed here, handed out by index
        records = read_records(p)
        _JOB["records"] = records
        step = max(1, len(records) // 64)
        jobs = [(i, "list", a, a + step, 0) for i, a in enumerate(range(0, len(records), step))]
    else:
        jobs = [(i, "lines", a, b, first) for i, (a, b, first) in enumerate(blocks)]
    procs = num_proc or (1 if p.stat().st_size < 2 * BLOCK else min(8, os.cpu_count() or 1))
    problems = []
    try:
        if procs > 1 and len(jobs) > 1:
            with mp.get_context("fork").Pool(min(procs, len(jobs))) as pool:
                _run(pool.imap(_encode_block, jobs), len(jobs), on_error, problems, progress)
        else:
            _run(map(_encode_block, jobs), len(jobs), on_error, problems, progress)
        _join(tmp / "blocks", len(jobs), tmp)
        if problems:
            (tmp / "skipped.txt").write_text("\n".join(problems) + "\n")
        shutil.rmtree(tmp / "blocks")
        (tmp / "meta.json").write_text(json.dumps({"source": str(p), "version": VERSION}))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (a multi-process run) wrote the same entry first
            pass
    finally:
        _JOB.clear()
        shutil.rmtree(tmp, ignore_errors=True)


def _run(results, n: int, on_error: str, problems: list, progress) -> None:
    """Collect the blocks' results in file order; with on_error=fail the first problem ends the encoding."""
    for done, (_, found) in enumerate(results, 1):
        if found and on_error == "fail":
            raise UserError(found[0])
        problems += found
        if progress:
            progress(done, n)

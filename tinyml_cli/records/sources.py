"""Data sources: JSON / JSONL files, parquet files and folders, `datasets` folders and hub ids; column mapping.

Tables are read through `datasets` / pyarrow (the `datasets` extra) in arrow form, so image columns arrive as
`{"bytes", "path"}` structs, never decoded here. A hub id is `owner/name` or `owner/name:split` (split train by
default), looked up only when HF_HUB_OFFLINE is not set.
"""


from __future__ import annotations

import json
import os
from pathlib import Path

from .. import UserError

TABLE_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk leaves


def _need_datasets():
    try:
        import datasets
        return datasets
    except ImportError:
        raise UserError("parquet, `datasets` folders and hub ids need the datasets extra: "
                        "pip install 'tinyml-cli[datasets]'") from None


def is_hub_id(source: str) -> bool:
    name = source.split(":", 1)[0]
    return (name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name).suffix
            and not Path(name).exists())


def is_table(source: str | Path) -> bool:
    """A parquet file, a folder of parquet files or a save_to_disk folder (JSON / JSONL files are not)."""
    p = Path(source)
    if p.is_file():
        return p.suffix == ".parquet"
    return p.is_dir()


def _split(ds, source: str, split: str | None):
    """One split of a DatasetDict (train unless named), a Dataset as it is."""
    if not hasattr(ds, "keys"):
        return ds
    want = split or ("train" if "train" in ds else next(iter(ds)) if len(ds) == 1 else None)
    if want not in ds:
        raise UserError(f"{source}: no split '{want}' (splits: {', '.join(ds)})")
    return ds[want]


def is_saved_dataset(p: Path) -> bool:
    """A folder `datasets`' save_to_disk wrote."""
    return p.is_dir() and any((p / m).is_file() for m in TABLE_MARKERS)


def parquet_files(p: Path) -> list[str]:
    """A parquet file, or the parquet files under a folder (sorted); a folder without any is an error."""
    files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
    if not files:
        raise UserError(f"{p}: no parquet file and no `datasets` folder (save_to_disk) here")
    return [str(f) for f in files]


def table_records(source: str | Path) -> list[tuple[int, dict]]:
    """(row number from 1, record) pairs of a parquet file / folder, a save_to_disk folder or a hub id."""
    datasets = _need_datasets()
    src = str(source)
    p = Path(src)
    if is_saved_dataset(p):
        ds = _split(datasets.load_from_disk(src), src, None)
    elif p.is_dir() or p.suffix == ".parquet":
        ds = datasets.Dataset.from_parquet(parquet_files(p))
    else:  # a hub id
        if _offline():
            raise UserError(source_problem(src))
        name, _, split = src.partition(":")
        try:
            ds = _split(datasets.load_dataset(name, split=split or "train"), src, split or None)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"cannot load data set {src}: {e}") from None
    table = ds.with_format("arrow")[:]  # arrow rows keep image columns as {"bytes", "path"}, undecoded
    return list(enumerate(table.to_pylist(), 1))


def rename_columns(record, columns: dict) -> dict:
    """Apply a recipe's `data.columns` ({tinyml field: column of the data set}) to one record."""
    if not columns or not isinstance(record, dict):
        return record
    out = {k: v for k, v in record.items() if k not in columns.values()}
    for field, column in columns.items():
        if column in record:
            out[field] = record[column]
    return out


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"


def source_problem(source: str | Path) -> str | None:
    """Why a data source cannot be read, found without reading it (None: it can be tried)."""
    src = str(source)
    if Path(src).exists():
        return None
    if is_hub_id(src):
        return (f"data file not found: {src} (HF_HUB_OFFLINE is set, so it is not looked up on the hub)"
                if _offline() else None)
    return f"data file not found: {src}"


def read_records(path: str | Path) -> list[tuple[int, dict | ValueError]]:
    """(line or index, record) pairs from a JSON list or a JSONL file; a broken JSONL line is a ValueError."""
    if is_table(path) or is_hub_id(str(path)):
        return table_records(path)
    p = Path(path)
    if not p.is_file():
        raise UserError(source_problem(p) or f"data file not found: {p}")
    raw = p.read_bytes()
    if p.suffix == ".json" or raw.lstrip()[:1] == b"[":
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise UserError(f"{p}: not UTF-8 text at line {line}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: malformed JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(data, list):
            raise UserError(f"{p}: a JSON data file must hold a list of records")
        return list(enumerate(data, 1))
    return list(jsonl_records(raw))


def is_json_list(path: str | Path) -> bool:
    """A .json file, or any file whose text opens with `[`: one JSON list (else a file is JSONL)."""
    p = Path(path)
    if p.suffix == ".json":
        return True
    with open(p, "rb") as f:
        return f.read(4096).lstrip()[:1] == b"["


def jsonl_records(raw: bytes, first_line: int = 1):
    """(line, record) pairs of JSONL text whose first line is `first_line`; a broken line is a ValueError."""
    for i, line in enumerate(raw.split(b"\n"), first_line):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            yield i, ValueError("not UTF-8 text")
        except json.JSONDecodeError as e:
            yield i, ValueError(f"malformed JSON: {e.msg}")


def where(p: Path, line: int) -> str:
    """How messages name record `line` of a data source: file:line for JSONL, else record / row N."""
    if p.suffix == ".jsonl" or (p.is_file() and p.suffix not in (".json", ".parquet")):
        return f"{p}:{line}"
    return f"{p} record {line}" if p.suffix == ".json" else f"{p} row {line}"


def check_all(path: str | Path, parse, columns: dict | None = None, what: str = "record",
              records: list | None = None) -> tuple[int, list[str]]:
    """Every problem `parse(record)` finds in a data source at once, where training (`parse_all`) stops at the
    first: (records, problems), an empty data set or one with no usable record being a problem too."""
    p = Path(path)
    records = read_records(path) if records is None else records
    problems = []
    for line, rec in records:
        try:
            if isinstance(rec, ValueError):
                raise rec
            parse(rename_columns(rec, columns))
        except ValueError as e:
            problems.append(f"{where(p, line)}: {e}")
    if len(problems) == len(records):  # what parse_all says of it
        problems.append(f"{p}: no usable {what}" + (" (the data set is empty)" if not records else ""))
    return len(records), problems


def parse_all(path: str | Path, parse, on_error: str = "fail", columns: dict | None = None,
              what: str = "record") -> tuple[list, list[str]]:
    """`parse(record) -> item` over every record of a data source (columns renamed by `data.columns`); a
    record that raises ValueError fails the whole load naming it, or with on_error=skip is listed and left out.
    Each item's `meta["where"]` names its record."""
    p = Path(path)
    items, skipped = [], []
    records = read_records(path)
    for line, rec in records:
        try:
            if isinstance(rec, ValueError):
                raise rec
            item = parse(rename_columns(rec, columns))
        except ValueError as e:
            if on_error == "fail":
                raise UserError(f"{where(p, line)}: {e}") from None
            skipped.append(f"{where(p, line)}: {e}")
            continue
        item.meta["where"] = where(p, line)
        items.append(item)
    if not items:
        raise UserError(f"{p}: no usable {what}" + (" (the data set is empty)" if not records else ""))
    return items, skipped

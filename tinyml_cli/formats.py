"""Data sources and layouts beyond JSON / JSONL: parquet, `datasets` folders and hub ids; column mapping; TRL
preference records.

Tables are read through `datasets` / pyarrow (the `datasets` extra) in arrow form, so image columns arrive as
`{"bytes", "path"}` structs, never decoded here; `data.image_paths` turns bytes, PIL images and paths into
image sources. A hub id is `owner/name` or `owner/name:split` (split train by default), looked up only when
HF_HUB_OFFLINE is not set.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import UserError

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


def table_records(source: str | Path) -> list[tuple[int, dict]]:
    """(row number from 1, record) pairs of a parquet file / folder, a save_to_disk folder or a hub id."""
    datasets = _need_datasets()
    src = str(source)
    p = Path(src)
    if p.is_dir() and any((p / m).is_file() for m in TABLE_MARKERS):
        ds = _split(datasets.load_from_disk(src), src, None)
    elif p.is_dir() or p.suffix == ".parquet":
        files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
        if not files:
            raise UserError(f"{p}: no parquet file and no `datasets` folder (save_to_disk) here")
        ds = datasets.Dataset.from_parquet([str(f) for f in files])
    else:  # a hub id
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise UserError(f"data file not found: {src} (HF_HUB_OFFLINE is set, so it is not looked up on the hub)")
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


def _text(content, role: str) -> str:
    from .data import content_text
    return content_text(content, role)


def preference_record(record: dict) -> dict:
    """A TRL-style preference record as tinyml's preference form {"image", "prompt", "chosen", "rejected"}.

    Takes the standard form (prompt / chosen / rejected strings), the conversational one (lists of messages
    whose content may be OpenAI parts with {"type": "image"}; multi-turn prompts stay a list of text
    messages), and the implicit-prompt conversational form (chosen / rejected full conversations sharing their
    first turns). `images` or `image` carry the images; a prompt with images but no `<image>` placeholder gets
    them in front of its first user turn, one per image. Other fields (id, type...) are kept.
    """
    from . import IMAGE_TOKEN
    if not isinstance(record, dict):
        raise ValueError("record is not a JSON object")
    chosen, rejected, prompt = record.get("chosen"), record.get("rejected"), record.get("prompt")
    if chosen is None or rejected is None:
        raise ValueError("a preference record needs 'chosen' and 'rejected'")
    if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        n = 0  # implicit prompt: the turns both conversations share
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if prompt is None:
        raise ValueError("a preference record needs a 'prompt'")
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, dict) and t.get("role") in ("system", "user", "assistant")
                                 for t in prompt):
            raise ValueError("prompt: a list of {'role', 'content'} messages is expected")
        prompt = [{"role": t["role"], "content": _text(t.get("content"), t["role"])} for t in prompt]
    elif not isinstance(prompt, str):
        raise ValueError(f"prompt is not text: {prompt!r}"[:120])

    def answer(x, name):
        if isinstance(x, list):  # conversational: the assistant turn(s)
            x = "\n".join(_text(t.get("content"), "assistant") for t in x if isinstance(t, dict))
        if not isinstance(x, str) or not x.strip():
            raise ValueError(f"'{name}' is empty or not text")
        return x

    images = record.get("images", record.get("image"))
    images = [] if images is None else images if isinstance(images, list) else [images]
    if isinstance(prompt, str):
        if images and IMAGE_TOKEN not in prompt:
            prompt = f"{IMAGE_TOKEN}\n" * len(images) + prompt
    elif images and not any(IMAGE_TOKEN in t["content"] for t in prompt):
        first = next((i for i, t in enumerate(prompt) if t["role"] == "user"), None)
        if first is None:
            raise ValueError("prompt: no user turn to hold the image")
        prompt[first]["content"] = f"{IMAGE_TOKEN}\n" * len(images) + prompt[first]["content"]
    rest = {k: v for k, v in record.items() if k not in ("images", "image", "prompt", "chosen", "rejected")}
    return {**rest, "image": images, "prompt": prompt, "chosen": answer(chosen, "chosen"),
            "rejected": answer(rejected, "rejected")}

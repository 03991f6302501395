"""Output folders: a command never silently mixes its files into, or replaces, an earlier output, never deletes
its own inputs, and a command that fails before writing anything leaves no folder behind."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from .. import UserError


def prepare_output(out: str | Path, resume: bool = False, overwrite: bool = False, marker: str = "config.yaml",
                   holds: str = "a run", inputs=()) -> Path:
    """An output folder holding `marker` (a run's config.yaml, a model's tinyml_model.json) needs --resume to be
    continued or --overwrite to be replaced; with marker "" any non-empty folder counts. An output folder that
    is, or holds, one of the command's `inputs` is refused (--overwrite would delete it)."""
    out = Path(out)
    for src in inputs:
        s, o = Path(src).resolve(), out.resolve()
        if s == o or o in s.parents:
            raise UserError(f"the output folder {out} holds the input {src}: write to another folder")
    taken = out.is_dir() and ((out / marker).exists() if marker else any(out.iterdir()))
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")
    if taken and not resume:
        if not overwrite:
            hint = "pass --resume to continue it or --overwrite to replace it" if marker == "config.yaml" else \
                "pass --overwrite to replace it"
            raise UserError(f"{out} already holds {holds}: {hint}")
        shutil.rmtree(out)
    return out


@contextlib.contextmanager
def removed_if_left_empty(out: str | Path):
    """On failure, remove the output folder again if this command made it and it holds nothing worth keeping: no
    file, or only the config.yaml (and empty files, such as a metrics.jsonl opened for the first step) of a run
    that failed before its first step logged anything."""
    out = Path(out)
    existed = out.exists()
    try:
        yield out
    except BaseException:
        if not existed and out.is_dir() and all(p.name == "config.yaml" or p.stat().st_size == 0
                                                for p in out.rglob("*") if p.is_file()):
            shutil.rmtree(out, ignore_errors=True)
        raise

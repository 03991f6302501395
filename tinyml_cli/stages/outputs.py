"""Output folders: a command never silently mixes its files into, or replaces, an earlier output."""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import UserError


def prepare_output(out: str | Path, resume: bool = False, overwrite: bool = False, marker: str = "config.yaml",
                   holds: str = "a run") -> Path:
    """An output folder holding `marker` (a run's config.yaml, a model's tinyml_model.json) needs --resume to be
    continued or --overwrite to be replaced; with marker "" any non-empty folder counts."""
    out = Path(out)
    taken = out.is_dir() and ((out / marker).exists() if marker else any(out.iterdir()))
    if taken and not resume:
        if not overwrite:
            hint = "pass --resume to continue it or --overwrite to replace it" if marker == "config.yaml" else \
                "pass --overwrite to replace it"
            raise UserError(f"{out} already holds {holds}: {hint}")
        shutil.rmtree(out)
    return out

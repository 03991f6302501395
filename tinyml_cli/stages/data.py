"""data validate: every problem of a data set at once, with token lengths when the recipe names a tokenizer."""

from __future__ import annotations

from pathlib import Path


def run_validate(file: str | Path, cfg) -> dict:
    """Records, fields, images (fully decoded) and placeholders; with model.llm + model.vision (or
    model.init_from) set, token lengths and truncation too. The result lists the problems."""
    from ..core.model import recipe_encoder
    from ..records.conversations import validate
    enc = recipe_encoder(cfg) if cfg.model.init_from or cfg.model.llm or cfg.model.vlm else None
    n, problems = validate(file, enc, cfg.data.columns)
    return {"command": "data validate", "output_dir": None, "artifacts": {}, "problems": problems,
            "metrics": {"records": n, "problems": len(problems), "tokens_checked": enc is not None}}

"""data validate: every problem of a data set at once, as training would report it, with token lengths when the
recipe names a tokenizer. A data set of preference records (chosen / rejected) is checked as reward, dpo and
ppo read it; any other as conversations, as pretrain-align and sft read them."""

from __future__ import annotations

from pathlib import Path


def run_validate(file: str | Path, cfg) -> dict:
    """Records, fields, images (fully decoded), placeholders and an empty data set; with model.llm + model.vision
    (or model.init_from) set, token lengths and truncation too. The result lists the problems."""
    from ..records.conversations import validate
    from ..records.preferences import is_preference_record, validate_pairs
    from ..records.sources import read_records, rename_columns
    enc = None
    if cfg.model.init_from or cfg.model.llm or cfg.model.vlm:
        from ..core.model import recipe_encoder
        enc = recipe_encoder(cfg)
    records = read_records(file)
    first = next((rename_columns(r, cfg.data.columns) for _, r in records if isinstance(r, dict)), None)
    kind = "preference" if is_preference_record(first) else "conversation"
    check = validate_pairs if kind == "preference" else validate
    n, problems = check(file, enc, cfg.data.columns, records=records)
    return {"command": "data validate", "output_dir": None, "artifacts": {}, "problems": problems,
            "metrics": {"records": n, "problems": len(problems), "kind": kind, "tokens_checked": enc is not None}}

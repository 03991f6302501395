"""train.report_to: the run's metrics also go to accelerate's trackers (TensorBoard, W&B in offline mode).

metrics.jsonl is always written; trackers are extra views of the same records. Their files go under the run
folder: TensorBoard events in RUN/tinyml/, W&B's offline run in RUN/wandb/ (`wandb sync` uploads it later).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .. import UserError

EXTRA = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


PROJECT = "tinyml"


def trackers(report_to: list) -> list[str]:
    """The checked tracker names; W&B is set to offline mode unless the user chose a mode."""
    names = [n for n in report_to if n not in ("", "none")]
    for n in names:
        if n not in EXTRA:
            raise UserError(f"train.report_to: unknown tracker '{n}' (choose tensorboard or wandb)")
        if not any(importlib.util.find_spec(m) for m in EXTRA[n]):
            raise UserError(f"train.report_to={n} needs the {n} extra: pip install 'tinyml-cli[{n}]'")
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")
    return names


def hparams(tcfg) -> dict:
    """The train section as flat scalars (TensorBoard's hparams take no lists)."""
    import dataclasses
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dataclasses.asdict(tcfg).items()}


def start(acc, names: list[str], tcfg, out_dir: Path) -> None:
    if names:
        acc.init_trackers(PROJECT, config=hparams(tcfg),
                          init_kwargs={"wandb": {"dir": str(out_dir), "name": out_dir.name}})


def log(acc, names: list[str], record: dict) -> None:
    if names:
        acc.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=record["step"])

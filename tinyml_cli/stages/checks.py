"""What a command can check before it loads any model: its data sources, model folders and reward model.

Torch-free and quick, so that a mistyped path costs a second instead of a model load, and is reported before
the output folder is touched (with --overwrite, before the old run is deleted).
"""

from __future__ import annotations

from pathlib import Path

from .. import UserError
from ..config import RunConfig, model_source_problem
from ..records.sources import source_problem

# What each training command reads from data.train (said when it is not set).
TRAIN_DATA = {"pretrain-align": "image captions as LLaVA-format conversations (JSON / JSONL)",
              "sft": "a LLaVA-format JSON / JSONL file",
              "reward": "a preference JSONL: image, prompt, chosen, rejected",
              "dpo": "a preference JSONL: image, prompt, chosen, rejected",
              "ppo": "preference records; their prompts are the rollout prompts",
              "halva": "preference pairs whose answers differ in the hallucinated phrase",
              "bitdelta compress": "calibration conversations, a LLaVA-format JSON / JSONL file"}
USES_EVAL = ("reward", "dpo", "halva", "bitdelta compress")  # the training commands that read data.eval


def check_model_dir(path: str | Path, what: str = "") -> None:
    if not (Path(path) / "tinyml_model.json").is_file():
        raise UserError(f"{what}not a tinyml model folder (no tinyml_model.json): {path}")


def check_source(key: str, source: str) -> None:
    problem = source_problem(source)
    if problem:
        raise UserError(f"{key}: {problem}")


def check_model(mcfg) -> None:
    """model.init_from is a tinyml folder, or model.llm and model.vision are folders or (cached) hub ids."""
    if mcfg.init_from:
        check_model_dir(mcfg.init_from, "model.init_from: ")
        return
    for key in ("llm", "vision"):
        value = getattr(mcfg, key)
        if not value:
            raise UserError(f"model.{key} is not set (a hub id or a local folder), nor model.init_from")
        problem = model_source_problem(value)
        if problem:
            raise UserError(f"model.{key}={value}: {problem}")


def check_run(cfg: RunConfig, command: str) -> None:
    """Everything a training command needs that exists before any model is loaded."""
    if not cfg.data.train:
        raise UserError(f"data.train is not set ({TRAIN_DATA[command]})")
    check_source("data.train", cfg.data.train)
    if cfg.data.streaming:
        from ..records.stream import streamable
        if command not in ("sft", "pretrain-align"):
            raise UserError(f"data.streaming is read by sft and pretrain-align; {command} reads its data in memory")
        if not streamable(cfg.data.train):
            raise UserError(f"data.streaming reads parquet, `datasets` folders and hub ids, not {cfg.data.train} (a JSON / "
                            "JSONL file is encoded once into data.cache_dir, which keeps no copy of its images)")
    if cfg.data.eval and command in USES_EVAL:
        check_source("data.eval", cfg.data.eval)
    if command != "bitdelta compress":  # it loads BASE and FINETUNED, not the recipe's model
        check_model(cfg.model)
    if command == "ppo" and cfg.ppo.reward != "exact_match" and not (Path(cfg.ppo.reward) / "reward_head.safetensors").is_file():
        raise UserError(f"ppo.reward={cfg.ppo.reward}: neither exact_match nor a reward model folder "
                        f"(no reward_head.safetensors; `tinyml reward` makes one)")


def run_inputs(cfg: RunConfig) -> list[str]:
    """The paths a training run reads: its output folder may not be, or hold, one of them."""
    return [p for p in (cfg.model.init_from, cfg.data.train, cfg.data.eval,
                        cfg.ppo.reward if cfg.ppo.reward != "exact_match" else "") if p]

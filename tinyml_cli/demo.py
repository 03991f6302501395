"""demo: the whole pipeline on the tiny default, offline, on CPU in a few minutes.

build-tiny -> data synth-shapes -> pretrain-align -> eval (before) -> sft -> eval (after), with the shipped
tiny recipes; prints a before/after table of held-out accuracy per question type.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.table import Table

from . import ui
from .config import load_config

N_TRAIN, N_EVAL = 8000, 200
QUICK_TINY = {"llm_steps": 3, "vision_steps": 3, "n_scenes": 300}


def _eval(folder: Path, cfg) -> dict:
    import json

    from .evaluate import evaluate_model
    from .model import load_model
    metrics, _ = evaluate_model(load_model(folder), cfg.data.eval, cfg)
    # beside the run's metrics.jsonl, where `tinyml report` finds it for its eval table
    (folder / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _preference(out: Path, con, quick: bool):
    from .pref_demo import run_preference_stages
    return run_preference_stages(out, out / "sft", con, quick)


def _edge(out: Path, con, quick: bool):
    from .edge import edge_demo_metrics
    t = time.time()
    with con.status("export: ONNX fp32 and int4, hf-llava; greedy parity and held-out accuracy..."):
        m = edge_demo_metrics(out / "sft", out / "shapes" / "eval.jsonl", out / "edge")
    return m, {"edge": time.time() - t}, {"onnx": str(out / "edge" / "onnx"), "onnx_int4": str(out / "edge" / "onnx-int4"),
                                          "hf_llava": str(out / "edge" / "hf-llava")}


def _bitdelta(out: Path, con, quick: bool):
    """BitDelta's use case: several fine-tunes kept over one base. Here the DPO run as a 1-bit delta over the sft
    model it started from (align -> sft is the tiny LLM learning the task from scratch, not a fine-tune)."""
    from .bitdelta_run import bitdelta_demo_metrics
    shutil.rmtree(out / "bitdelta", ignore_errors=True)
    t = time.time()
    with ui.training_bar(con, "bitdelta scale distillation") as bar:
        m = bitdelta_demo_metrics(out / "sft", out / "dpo", out / "shapes" / "train.jsonl", out / "shapes" / "eval.jsonl",
                                  out / "bitdelta", progress=bar)
    return m, {"bitdelta": time.time() - t}, {"bitdelta": str(out / "bitdelta")}


# Stages `--full` adds after sft, in order: each takes (out, console, quick) and returns
# (metrics, seconds per stage, artifacts), merged into the demo's result.
FULL_STAGES = [_preference, _edge, _bitdelta]


def run_demo(out: str | Path, con, quick: bool = False, full: bool = False) -> dict:
    from .sft import run_sft
    from .synth import synth_shapes
    from .tiny import build_tiny

    t0 = time.time()
    out = Path(out)
    for sub in ("tiny", "shapes", "align", "sft"):
        shutil.rmtree(out / sub, ignore_errors=True)
    seconds = {}
    with con.status("building the tiny default (tokenizer, LLM and vision pretraining)..."):
        tiny = build_tiny(out / "tiny", **(QUICK_TINY if quick else {}))
    seconds["build_tiny"] = time.time() - t0
    t = time.time()
    files = synth_shapes(out / "shapes", n=48 if quick else N_TRAIN, n_eval=4 if quick else N_EVAL)
    steps = ["train.max_steps=3", "train.batch_size=4"] if quick else []
    seconds["data"] = time.time() - t

    paths = [f"model.llm={tiny['llm']}", f"model.vision={tiny['vision']}", f"data.eval={files['eval']}"]
    align_cfg = load_config("tiny_align", paths + [f"data.train={files['captions']}"] + steps)
    t = time.time()
    with ui.training_bar(con, "pretrain-align") as bar:
        align = run_sft(align_cfg, out / "align", "pretrain-align", progress=bar)
    seconds["pretrain_align"] = time.time() - t
    before = _eval(out / "align", align_cfg)

    sft_cfg = load_config("tiny_sft", [f"model.init_from={out / 'align'}", f"data.train={files['train']}",
                                       f"data.eval={files['eval']}"] + steps)
    t = time.time()
    with ui.training_bar(con, "sft") as bar:
        sft = run_sft(sft_cfg, out / "sft", "sft", progress=bar)
    seconds["sft"] = time.time() - t
    t = time.time()
    after = _eval(out / "sft", sft_cfg)
    seconds["eval"] = time.time() - t

    table = Table(title="held-out accuracy: after pretrain-align (before sft) vs after sft")
    for col in ("question type", "before", "after"):
        table.add_column(col)
    for k in after["vqa_accuracy_by_type"]:
        table.add_row(k, f"{before['vqa_accuracy_by_type'].get(k, 0):.3f}", f"{after['vqa_accuracy_by_type'][k]:.3f}")
    table.add_row("[bold]overall", f"{before['vqa_accuracy']:.3f}", f"[bold]{after['vqa_accuracy']:.3f}")
    table.add_row("POPE F1", f"{before.get('pope', {}).get('f1', 0):.3f}", f"{after.get('pope', {}).get('f1', 0):.3f}")
    con.print(table)

    metrics = {
        "vqa_accuracy_before": before["vqa_accuracy"], "vqa_accuracy_after": after["vqa_accuracy"],
        "vqa_accuracy_by_type": after["vqa_accuracy_by_type"],
        "vqa_accuracy_by_type_before": before["vqa_accuracy_by_type"],
        "pope_f1_before": before.get("pope", {}).get("f1", 0.0), "pope_f1_after": after.get("pope", {}).get("f1", 0.0),
        "pope_after": after.get("pope", {}), "align_loss_last": align["metrics"]["loss_last"],
        "sft_loss_first": sft["metrics"]["loss_first"], "sft_loss_last": sft["metrics"]["loss_last"],
        "stage_seconds": seconds, "seconds": time.time() - t0,
    }
    artifacts = {"tiny": str(out / "tiny"), "data": str(out / "shapes"), "align": str(out / "align"),
                 "sft": str(out / "sft")}
    for stage in FULL_STAGES if full else []:
        m, secs, arts = stage(out, con, quick)
        metrics.update(m)
        seconds.update(secs)
        artifacts.update(arts)
    metrics["seconds"] = time.time() - t0
    return {"command": "demo", "output_dir": str(out), "metrics": metrics, "artifacts": artifacts,
            "trainable_params": sft["trainable_params"], "total_params": sft["total_params"]}

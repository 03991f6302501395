"""Every connector on the same data and budget: image tokens, trainable parameters, step time, peak memory, accuracy.

    python benchmarks/connectors.py            # a table
    python benchmarks/connectors.py --json     # one JSON object: {"connectors": [{connector, image_tokens, ...}]}

Builds the tiny default and a shapes data set (as `tinyml demo` does), then, once per connector, the demo's two
stages with the same steps, batches and seed: pretrain-align (the connector alone, on captions) and sft (the
connector and the LLM), and evaluates the result on the held-out split. The xattn connector puts no image token
in the sequence; its gated cross-attention blocks are part of the connector and train with it. Peak memory is
that of a few sft steps, measured by the package's meter (`core.memory.PeakTensorMemory`) in a separate short
run; step time is sft's, from the untracked run. One seed and a small budget: a ranking to read with care.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

CONNECTORS = ["mlp2x_gelu", "resampler", "qformer", "c-abstractor", "xattn"]
SETS = {"resampler": ["model.resampler_queries=16"], "qformer": ["model.qformer_queries=16"],
        "c-abstractor": ["model.connector_tokens=16"], "xattn": ["model.resampler_queries=16"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--out", default="runs/connectors", help="work folder")
    ap.add_argument("--align-steps", type=int, default=150, help="pretrain-align steps per connector")
    ap.add_argument("--sft-steps", type=int, default=400, help="sft steps per connector")
    ap.add_argument("--n-train", type=int, default=2000, help="training images")
    ap.add_argument("--connectors", default=",".join(CONNECTORS), help="comma-separated subset")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # see peft_methods.py: on a shared CPU, one thread per run is the fair figure
    sys.path.insert(0, str(Path(__file__).parent))
    from peft_methods import peak_training_memory
    from rich.table import Table

    from tinyml_cli import ui
    from tinyml_cli.config import load_config
    from tinyml_cli.core.generation import evaluate_model
    from tinyml_cli.core.model import load_model
    from tinyml_cli.demo.synth import synth_shapes
    from tinyml_cli.demo.tiny import build_tiny
    from tinyml_cli.stages.sft import run_sft

    ui.quiet_libraries()
    con = ui.console(args.json)
    out = Path(args.out)
    t0 = time.time()
    with con.status("building the tiny default and the shapes data..."):
        tiny = build_tiny(out / "tiny")
        files = synth_shapes(out / "shapes", n=args.n_train, n_eval=100)
    rows = []
    for kind in args.connectors.split(","):
        base = [f"data.eval={files['eval']}", *SETS.get(kind, [])]
        # stage 1 trains the connector alone, so it compares connectors on the same frozen LLM and tower
        # (tiny_align itself trains the connector and the LLM)
        align = load_config("tiny_align", base + [f"model.llm={tiny['llm']}", f"model.vision={tiny['vision']}",
                                                  f"model.connector={kind}", f"data.train={files['captions']}",
                                                  f"train.max_steps={args.align_steps}", "train.parts=[connector]"])
        with ui.training_bar(con, f"{kind} align") as bar:
            run_sft(align, out / kind / "align", "pretrain-align", progress=bar)
        sets = base + [f"model.init_from={out / kind / 'align'}", f"data.train={files['train']}",
                       f"train.max_steps={args.sft_steps}", "train.parts=[connector,llm]"]
        cfg = load_config("tiny_sft", sets)
        with ui.training_bar(con, f"{kind} sft") as bar:
            r = run_sft(cfg, out / kind / "sft", "sft", progress=bar)
        model = load_model(out / kind / "sft")
        metrics, _ = evaluate_model(model, cfg.data.eval, cfg)
        peak = peak_training_memory(load_config("tiny_sft", sets), out / kind / "memory")
        m = r["metrics"]
        rows.append({"connector": kind, "image_tokens": model.num_image_tokens,
                     "connector_params": sum(p.numel() for p in model.connector.parameters()),
                     "trainable_params": r["trainable_params"], "peak_memory_mb": peak / 2**20,
                     "step_time_s": m["train_seconds"] / m["steps"], "sft_loss_last": m["loss_last"],
                     "vqa_accuracy": metrics["vqa_accuracy"], "vqa_accuracy_by_type": metrics["vqa_accuracy_by_type"]})
        con.print(json.dumps(rows[-1]))

    table = Table(title=f"connectors on the tiny default: {args.align_steps} align + {args.sft_steps} sft steps")
    for col in ("connector", "image tokens", "connector params", "peak memory (MB)", "sft step (s)", "held-out VQA"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["connector"], str(r["image_tokens"]), f"{r['connector_params']:,}",
                      f"{r['peak_memory_mb']:.1f}", f"{r['step_time_s']:.3f}", f"{r['vqa_accuracy']:.3f}")
    con.print(table)
    if args.json:
        sys.stdout.write(json.dumps({"command": "benchmarks/connectors.py", "align_steps": args.align_steps,
                                     "sft_steps": args.sft_steps, "seconds": time.time() - t0,
                                     "connectors": rows}) + "\n")


if __name__ == "__main__":
    main()

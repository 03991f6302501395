"""Every peft.method on the same data, measured: trainable parameters, peak memory, step time, loss, accuracy.

    python benchmarks/peft_methods.py            # a table
    python benchmarks/peft_methods.py --json     # one JSON object: {"methods": [{method, trainable_params, ...}]}

Builds the tiny default, a shapes data set and one pretrain-align run (as `tinyml demo` does), then runs sft
from that aligned model once per method, with the same steps, batches and seed, and evaluates each saved
result on the held-out split. Each method trains only its own parameters (train.parts=[]), so the count is
the method's: `full` trains every weight, `freeze` the connector and the LLM. `bitfit` trains the biases of
the vision tower and the connector, because the tiny default's Llama has none. Learning rates are per method
(LR below), each a usual value for the method, not tuned here.

Peak memory is the largest total size of the tensors alive at once during a few training steps (weights,
gradients, optimizer state, activations), counted by the package's meter (`core.memory.PeakTensorMemory`, which
sees every tensor an operation makes or uses and lets go of it when its storage is freed). It is not the process RSS (which adds the Python
and library footprint and the allocator's caching), and it runs as a separate short run, since the tracking
slows the operations down; step time comes from the untracked run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

METHODS = ["full", "freeze", "lora", "dora", "qlora", "ia3", "bitfit", "adapter", "prompt-tuning", "prefix-tuning",
           "llama-adapter", "tinytl"]
LR = {"full": 1e-3, "freeze": 1e-3, "lora": 3e-3, "dora": 3e-3, "qlora": 3e-3, "ia3": 1e-2, "bitfit": 3e-3,
      "adapter": 3e-3, "prompt-tuning": 3e-2, "prefix-tuning": 3e-2, "llama-adapter": 3e-2, "tinytl": 3e-3}
SETS = {"full": [], "freeze": ["train.parts=[connector,llm]"], "bitfit": ["peft.parts=[vision,connector]"],
        "llama-adapter": ["peft.adapter_layers=2"]}


def peak_training_memory(cfg, out: Path, steps: int = 3) -> int:
    """Peak tensor bytes of a few sft steps of this recipe (model loaded first, then measured)."""
    from tinyml_cli.core.batching import Collator, ImageLoader
    from tinyml_cli.core.loop import ExampleBatches, sft_step, train
    from tinyml_cli.core.memory import PeakTensorMemory
    from tinyml_cli.core.model import build_model
    from tinyml_cli.core.trainable import configure_trainable, quantization_config
    from tinyml_cli.records.conversations import load_examples
    from tinyml_cli.records.encoder import Encoder

    cfg.train.max_steps = steps
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, quantization_config=quantization_config(cfg, torch.float32))
    configure_trainable(model, cfg)
    enc = Encoder(model.tokenizer, model.num_image_tokens, cfg.data.max_length)
    examples, _ = load_examples(cfg.data.train, enc)
    collate = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor))
    collate(examples[:1])  # warm the image processor outside the measurement
    out.mkdir(parents=True, exist_ok=True)
    with PeakTensorMemory(model, inputs=True) as mem:
        train(model, ExampleBatches(examples, collate), sft_step, cfg.train, out)
    return mem.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--out", default="runs/peft_methods", help="work folder")
    ap.add_argument("--steps", type=int, default=150, help="sft steps per method")
    ap.add_argument("--n-train", type=int, default=1000, help="training images")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not torch.cuda.is_available():
        # One thread: on a shared, busy CPU threads wait on each other (build_tiny took 13.5 min with torch's
        # default threads at a load of 6-9 on 2 cores, 1.5 min with one at a load of 5). Step times are
        # single-thread figures.
        torch.set_num_threads(1)

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
    with con.status("building the tiny default, the shapes data and the aligned model..."):
        tiny = build_tiny(out / "tiny")
        files = synth_shapes(out / "shapes", n=args.n_train, n_eval=100)
        # stage 1 on the connector alone (TinyLLaVA base), as the README's table was measured; tiny_align now
        # trains the connector and the LLM
        align_cfg = load_config("tiny_align", [f"model.llm={tiny['llm']}", f"model.vision={tiny['vision']}",
                                               f"data.train={files['captions']}", f"data.eval={files['eval']}",
                                               "train.parts=[connector]"])
        run_sft(align_cfg, out / "align", "pretrain-align")
    con.print(f"setup: {time.time() - t0:.0f} s")

    rows = []
    for method in args.methods.split(","):
        sets = [f"model.init_from={out / 'align'}", f"data.train={files['train']}", f"data.eval={files['eval']}",
                f"train.max_steps={args.steps}", "train.batch_size=16", f"train.lr={LR[method]}",
                "train.parts=[]", f"peft.method={method}", *SETS.get(method, [])]
        cfg = load_config("tiny_sft", sets)
        with ui.training_bar(con, method) as bar:
            r = run_sft(cfg, out / "sft" / method, "sft", progress=bar)
        metrics, _ = evaluate_model(load_model(out / "sft" / method), cfg.data.eval, cfg)
        peak = peak_training_memory(load_config("tiny_sft", sets), out / "memory" / method)
        m = r["metrics"]
        rows.append({"method": method, "trainable_params": r["trainable_params"], "total_params": r["total_params"],
                     "peak_memory_mb": peak / 2**20, "step_time_s": m["train_seconds"] / m["steps"],
                     "loss_first": m["loss_first"], "loss_last": m["loss_last"],
                     "vqa_accuracy": metrics["vqa_accuracy"], "lr": LR[method]})
        con.print(json.dumps(rows[-1]))

    table = Table(title=f"peft methods on the tiny default: {args.steps} sft steps of 16 records each")
    for col in ("method", "trainable params", "peak memory (MB)", "step time (s)", "loss first -> last",
                "held-out VQA"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["method"], f"{r['trainable_params']:,}", f"{r['peak_memory_mb']:.1f}",
                      f"{r['step_time_s']:.3f}", f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}",
                      f"{r['vqa_accuracy']:.3f}")
    con.print(table)
    if args.json:
        sys.stdout.write(json.dumps({"command": "benchmarks/peft_methods.py", "steps": args.steps,
                                     "seconds": time.time() - t0, "methods": rows}) + "\n")


if __name__ == "__main__":
    main()

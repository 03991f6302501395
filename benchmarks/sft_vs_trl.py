"""SFT throughput and peak memory: tinyml vs TRL's SFTTrainer, LoRA and full, same model / data / batch / length.

    python benchmarks/sft_vs_trl.py --json        (needs `pip install -e ".[bench]"`)

Both sides train the same random-weight LLaVA model (Llama LLM ~32M parameters, 32k vocabulary, SigLIP tower,
mlp2x_gelu connector; see common.py) on the same synthetic shapes conversations, loss on assistant tokens only,
AdamW at the same learning rate, fp32, batch 8, max length 256, no gradient checkpointing. LoRA: r 8, alpha 16,
dropout 0.05 on the LLM's attention and MLP projections, connector trained in full; full: every weight.
Each measurement runs in a fresh process, tinyml and TRL alternating, and the median of the repeats is kept.
`ratios` are tinyml / TRL, the worse of LoRA and full (per-method ratios are under `methods`).
On a CUDA machine the same script runs both sides on the GPU, fp32, peak memory from torch.cuda (MFU: not yet).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import common

ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def tinyml_side(info: dict, a) -> tuple:
    """tinyml's own `sft` path (run_sft: build, encode, train loop), with meters around it."""
    import tinyml_cli.sft as sft
    from tinyml_cli.config import load_config
    counter = common.TokenCounter()  # counted in the step function: run_sft builds the model itself
    step = sft.sft_step

    def counted_step(model, batch):  # the same count as TRL's side: attention-mask sum of each forward
        counter.total += int(batch["attention_mask"].sum())
        return step(model, batch)
    sft.sft_step = counted_step
    sets = [f"model.init_from={info['tinyml']}", f"data.train={info['train']}", f"data.max_length={a.max_length}",
            f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}", f"train.lr={a.lr}",
            "train.scheduler=constant", "train.warmup_ratio=0", "train.log_every=1000", "train.seed=0",
            "model.dtype=fp32", 'train.mixed_precision="no"', f"peft.method={a.method}", "peft.r=8", "peft.alpha=16",
            "peft.dropout=0.05",
            f"peft.target_modules={','.join(common.LORA_TARGETS)}", "train.parts=[connector]"]
    cfg = load_config(None, sets)
    clock = common.StepClock(counter)
    return clock, lambda progress: sft.run_sft(cfg, tempfile.mkdtemp(), "sft", progress=lambda *x: progress())


def trl_side(info: dict, a) -> tuple:
    """TRL's SFTTrainer on the Llava model with its processor, assistant-only loss."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    root = Path(info["train"]).parent
    rows = []
    for line in open(info["train"], encoding="utf-8"):
        rec = json.loads(line)
        msgs = [{"role": ROLES[t["from"]], "content": t["value"].replace("<image>\n", "").replace("<image>", "")}
                for t in rec["conversations"]]
        rows.append({"messages": msgs, "images": [Image.open(root / rec["image"]).convert("RGB")]})
    data = Dataset.from_list(rows)
    processor = AutoProcessor.from_pretrained(info["llava"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlavaForConditionalGeneration.from_pretrained(info["llava"], dtype=torch.float32)
    counter = common.TokenCounter(model)
    clock = common.StepClock(counter)
    peft_config = None
    if a.method == "lora":
        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                 target_modules=r".*language_model.*\.(" + "|".join(common.LORA_TARGETS) + ")",
                                 modules_to_save=["multi_modal_projector"])
    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                     learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, logging_steps=1000, save_strategy="no", report_to="none",
                     gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=device == "cpu",
                     max_length=a.max_length, assistant_only_loss=True, dataloader_num_workers=0, seed=0,
                     disable_tqdm=True)

    class Tick(TrainerCallback):
        def __init__(self, progress):
            self.progress = progress

        def on_step_end(self, *args, **kw):
            self.progress()

    def go(progress):
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=processor,
                             peft_config=peft_config, callbacks=[Tick(progress)])
        trainer.train()
    return clock, go


def worker(a) -> dict:
    """One side, one method, one measurement (speed, or memory under the tensor tracker), in this process."""
    import torch
    info = json.loads((Path(a.work) / "built.json").read_text())
    cuda = torch.cuda.is_available()
    mode = common.LiveTensorBytes() if a.memory and not cuda else None
    if mode:
        mode.__enter__()
    clock, go = (tinyml_side if a.side == "tinyml" else trl_side)(info, a)
    seen = {}

    def progress():
        clock.tick()
        if len(clock.marks) == a.steps and mode:
            seen["peak"] = mode.peak  # load + training steps; not what happens after the last step
    go(progress)
    if mode:
        mode.__exit__(None, None, None)
    out = {"side": a.side, "method": a.method, "steps": len(clock.marks), "peak_rss_bytes": common.peak_rss_bytes()}
    if a.memory:
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else seen["peak"]
    else:
        out["tokens_per_s"] = clock.tokens_per_s(a.warmup)
        out["tokens"] = clock.marks[-1][1] - clock.marks[a.warmup - 1][1]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--work", default="runs/bench", help="cache folder for the built model and data")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per speed run (warm-up included)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--side", choices=["tinyml", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print(json.dumps(worker(a)))
        return
    import torch
    info = common.build(Path(a.work))
    say = (lambda *x: None) if a.json else (lambda *x: print(*x, file=sys.stderr))
    shared = ["--work", a.work, "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
              "--lr", str(a.lr), "--warmup", str(a.warmup)]
    methods = {}
    for method in a.methods.split(","):
        res = {"tinyml": {"tokens_per_s": [], "peak_rss_bytes": []}, "trl": {"tokens_per_s": [], "peak_rss_bytes": []}}
        for r in range(a.repeats):
            for side in (("tinyml", "trl") if r % 2 == 0 else ("trl", "tinyml")):  # alternate who goes first
                o = common.run_side(__file__, shared + ["--side", side, "--method", method, "--steps", str(a.steps)])
                res[side]["tokens_per_s"].append(o["tokens_per_s"])
                res[side]["peak_rss_bytes"].append(o["peak_rss_bytes"])
                say(f"{method} {side} run {r + 1}: {o['tokens_per_s']:.0f} tokens/s")
        for side in ("tinyml", "trl"):
            o = common.run_side(__file__, shared + ["--side", side, "--method", method, "--memory",
                                                    "--steps", str(a.memory_steps)])
            res[side]["peak_memory_bytes"] = o["peak_memory_bytes"]
            say(f"{method} {side} peak tensor memory {o['peak_memory_bytes'] / 2**20:.0f} MiB")
        for side in ("tinyml", "trl"):
            res[side]["tokens_per_s_runs"] = res[side]["tokens_per_s"]
            res[side]["tokens_per_s"] = common.median(res[side]["tokens_per_s"])
            res[side]["peak_rss_bytes"] = common.median(res[side]["peak_rss_bytes"])
        res["ratios"] = {"tokens_per_s": res["tinyml"]["tokens_per_s"] / res["trl"]["tokens_per_s"],
                         "peak_memory": res["tinyml"]["peak_memory_bytes"] / res["trl"]["peak_memory_bytes"],
                         "peak_rss": res["tinyml"]["peak_rss_bytes"] / res["trl"]["peak_rss_bytes"]}
        methods[method] = res
    ratios = {"tokens_per_s": min(m["ratios"]["tokens_per_s"] for m in methods.values()),
              "peak_memory": max(m["ratios"]["peak_memory"] for m in methods.values())}
    import trl
    out = {"benchmark": "sft_vs_trl", "device": "cuda" if torch.cuda.is_available() else "cpu",
           "trl_version": trl.__version__, "model": {k: v for k, v in info.items() if k != "train"},
           "setting": {"batch_size": a.batch_size, "max_length": a.max_length, "steps": a.steps,
                       "warmup": a.warmup, "repeats": a.repeats, "lr": a.lr,
                       "peak_memory": "peak live tensor storage bytes (TorchDispatchMode), load + training steps"},
           "methods": methods, "ratios": ratios}
    print(json.dumps(out, indent=None if a.json else 2))


if __name__ == "__main__":
    main()

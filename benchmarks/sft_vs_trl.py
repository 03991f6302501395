"""SFT throughput and peak memory: tinyml vs TRL's SFTTrainer, LoRA and full, same model / data / batch / length.

    python benchmarks/sft_vs_trl.py --json        (needs `pip install -e ".[bench]"`)

Both sides train the same random-weight LLaVA model (Llama LLM ~32M parameters, 32k vocabulary, SigLIP tower,
mlp2x_gelu connector; see common.py) on the same synthetic shapes conversations, loss on assistant tokens only,
AdamW at the same learning rate, fp32, batch 8, max length 256, no gradient checkpointing. LoRA: r 8, alpha 16,
dropout 0.05 on the LLM's attention and MLP projections, connector trained in full, gradients clipped at 1.0 on
both sides; full: every weight, tinyml with `train.optimizer_in_backward` (each weight's AdamW step taken in the
backward pass, its gradient freed at once), which rules out global-norm clipping, so neither side clips there.
Each measurement runs in a fresh process, tinyml and TRL alternating, and the median of the repeats is kept.
`ratios` are tinyml / TRL, the worse of LoRA and full (per-method ratios are under `methods`).
On a CUDA machine the same script runs both sides on the GPU, fp32, peak memory from torch.cuda (MFU: not yet).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import common

ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def tinyml_side(info: dict, a) -> tuple:
    """tinyml's own `sft` path (run_sft: build, encode, train loop), with meters around it."""
    import tinyml_cli.stages.sft as sft
    from tinyml_cli.config import load_config
    counter = common.TokenCounter()  # counted in the step function: run_sft builds the model itself
    step = sft.sft_step

    def counted_step(model, batch):  # the same count as TRL's side: attention-mask sum of each forward
        counter.total += int(batch["attention_mask"].sum())
        return step(model, batch)
    sft.sft_step = counted_step
    cfg = load_config(None, common.tinyml_sets(info, a, info["train"], a.method, lora_dropout=0.05))
    clock = common.StepClock(counter)
    return clock, lambda progress: sft.run_sft(cfg, tempfile.mkdtemp(), "sft", progress=lambda *x: progress())


def trl_side(info: dict, a) -> tuple:
    """TRL's SFTTrainer on the Llava model with its processor, assistant-only loss."""
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    root = Path(info["train"]).parent
    rows = []
    for line in open(info["train"], encoding="utf-8"):
        rec = json.loads(line)
        msgs = [{"role": ROLES[t["from"]], "content": common.strip_image(t["value"])} for t in rec["conversations"]]
        rows.append({"messages": msgs, "images": [Image.open(root / rec["image"]).convert("RGB")]})
    data = Dataset.from_list(rows)
    processor = AutoProcessor.from_pretrained(info["llava"])
    model = LlavaForConditionalGeneration.from_pretrained(info["llava"], dtype=torch.float32)
    clock = common.StepClock(common.TokenCounter(model))
    args = SFTConfig(**common.trl_args(a, a.method), assistant_only_loss=True)

    def go(progress):
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=processor,
                             peft_config=common.trl_lora(a.method, 0.05), callbacks=[common.tick_callback(progress)])
        trainer.train()
    return clock, go


def main() -> None:
    a = common.start(__doc__, {"tinyml": tinyml_side, "trl": trl_side})
    if a is None:
        return
    import torch
    import trl
    info = common.build(Path(a.work))
    methods = common.compare(__file__, a)
    out = {"benchmark": "sft_vs_trl", "device": "cuda" if torch.cuda.is_available() else "cpu",
           "trl_version": trl.__version__, "model": {k: v for k, v in info.items() if k != "train"},
           "setting": {"batch_size": a.batch_size, "max_length": a.max_length, "steps": a.steps,
                       "warmup": a.warmup, "repeats": a.repeats, "lr": a.lr, "threads": a.threads,
                       "full": common.FULL_SETTING[a.in_backward], "tinyml_chunked_loss": a.chunked_loss,
                       "lora": "gradients clipped at 1.0 on both sides",
                       "peak_memory": "peak live tensor storage bytes (TorchDispatchMode), load + training steps"},
           "methods": methods, "ratios": common.worst(methods)}
    print(json.dumps(out, indent=None if a.json else 2))


if __name__ == "__main__":
    main()

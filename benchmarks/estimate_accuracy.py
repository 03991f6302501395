"""How close `tinyml estimate` is to the measured peak: a grid of method x optimizer x batch x sequence x checkpointing.

Two small models, made here offline: the tiny default (`build_tiny`, a few pretraining steps: the weights'
values do not change memory) and a larger random-weight Llama (GQA, 4 layers, width 256, vocabulary 2048) with
a 64-patch SigLIP tower. Each configuration runs two real training steps of tinyml's model through
`tinyml_cli.core.estimate.measure` (CPU: live tensor storage tracked by a dispatch mode; CUDA:
torch.cuda.max_memory_allocated) and is compared with the estimate's tensor peak for the same device.

    python benchmarks/estimate_accuracy.py            # a table; --json: one JSON object with `rows`
    python benchmarks/estimate_accuracy.py --device cuda --save benchmarks/results/cuda.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Per model: (method, optimizer) x (batch, sequence) x checkpointing. freeze trains the connector alone (LLaVA's
# first stage: gradients flow back through the frozen LLM); the others train the connector and the LLM. qlora and
# the 8-bit optimizers run through bitsandbytes' CPU backend too (paged falls back to plain 8-bit on CPU).
GRID = {"tiny": ([("full", "adamw"), ("freeze", "adamw"), ("lora", "adamw")], [(4, 64), (8, 256)]),
        "small": ([("full", "adamw"), ("freeze", "adamw"), ("lora", "adamw"), ("qlora", "adamw"),
                   ("full", "adamw8bit"), ("lora", "paged_adamw8bit")], [(2, 128), (4, 384)])}


def make_models(root: Path) -> dict:
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from tinyml_cli.demo.tiny import build_tiny
    build_tiny(root / "tiny", llm_steps=1, vision_steps=1, n_scenes=300)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(root / "tiny" / "llm")
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                                       tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    llm.save_pretrained(root / "small" / "llm")
    tok.save_pretrained(root / "small" / "llm")
    vision = SiglipVisionModel(SiglipVisionConfig(image_size=64, patch_size=8, hidden_size=128, intermediate_size=256,
                                                  num_hidden_layers=2, num_attention_heads=4))
    vision.save_pretrained(root / "small" / "vision")
    SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(root / "small" / "vision")
    return {name: root / name for name in GRID}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object with `rows`")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--save", default="", help="also write the JSON object to this file")
    args = ap.parse_args()
    import torch

    from tinyml_cli import ui
    from tinyml_cli.config import load_config
    from tinyml_cli.core.estimate import Setting, estimate, measure
    ui.quiet_libraries()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        # Memory does not depend on the thread count; on a shared, busy CPU one thread runs several times faster
        # than threads that wait on each other.
        torch.set_num_threads(1)
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = make_models(Path(tmp))
        for name, (methods, shapes) in GRID.items():
            for (method, opt), (batch, seq), ckpt in itertools.product(methods, shapes, (False, True)):
                parts = "[connector]" if method == "freeze" else "[connector,llm]"
                cfg = load_config(None, [f"model.llm={models[name] / 'llm'}", f"model.vision={models[name] / 'vision'}",
                                         f"train.parts={parts}", f"peft.method={method}", f"train.optimizer={opt}",
                                         f"train.batch_size={batch}", f"data.max_length={seq}",
                                         f"train.gradient_checkpointing={str(ckpt).lower()}"])
                est = estimate(cfg, Setting(device=device, batch=batch, seq=seq, checkpointing=ckpt, optimizer=opt))
                got = measure(cfg, device=device)["measured_bytes"]
                row = {"config": f"{name} {method} {opt} batch={batch} seq={seq} checkpointing={ckpt}",
                       "model": name, "method": method, "optimizer": opt, "batch": batch, "seq": seq,
                       "checkpointing": ckpt, "estimated_bytes": est.tensor_bytes, "measured_bytes": got,
                       "rel_error": est.tensor_bytes / got - 1, "peak_phase": est.detail["peak_phase"]}
                rows.append(row)
                print(f"{row['config']:70s} est {row['estimated_bytes'] / 2**20:8.2f} MiB  "
                      f"measured {got / 2**20:8.2f} MiB  {row['rel_error']:+.1%}", file=sys.stderr, flush=True)
    worst = max(abs(r["rel_error"]) for r in rows)
    result = {"device": device, "torch": torch.__version__, "rows": rows, "worst_abs_rel_error": worst,
              "seconds": time.time() - t0}
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(rows)} configurations on {device}, worst |relative error| {worst:.1%}")


if __name__ == "__main__":
    main()

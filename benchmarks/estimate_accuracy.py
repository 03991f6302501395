"""How close `tinyml estimate` is to the measured peak: a grid over models, methods, optimizers, shapes and every
memory feature of training.

Three small models, made here offline: the tiny default (`build_tiny`, a few pretraining steps: the weights'
values do not change memory), a larger random-weight Llama (GQA, 4 layers, width 256, vocabulary 2048) with a
64-patch SigLIP tower ("small"), and a text-only random-weight Llama (4 layers, width 128, vocabulary 16384: 128
times its width, as in Llama 3) with no vision tower ("text"). Each configuration runs two
real training steps of tinyml's model through `tinyml_cli.core.estimate.measure` (CPU: live tensor storage
tracked by a dispatch mode; CUDA: torch.cuda.max_memory_allocated) and is compared with the estimate's tensor
peak for the same device. A row that turns on a memory feature names the row it is compared with (`without`):
the same setting without the feature (for grad_accum 4: one micro-batch of the whole effective batch).

    python benchmarks/estimate_accuracy.py            # a table; --json: one JSON object with `rows`
    python benchmarks/estimate_accuracy.py --device cuda --save benchmarks/results/cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The base grid, per model: (method, optimizer) x (batch, sequence) x checkpointing. freeze trains the connector
# alone (LLaVA's first stage: gradients flow back through the frozen LLM); the others train the connector and the
# LLM. qlora and the 8-bit optimizers run through bitsandbytes' CPU backend too (paged falls back to plain 8-bit
# on CPU). The chunked loss is on (the default) unless a case says otherwise.
GRID = {"tiny": ([("full", "adamw"), ("freeze", "adamw"), ("lora", "adamw")], [(4, 64), (8, 256)]),
        "small": ([("full", "adamw"), ("freeze", "adamw"), ("lora", "adamw"), ("qlora", "adamw"),
                   ("full", "adamw8bit"), ("lora", "paged_adamw8bit")], [(2, 128), (4, 384)])}
FEATURES = ("chunked_loss", "grad_accum", "in_backward", "offload")  # the memory features a case may turn on


def case(model, method, opt="adamw", batch=2, seq=128, ckpt=False, chunked=True, accum=1, in_backward=False,
         offload=False) -> dict:
    return {"model": model, "method": method, "optimizer": opt, "batch": batch, "seq": seq, "checkpointing": ckpt,
            "chunked_loss": chunked, "grad_accum": accum, "in_backward": in_backward, "offload": offload}


def twin(c: dict) -> dict | None:
    """The setting a memory feature is compared with: the same one without the feature (grad_accum 4: one
    micro-batch of the whole effective batch; the chunked loss: the earlier full log-softmax)."""
    if c["offload"]:
        return {**c, "offload": False}
    if c["in_backward"]:
        return {**c, "in_backward": False}
    if c["grad_accum"] > 1:
        return {**c, "grad_accum": 1, "batch": c["batch"] * c["grad_accum"]}
    if c["chunked_loss"]:
        return {**c, "chunked_loss": False}
    return None


def cases() -> list[dict]:
    out = [case(m, meth, opt, b, s, ck) for m, (methods, shapes) in GRID.items()
           for meth, opt in methods for b, s in shapes for ck in (False, True)]
    # the earlier full log-softmax, for the chunked loss of the same settings in the grid above (without
    # checkpointing: with it these two models' peak is a recomputed layer, not the loss, and both measure the same)
    out += [case("tiny", meth, batch=8, seq=256, chunked=False) for meth in ("full", "lora")]
    out += [case("small", meth, batch=4, seq=384, chunked=False) for meth in ("full", "lora")]
    for ck in (False, True):
        # gradient accumulation: every gradient alive across micro-batches (compared with one micro-batch of 8)
        out += [case("small", meth, batch=2, seq=128, ckpt=ck, accum=4) for meth in ("full", "lora")]
        out += [case("small", meth, batch=8, seq=128, ckpt=ck) for meth in ("full", "lora")]
        # optimizer in backward, full and lora, torch's and 8-bit AdamW
        out += [case("small", meth, opt, batch=2, seq=128, ckpt=ck, in_backward=True)
                for meth, opt in (("full", "adamw"), ("lora", "adamw"), ("full", "adamw8bit"))]
        # activation offloading, with and without checkpointing
        out += [case("small", meth, batch=4, seq=384, ckpt=ck, offload=True) for meth in ("full", "lora", "freeze")]
        out += [case("tiny", "lora", batch=8, seq=256, ckpt=ck, offload=True)]
        # a text-only LLM (no vision tower, no connector) whose vocabulary is 128 times its width, as Llama 3's is:
        # its loss matters with checkpointing too; and the memory features together
        out += [case("text", meth, batch=4, seq=256, ckpt=ck) for meth in ("full", "lora", "qlora")]
        out += [case("text", meth, batch=4, seq=256, ckpt=ck, chunked=False) for meth in ("full", "lora")]
        out += [case("text", meth, batch=4, seq=256, ckpt=ck, offload=True) for meth in ("full", "lora")]
    # the optimizer in backward where every gradient at the optimizer step is the peak (short records, checkpointing)
    out += [case("text", "full", batch=1, seq=128, ckpt=True, in_backward=ib) for ib in (False, True)]
    return out


def label(c: dict) -> str:
    extra = [k for k, on in (("no chunked loss", not c["chunked_loss"]), (f"grad_accum={c['grad_accum']}",
                                                                          c["grad_accum"] > 1),
                             ("optimizer in_backward", c["in_backward"]), ("offload", c["offload"])) if on]
    model = "text-only" if c["model"] == "text" else c["model"]
    return (f"{model} {c['method']} {c['optimizer']} batch={c['batch']} seq={c['seq']} "
            f"checkpointing={c['checkpointing']}" + ("".join(f", {e}" for e in extra)))


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
    text = LlamaForCausalLM(LlamaConfig(vocab_size=16384, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                        tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    text.save_pretrained(root / "text" / "llm")
    tok.save_pretrained(root / "text" / "llm")
    return {name: root / name for name in ("tiny", "small", "text")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object with `rows`")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--save", default="", help="also write the JSON object to this file")
    ap.add_argument("--only", default="", help="run only the cases whose label contains this text")
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
    rows, by_key = [], {}
    todo = [c for c in cases() if args.only in label(c)]
    with tempfile.TemporaryDirectory() as tmp:
        models = make_models(Path(tmp))
        for c in todo:
            parts = "[connector]" if c["method"] == "freeze" else "[connector,llm]"
            vision = f"{models[c['model']] / 'vision'}" if c["model"] != "text" else ""
            cfg = load_config(None, [f"model.llm={models[c['model']] / 'llm'}", f"model.vision={vision}",
                                     f"train.parts={parts}", f"peft.method={c['method']}",
                                     f"train.optimizer={c['optimizer']}", f"train.batch_size={c['batch']}",
                                     f"data.max_length={c['seq']}",
                                     f"train.gradient_checkpointing={str(c['checkpointing']).lower()}",
                                     f"train.chunked_loss={str(c['chunked_loss']).lower()}",
                                     f"train.grad_accum={c['grad_accum']}",
                                     f"train.optimizer_in_backward={str(c['in_backward']).lower()}",
                                     f"train.max_grad_norm={0 if c['in_backward'] else 1.0}",
                                     f"train.offload_activations={str(c['offload']).lower()}"])
            setting = Setting(device=device, batch=c["batch"], seq=c["seq"], checkpointing=c["checkpointing"],
                              optimizer=c["optimizer"], grad_accum=c["grad_accum"], in_backward=c["in_backward"],
                              chunked_loss=c["chunked_loss"], offload=c["offload"])
            est = estimate(cfg, setting)
            got = measure(cfg, device=device)["measured_bytes"]
            row = {"config": label(c), **c,
                   "estimated_bytes": est.tensor_bytes, "measured_bytes": got,
                   "rel_error": est.tensor_bytes / got - 1, "peak_phase": est.detail["peak_phase"]}
            rows.append(row)
            by_key[label(c)] = row
            print(f"{row['config']:100s} est {row['estimated_bytes'] / 2**20:8.2f} MiB  "
                  f"measured {got / 2**20:8.2f} MiB  {row['rel_error']:+.1%}", file=sys.stderr, flush=True)
    for row in rows:  # each memory feature against the same setting without it, where the grid has that one
        base = twin({k: row[k] for k in FEATURES + ("model", "method", "optimizer", "batch", "seq", "checkpointing")})
        other = by_key.get(label(base)) if base else None
        if other is not None:
            row["without"] = other["config"]
            row["measured_without_bytes"] = other["measured_bytes"]
            row["saves_bytes"] = other["measured_bytes"] - row["measured_bytes"]
    worst = max(abs(r["rel_error"]) for r in rows)
    features = [r for r in rows if "saves_bytes" in r]
    result = {"device": device, "torch": torch.__version__, "rows": rows, "worst_abs_rel_error": worst,
              "feature_rows": len(features), "features_lowering_the_peak": sum(r["saves_bytes"] > 0 for r in features),
              "seconds": time.time() - t0}
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(rows)} configurations on {device}, worst |relative error| {worst:.1%}; "
              f"{result['features_lowering_the_peak']} of {len(features)} memory-feature rows below their twin")


if __name__ == "__main__":
    main()

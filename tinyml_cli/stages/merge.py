"""merge: fold a run's adapters into full-precision weights, giving a plain tinyml model folder.

LoRA, DoRA and IA3 adapters fold into the layers they adapt (peft's `merge_and_unload`), in every part that
has them (`llm_adapter/`, `vision_adapter/`, `connector_adapter/`). A QLoRA run's base is
4-bit: it is first dequantized to fp32 (transformers' `dequantize`, bitsandbytes' `dequantize_4bit` underneath)
and the adapters merge into that, so the merged model computes what the QLoRA model computed, in full
precision. (Merging into the 4-bit weights would round the sum back to 4 bits and lose most of the update.)
BitFit, full and freeze runs already hold full weights and are written out as they are. Bottleneck adapters
are non-linear and prompt / prefix tuning adds tokens to the sequence: neither folds into weights.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .. import UserError


def merge_run(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict:
    from peft import PeftConfig

    from ..core.model import count_params, is_model_dir, load_model, load_peft_adapters

    t0 = time.time()
    src, out = Path(run_dir), Path(out_dir)
    if not is_model_dir(src):
        raise UserError(f"not a tinyml model folder (no tinyml_model.json): {src}")
    if out.resolve() == src.resolve():
        raise UserError("merge writes a new folder: OUT must differ from RUN_DIR")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty: pass --overwrite to replace it")
        shutil.rmtree(out)
    spec = json.loads((src / "tinyml_model.json").read_text())
    if "bottleneck_adapters" in spec:
        raise UserError("bottleneck adapters (peft.method=adapter) are non-linear and cannot be folded into "
                        f"weights; {src} loads as it is")
    kind = "none"
    for adapter in sorted(src.glob("*_adapter")):  # llm_adapter/, and vision_ / connector_adapter/ for LoRA, DoRA
        pcfg = PeftConfig.from_pretrained(str(adapter))
        kind = str(pcfg.peft_type.value if hasattr(pcfg.peft_type, "value") else pcfg.peft_type).lower()
        if pcfg.is_prompt_learning or getattr(pcfg, "is_adaption_prompt", False):
            raise UserError(f"{kind} adds learned tokens to every sequence and cannot be folded into weights; "
                            f"{src} loads as it is")
    model = load_model(src, adapter=False)
    quantized = bool(getattr(model.base_llm(), "is_loaded_in_4bit", False))
    if quantized:
        model.dequantize()
    load_peft_adapters(model, src)
    model.merge_adapters()
    model.save(out)
    trainable, total = count_params(model)
    return {"command": "merge", "output_dir": str(out),
            "metrics": {"adapter": kind, "dequantized_4bit_base": quantized, "params": total,
                        "seconds": time.time() - t0},
            "artifacts": {"model": str(out), "source": str(src)}}

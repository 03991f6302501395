"""bitsandbytes NF4 / FP4 / int8 copies of a tinyml model folder (the LLM quantized at load and saved)."""


from __future__ import annotations

from pathlib import Path

from .. import UserError


def quantize_bnb(model_dir: str | Path, out: str | Path, method: str = "nf4") -> dict:
    """Load a tinyml model's LLM through bitsandbytes (NF4 / FP4 4-bit or LLM.int8) and save that folder.

    The saved `llm/` holds the quantized weights and loads back quantized by itself, for inference (`eval`,
    `generate`); a LoRA run's adapter stays beside it, unmerged. For further QLoRA training start `sft` from the
    unquantized folder with `peft.method=qlora`, which quantizes the same way at load: training on top of the
    saved 4-bit folder runs, but its final save fails in transformers 5.23 (re-saving a checkpoint that was
    loaded pre-quantized raises NotImplementedError in its weight-conversion reversal).
    """
    import torch
    from transformers import BitsAndBytesConfig

    from .model import load_model
    if method in ("nf4", "fp4"):
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    elif method == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise UserError(f"--method must be int4 (ONNX), nf4, fp4 or int8, got '{method}'")
    model = load_model(model_dir, quantization_config=qc)
    model.save(out)
    before = Path(model_dir) / "llm" / "model.safetensors"
    after = Path(out) / "llm" / "model.safetensors"
    return {"llm_bytes_before": before.stat().st_size, "llm_bytes_after": after.stat().st_size,
            "size_ratio": after.stat().st_size / before.stat().st_size,
            "llm_memory_bytes": model.base_llm().get_memory_footprint()}

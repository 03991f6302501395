"""int4 weight-only ONNX: onnxruntime's MatMulNBits quantizer over a `tinyml export` folder.

Every MatMul with a constant weight becomes `MatMulNBits` (the LLM's projections and lm_head, the vision tower's
and the connector's linears) and, by default, the token-embedding Gather becomes `GatherBlockQuantized`: in a
small LLM the embedding and lm_head are a large share of the weights. Blocks of `block_size` input channels
share one fp32 scale (and a 4-bit zero point unless symmetric). `accuracy_level` is MatMulNBits' compute type:
4 (the default, as onnxruntime-genai's CPU models) multiplies int8-quantized activations with the int4 weights,
0 computes in fp32 on dequantized weights; 4 decodes ~1.4x faster on a CPU (benchmarks/decode.py).
"""


from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import UserError
from .runner import META as ONNX_META
from .runner import onnx_sizes


def copy_runner_files(src: str | Path, dst: str | Path) -> None:
    """Everything but the graphs: tokenizer, image processor config, tinyml_onnx.json."""
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix != ".onnx" and not f.name.endswith(".onnx.data"):
            shutil.copy2(f, Path(dst) / f.name)


def quantize_onnx(src: str | Path, out: str | Path, block_size: int = 32, symmetric: bool = False,
                  embeddings: bool = True, accuracy_level: int = 4) -> dict:
    """Write an int4 copy of an ONNX export; returns the sizes before and after and their ratio."""
    import logging
    import warnings

    import onnx
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    src, out = Path(src), Path(out)
    if not (src / ONNX_META).is_file():
        raise UserError(f"not a tinyml ONNX folder (no {ONNX_META}): {src} (make one with tinyml export)")
    meta = json.loads((src / ONNX_META).read_text())
    if meta.get("quantization"):
        raise UserError(f"{src} is already quantized ({meta['quantization']['type']})")
    if block_size < 16 or block_size & (block_size - 1):
        raise UserError(f"--block-size must be a power of two, at least 16, got {block_size}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise UserError(f"--accuracy-level must be 0 (fp32 compute) to 4 (int8 compute), got {accuracy_level}")
    out.mkdir(parents=True, exist_ok=True)
    for part, name in meta["files"].items():
        # Only the embedding graph's Gather is a weight lookup; int4 Gather also needs opset 21, which the other
        # graphs (exported at opset 17) would not be valid under.
        ops = ("Gather",) if part == "embed" else ("MatMul",)
        if part == "embed" and not embeddings:
            onnx.save_model(onnx.load(str(src / name)), str(out / name))
            continue
        q = MatMulNBitsQuantizer(onnx.load(str(src / name)), bits=4, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level or None, op_types_to_quantize=ops,
                                 quant_axes=(("MatMul", 0), ("Gather", 1)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-zero blocks divide 0 by a 0 scale; the quantizer maps them to 0
            q.process()
        onnx.save_model(q.model.model, str(out / name))
    copy_runner_files(src, out)
    meta["quantization"] = {"type": "int4", "block_size": block_size, "symmetric": symmetric, "embeddings": embeddings,
                            "accuracy_level": accuracy_level}
    (out / ONNX_META).write_text(json.dumps(meta, indent=2))
    before, after = onnx_sizes(src), onnx_sizes(out)
    return {"bytes_before": before, "bytes_after": after, "size_ratio": after["total"] / before["total"],
            "size_ratio_by_graph": {k: after[k] / before[k] for k in before if k != "total"}}

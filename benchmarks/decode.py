"""Greedy decoding speed on CPU: PyTorch eager fp32 vs the fp32 ONNX export vs its int4 copy, same model and prompts.

    python benchmarks/decode.py --json        (the main install is enough: no TRL)

The model is common.py's random-weight LLaVA model (Llama LLM ~32M parameters, 32k vocabulary: its weights,
not the Python around them, are most of a decode step). Three sides, each in a fresh process:
- eager: tinyml's PyTorch model in fp32, `LMM.generate` (transformers' generate, KV cache), as `tinyml generate`;
- fp32_onnx: `tinyml export --format onnx`, run by tinyml's torch-free onnx_runner (onnxruntime, KV cache);
- int4_onnx: that export after `tinyml quantize --method int4` (MatMulNBits weights, block 32, accuracy level 4,
  int4 embeddings).
Each side answers the same image questions (the shapes records' first turns, encoded by tinyml's eval path), one
at a time, `--new-tokens` greedy tokens each (fewer where the model ends its answer), after one warm-up answer.
tokens/s = generated tokens / wall time of the generate calls (image encoding and prompt prefill included).
All sides run with `--threads` intra-op threads (1 by default: the machine is shared). Sides alternate order
over the repeats; the median is kept. `ratios`: int4_vs_eager and fp32_onnx_vs_eager (tokens/s over eager's),
and how often each ONNX side's greedy tokens equal eager's. `--model DIR --data FILE` measure another tinyml
model folder on other prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common

SIDES = ("eager", "fp32_onnx", "int4_onnx")


def exports(model_dir: str, work: Path) -> dict:
    """The fp32 ONNX export of a tinyml model folder and its int4 copy, under `work`, made once per model."""
    import shutil

    from tinyml_cli.core.export import export_onnx
    from tinyml_cli.edge.int4 import quantize_onnx
    from tinyml_cli.edge.runner import META, onnx_sizes
    fp32, int4 = work / "onnx-fp32", work / "onnx-int4"
    if not (fp32 / META).is_file() or json.loads((fp32 / META).read_text())["source"] != model_dir:
        shutil.rmtree(fp32, ignore_errors=True)
        shutil.rmtree(int4, ignore_errors=True)
        export_onnx(model_dir, fp32)
    if not (int4 / META).is_file():
        quantize_onnx(fp32, int4)
    return {"fp32_onnx": onnx_sizes(fp32)["total"], "int4_onnx": onnx_sizes(int4)["total"]}


def side_generate(a):
    """(generate(example) -> new token ids, the model) for one side, with a.threads intra-op threads."""
    if a.side == "eager":
        import torch

        from tinyml_cli.core.batching import Collator, ImageLoader
        from tinyml_cli.core.model import load_model
        torch.set_num_threads(a.threads)
        model = load_model(a.model, dtype=torch.float32).eval()
        collate = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor), left_pad=True)

        def generate(example):
            batch = collate([example])
            batch.pop("labels")
            return model.generate(**batch, max_new_tokens=a.new_tokens)[0].tolist()
        return generate, model
    from tinyml_cli.edge.runner import OnnxLMM
    runner = OnnxLMM(Path(a.work) / ("onnx-fp32" if a.side == "fp32_onnx" else "onnx-int4"), threads=a.threads)
    return (lambda e: runner.generate([e.input_ids], [e.images], a.new_tokens)[0]), runner


def worker(a) -> dict:
    from tinyml_cli.config import load_config
    from tinyml_cli.records.conversations import eval_examples
    from tinyml_cli.records.encoder import encoder_for
    generate, model = side_generate(a)
    cfg = load_config(None)
    examples = eval_examples(a.data, encoder_for(model, cfg.data), cfg.data)[:a.prompts + 1]
    generate(examples[0])  # warm-up: first-call allocations and kernel choices
    tokens, seconds, outputs = 0, 0.0, []
    for e in examples[1:]:
        t = time.perf_counter()
        new = generate(e)
        seconds += time.perf_counter() - t
        tokens += len(new)
        outputs.append(new)
    return {"side": a.side, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "prompt_tokens": sum(len(e.input_ids) for e in examples[1:]) / a.prompts,
            "peak_rss_bytes": common.peak_rss_bytes(), "outputs": outputs}


def match(a: list, b: list) -> float:
    """Share of positions where two runs' greedy tokens agree (up to the shorter answer of each prompt)."""
    pairs = [(x, y) for u, v in zip(a, b) for x, y in zip(u, v)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--work", default="runs/bench", help="cache folder for the built model and the exports")
    p.add_argument("--model", help="a tinyml model folder (default: the benchmark model, built under --work)")
    p.add_argument("--data", help="records whose first user turns are the prompts (default: the benchmark's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4, help="image questions answered per run (after one warm-up)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per answer (at most)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of torch and onnxruntime")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print(json.dumps(worker(a)))
        return
    work = Path(a.work)
    info = common.build(work) if not (a.model and a.data) else {}
    model, data = str(Path(a.model or info["tinyml"]).resolve()), a.data or info["train"]
    sizes = exports(model, work)
    say = common.reporter(a)
    shared = ["--work", a.work, "--model", model, "--data", data, "--prompts", str(a.prompts),
              "--new-tokens", str(a.new_tokens), "--threads", str(a.threads)]
    runs = {s: [] for s in SIDES}
    for r in range(a.repeats):
        for s in (SIDES[r % 3:] + SIDES[:r % 3]):  # each side takes each place in the order once per 3 repeats
            o = common.run_side(__file__, shared + ["--side", s])
            runs[s].append(o)
            say(f"{s} run {r + 1}: {o['tokens_per_s']:.1f} tokens/s")
    res = {s: {"tokens_per_s": common.median([o["tokens_per_s"] for o in runs[s]]),
               "tokens_per_s_runs": [o["tokens_per_s"] for o in runs[s]],
               "tokens": runs[s][0]["tokens"], "peak_rss_bytes": common.median([o["peak_rss_bytes"] for o in runs[s]])}
           for s in SIDES}
    res["fp32_onnx"]["bytes"], res["int4_onnx"]["bytes"] = sizes["fp32_onnx"], sizes["int4_onnx"]
    eager_out = runs["eager"][0]["outputs"]
    ratios = {"int4_vs_eager": res["int4_onnx"]["tokens_per_s"] / res["eager"]["tokens_per_s"],
              "fp32_onnx_vs_eager": res["fp32_onnx"]["tokens_per_s"] / res["eager"]["tokens_per_s"],
              "int4_vs_fp32_onnx": res["int4_onnx"]["tokens_per_s"] / res["fp32_onnx"]["tokens_per_s"],
              "fp32_onnx_greedy_match": match(eager_out, runs["fp32_onnx"][0]["outputs"]),
              "int4_greedy_match": match(eager_out, runs["int4_onnx"][0]["outputs"])}
    out = {"benchmark": "decode", "device": "cpu", "model": {k: v for k, v in info.items() if k != "train"} or model,
           "setting": {"batch_size": 1, "prompts": a.prompts, "new_tokens": a.new_tokens, "threads": a.threads,
                       "repeats": a.repeats, "prompt_tokens": runs["eager"][0]["prompt_tokens"],
                       "tokens_per_s": "generated tokens / wall time of generate (image + prefill included)"},
           "sides": res, "ratios": ratios}
    print(json.dumps(out, indent=None if a.json else 2))


if __name__ == "__main__":
    main()

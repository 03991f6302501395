"""Greedy decoding speed on CPU: PyTorch eager, tinyml's ONNX fp32 and int4, and the runtimes edge users run
(onnxruntime-genai on tinyml's int4 export; llama.cpp on q4_0 and q8_0 GGUF exports), same model and prompts.

    python benchmarks/decode.py --json        (llama.cpp's sides need `pip install -e ".[llamacpp]"`)

The model is common.py's random-weight LLaVA model (Llama LLM ~32M parameters, 32k vocabulary: its weights,
not the Python around them, are most of a decode step). Sides, each in a fresh process:
- eager: tinyml's PyTorch model in fp32, `LMM.generate` (transformers' generate, KV cache), as `tinyml generate`;
- fp32_onnx: `tinyml export --format onnx`, run by tinyml's torch-free runner (onnxruntime, KV cache);
- int4_onnx: that export after `tinyml quantize --method int4` (MatMulNBits, the default settings);
- int4_onnx_text: the same int4 runner on the text peers' prompts (below), the side the peers are compared with;
- ortgenai_int4: the same int4 folder run by onnxruntime-genai through the genai_config.json the export writes;
- llamacpp_q4_0 / llamacpp_q8_0: `tinyml export --format gguf --gguf-type q4_0 / q8_0` run by llama.cpp
  (llama-cpp-python: `eval` of the prompt, then one token at a time, argmax of the last logits).
eager, fp32_onnx and int4_onnx answer the image questions (the shapes records' first turns, encoded by tinyml's eval
path); onnxruntime-genai and llama.cpp get the same prompts as text, without the image tokens (onnxruntime-genai
runs only the text path of the export; llama.cpp's image path is a separate library), and so does int4_onnx_text,
so that tinyml's int4 is timed against them at equal context lengths. Each answers exactly `--new-tokens` greedy
tokens (the end token masked, as llama-bench measures; `--stop-at-eos` ends answers at it instead), one prompt at a
time, after one warm-up answer.
prefill tokens/s = prompt tokens / time to the first new token (image encoding included on tinyml's sides);
decode tokens/s = the other new tokens / the time after the first; tokens_per_s = all new tokens / all the time.
All sides run with `--threads` intra-op threads (1 by default: the machine is shared). Sides rotate order over the
repeats; the median is kept. `ratios`: decode tokens/s of tinyml's int4 on the text prompts over each peer's
(int4_vs_llamacpp_q4_0, int4_vs_ortgenai, ...), and greedy agreements: each image side's tokens against eager's on
the image prompts, each text side's against eager's on the same text prompts. `--model DIR --data FILE` measure
another tinyml model folder on other prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common

SIDES = ("eager", "fp32_onnx", "int4_onnx", "int4_onnx_text", "ortgenai_int4", "llamacpp_q4_0", "llamacpp_q8_0")
TEXT_SIDES = SIDES[3:]  # the sides that get the prompts as text, without the image tokens


def exports(model_dir: str, work: Path, eight_bit: tuple[str, ...]) -> dict:
    """The fp32 ONNX export of a tinyml model folder and its int4 copy (`eight_bit`: the projections kept at 8
    bits), under `work`, made once per model and setting."""
    import shutil

    from tinyml_cli.core.export import export_onnx
    from tinyml_cli.edge.int4 import quantize_onnx
    from tinyml_cli.edge.runner import META, onnx_sizes
    fp32, int4 = work / "onnx-fp32", work / "onnx-int4"
    if not (fp32 / META).is_file() or json.loads((fp32 / META).read_text())["source"] != model_dir:
        shutil.rmtree(fp32, ignore_errors=True)
        shutil.rmtree(int4, ignore_errors=True)
        export_onnx(model_dir, fp32)
    if not (int4 / META).is_file() or json.loads((int4 / META).read_text())["quantization"]["eight_bit"] != list(eight_bit):
        shutil.rmtree(int4, ignore_errors=True)
        quantize_onnx(fp32, int4, eight_bit=eight_bit)
    sizes = {"fp32_onnx": onnx_sizes(fp32)["total"], "int4_onnx": onnx_sizes(int4)["total"]}
    sizes["ortgenai_int4"] = sizes["int4_onnx_text"] = sizes["int4_onnx"]
    from tinyml_cli.core.gguf_export import export_gguf
    for kind in ("q4_0", "q8_0"):
        folder = work / f"gguf-{kind}"
        if not (folder / "model.gguf").is_file() or (fp32 / META).stat().st_mtime > (folder / "model.gguf").stat().st_mtime:
            export_gguf(model_dir, folder, kind)
        sizes[f"llamacpp_{kind}"] = (folder / "model.gguf").stat().st_size  # the LLM (the mmproj is not run)
    return sizes


def side_generate(a):
    """(generate(example) -> (new token ids, seconds to the first, seconds in all), the model) for one side, with
    a.threads intra-op threads."""
    if a.side == "eager":
        import torch

        from tinyml_cli.core.batching import Collator, ImageLoader
        from tinyml_cli.core.model import load_model
        torch.set_num_threads(a.threads)
        model = load_model(a.model, dtype=torch.float32).eval()
        if not a.stop_at_eos:  # transformers' min_new_tokens masks the end token until --new-tokens are out
            llm_generate = model.llm.generate
            model.llm.generate = lambda **kw: llm_generate(**kw, min_new_tokens=a.new_tokens)
        collate = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor), left_pad=True)

        class FirstToken:  # transformers' streamer protocol: the prompt first, then each new token (1-d)
            def put(self, v):
                if v.dim() == 1 and self.at is None:
                    self.at = time.perf_counter()

            def end(self):
                pass

        def generate(example):
            t, first = time.perf_counter(), FirstToken()
            first.at = None
            batch = collate([example])
            batch.pop("labels")
            new = model.generate(**batch, max_new_tokens=a.new_tokens, streamer=first)[0].tolist()
            return new, first.at - t, time.perf_counter() - t
        return generate, model
    from tinyml_cli.edge.runner import OnnxLMM
    int4 = Path(a.work) / "onnx-int4"
    if a.side in ("fp32_onnx", "int4_onnx", "int4_onnx_text"):
        runner = OnnxLMM(Path(a.work) / "onnx-fp32" if a.side == "fp32_onnx" else int4, threads=a.threads)
        if not a.stop_at_eos:
            pick, eos = runner._pick, runner.tokenizer.eos_token_id

            def pick_but_eos(logits, *rest):
                logits[:, eos] = -float("inf")
                return pick(logits, *rest)
            runner._pick = pick_but_eos

        text = a.side == "int4_onnx_text"

        def generate(example):
            t, new, first = time.perf_counter(), [], None
            prompt = text_prompt(example, runner.image_token_id) if text else example.input_ids
            for nxt, _ in runner.steps([prompt], [[] if text else example.images], a.new_tokens):
                first = first or time.perf_counter()
                new.append(int(nxt[0]))
            return new, first - t, time.perf_counter() - t
        return generate, runner
    runner = Prompts(int4)  # the text peers: the export's tokenizer for the prompts, no graph loaded
    eos = runner.tokenizer.eos_token_id
    if a.side == "ortgenai_int4":
        import onnxruntime_genai as og
        cfg = json.loads((int4 / "genai_config.json").read_text())
        if cfg["model"]["decoder"]["session_options"].get("intra_op_num_threads") != a.threads:
            cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = a.threads
            (int4 / "genai_config.json").write_text(json.dumps(cfg, indent=2))
        og_model = og.Model(str(int4))

        def generate(example):
            ids = text_prompt(example, runner.image_token_id)
            params = og.GeneratorParams(og_model)
            params.set_search_options(max_length=len(ids) + a.new_tokens, do_sample=False,
                                      min_length=len(ids) + (0 if a.stop_at_eos else a.new_tokens))
            t, new, first = time.perf_counter(), [], None
            gen = og.Generator(og_model, params)
            gen.append_tokens(ids)
            while not gen.is_done():
                gen.generate_next_token()
                first = first or time.perf_counter()
                new.append(int(gen.get_next_tokens()[0]))
            return new, first - t, time.perf_counter() - t
        return generate, runner
    import llama_cpp
    import llama_cpp.llama_cpp as llama_low
    import numpy as np
    default_params = llama_low.llama_model_default_params

    def without_repacking():
        # On this CPU llama.cpp repacks q4_0 / q8_0 weights for Intel AMX, whose kernels die here with a general
        # protection fault in libggml-cpu (the sandbox does not let the process use the AMX tiles); without the
        # "extra buffer types" its plain CPU kernels run (AVX-512 / VNNI dot products, no weight repacking).
        params = default_params()
        params.use_extra_bufts = False
        return params
    llama_low.llama_model_default_params = without_repacking
    llm = llama_cpp.Llama(str(Path(a.work) / f"gguf-{a.side.split('_', 1)[1]}" / "model.gguf"), n_ctx=2048,
                          n_batch=512, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    vocab = llm.n_vocab()

    def generate(example):
        ids = text_prompt(example, runner.image_token_id)
        t, new, first = time.perf_counter(), [], None
        llm.reset()
        llm.eval(ids)
        for _ in range(a.new_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).copy()
            if not a.stop_at_eos:
                logits[eos] = -np.inf
            new.append(int(logits.argmax()))
            first = first or time.perf_counter()
            if new[-1] == eos:
                break
            llm.eval(new[-1:])
        return new, first - t, time.perf_counter() - t
    return generate, runner


class Prompts:
    """What the prompt encoder needs of a model, from an ONNX export's files (no session opened)."""

    def __init__(self, folder: Path):
        from tinyml_cli.edge.runner import META, ChatTokenizer
        meta = json.loads((folder / META).read_text())
        self.tokenizer, self.num_image_tokens = ChatTokenizer(folder), meta["num_image_tokens"]
        self.image_token_id = meta["image_token_id"]


def text_prompt(example, image_token_id: int) -> list[int]:
    """The prompt without its image tokens: what the text-only peers answer."""
    return [t for t in example.input_ids if t != image_token_id]


def worker(a) -> dict:
    from tinyml_cli.config import load_config
    from tinyml_cli.records.conversations import eval_examples
    from tinyml_cli.records.encoder import encoder_for
    generate, model = side_generate(a)
    cfg = load_config(None)
    examples = eval_examples(a.data, encoder_for(model, cfg.data), cfg.data)[:a.prompts + 1]
    generate(examples[0])  # warm-up: first-call allocations and kernel choices
    text = a.side in TEXT_SIDES
    new_tokens = prompt_tokens = 0
    prefill = seconds = 0.0
    outputs = []
    for e in examples[1:]:
        new, first, total = generate(e)
        new_tokens, seconds, prefill = new_tokens + len(new), seconds + total, prefill + first
        prompt_tokens += len(text_prompt(e, model.image_token_id) if text else e.input_ids)
        outputs.append(new)
    out = {"side": a.side, "tokens": new_tokens, "seconds": seconds, "tokens_per_s": new_tokens / seconds,
           "prefill_tokens_per_s": prompt_tokens / prefill,
           "decode_tokens_per_s": (new_tokens - len(outputs)) / max(seconds - prefill, 1e-9),
           "prompt_tokens": prompt_tokens / a.prompts, "peak_rss_bytes": common.peak_rss_bytes(), "outputs": outputs}
    if a.side == "eager":  # untimed: eager's answers to the text peers' prompts, for their greedy agreement
        import torch
        ids = [torch.tensor([text_prompt(e, model.image_token_id)]) for e in examples[1:]]
        with torch.no_grad():
            out["outputs_text"] = [model.generate(x, torch.ones_like(x), max_new_tokens=a.new_tokens)[0].tolist()
                                   for x in ids]
    return out


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
    p.add_argument("--stop-at-eos", action="store_true",
                   help="end answers at the end token (default: every side generates --new-tokens tokens, the end "
                        "token masked, as llama-bench does: a real model's one-word answers leave no decode to time)")
    p.add_argument("--eight-bit", metavar="PROJ,...", help="the int4 sides' projections kept at 8 bits, as `tinyml "
                   "quantize --eight-bit` (default: its default; none: 4 bits throughout)")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print(json.dumps(worker(a)))
        return
    work = Path(a.work)
    info = common.build(work) if not (a.model and a.data) else {}
    model, data = str(Path(a.model or info["tinyml"]).resolve()), a.data or info["train"]
    from tinyml_cli.stages.quantize import parse_eight_bit
    eight_bit = parse_eight_bit(a.eight_bit)
    sizes = exports(model, work, eight_bit)
    say = common.reporter(a)
    shared = ["--work", a.work, "--model", model, "--data", data, "--prompts", str(a.prompts),
              "--new-tokens", str(a.new_tokens), "--threads", str(a.threads)] + (["--stop-at-eos"] if a.stop_at_eos else [])
    import importlib.util
    missing = {s: f"{mod} is not installed" for s, mod in
               (("ortgenai_int4", "onnxruntime_genai"), ("llamacpp_q4_0", "llama_cpp"), ("llamacpp_q8_0", "llama_cpp"))
               if importlib.util.find_spec(mod) is None}
    sides = [s for s in SIDES if s not in missing]
    runs = {s: [] for s in sides}
    for r in range(a.repeats):
        k = r % len(sides)
        for s in sides[k:] + sides[:k]:  # each side takes each place in the order over the repeats
            o = common.run_side(__file__, shared + ["--side", s])
            runs[s].append(o)
            say(f"{s} run {r + 1}: prefill {o['prefill_tokens_per_s']:.1f}, decode {o['decode_tokens_per_s']:.1f} tokens/s")
    keys = ("tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes")
    res = {s: {**{k: common.median([o[k] for o in runs[s]]) for k in keys},
               "decode_tokens_per_s_runs": [o["decode_tokens_per_s"] for o in runs[s]],
               "tokens": runs[s][0]["tokens"], "prompt_tokens": runs[s][0]["prompt_tokens"], "bytes": sizes.get(s)}
           for s in sides}
    res["eager"].pop("bytes")
    res |= {s: {"skipped": why} for s, why in missing.items()}
    eager_out, eager_text = runs["eager"][0]["outputs"], runs["eager"][0]["outputs_text"]
    decode = {s: res[s]["decode_tokens_per_s"] for s in sides}
    ratios = {"int4_vs_eager": res["int4_onnx"]["tokens_per_s"] / res["eager"]["tokens_per_s"],
              "fp32_onnx_vs_eager": res["fp32_onnx"]["tokens_per_s"] / res["eager"]["tokens_per_s"],
              "int4_vs_fp32_onnx": res["int4_onnx"]["tokens_per_s"] / res["fp32_onnx"]["tokens_per_s"],
              "fp32_onnx_greedy_match": match(eager_out, runs["fp32_onnx"][0]["outputs"]),
              "int4_greedy_match": match(eager_out, runs["int4_onnx"][0]["outputs"])}
    ratios["int4_text_greedy_match"] = match(eager_text, runs["int4_onnx_text"][0]["outputs"])
    for s, name in (("llamacpp_q4_0", "llamacpp_q4_0"), ("llamacpp_q8_0", "llamacpp_q8_0"), ("ortgenai_int4", "ortgenai")):
        # against the peers, tinyml's int4 on the same text prompts: equal context lengths at every decode step
        ratios[f"int4_vs_{name}"] = decode["int4_onnx_text"] / decode[s] if s in decode else None
        ratios[f"{name}_greedy_match"] = match(eager_text, runs[s][0]["outputs"]) if s in runs else None
    out = {"benchmark": "decode", "device": "cpu", "model": {k: v for k, v in info.items() if k != "train"} or model,
           "setting": {"batch_size": 1, "prompts": a.prompts, "new_tokens": a.new_tokens, "threads": a.threads,
                       "stop_at_eos": a.stop_at_eos, "int4_eight_bit": list(eight_bit),
                       "repeats": a.repeats, "prompt_tokens": runs["eager"][0]["prompt_tokens"],
                       "int4_vs_eager/fp32_onnx": "tokens/s of int4_onnx over the side's (image prompts)",
                       "int4_vs_<peer>": "decode tokens/s of int4_onnx_text over the peer's (the same text prompts)",
                       "text_sides": "prompts without the image tokens; greedy match against eager on those"},
           "sides": res, "ratios": ratios}
    print(json.dumps(out, indent=None if a.json else 2))


if __name__ == "__main__":
    main()

"""Shared pieces of the benchmarks: one random-weight LLaVA model saved for both sides, the data, the meters.

The model is built once (cached under `--work`): a 32k-vocabulary byte-level BPE trained offline, a
Llama-architecture LLM of ~32M parameters and a small SigLIP tower, as a `LlavaForConditionalGeneration`
(what TRL trains) and as the same weights in tinyml's folder layout (`llm/`, `vision/`, connector).

Meters, the same on both sides:
- tokens: non-pad tokens (attention-mask sum) entering the top-level model's training forwards (those that
  build a graph; a reference model's no-grad pass is not counted), counted by a hook;
- time: wall clock between optimizer steps, after warm-up steps;
- peak memory: the largest total size of live tensor storages, tracked by the package's `PeakTensorMemory`
  over every tensor an op reads or writes (weights, gradients, optimizer state, activations, batches), in its own run,
  since tracking slows each op. Peak RSS of each side's process (VmHWM) is reported beside it.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from tinyml_cli.core.memory import PeakTensorMemory  # noqa: E402  (the package's meter)

VOCAB = 32000
LLM = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
           num_key_value_heads=6, max_position_embeddings=1024, tie_word_embeddings=False)
VISION = dict(image_size=32, patch_size=4, hidden_size=192, intermediate_size=768, num_hidden_layers=4,
              num_attention_heads=4)  # 64 image tokens per 32x32 shapes image
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHAT_TEMPLATE = (  # tinyml's default template, with TRL's structured content and generation markers
    "{{ bos_token }}{% for m in messages %}"
    "{% set text %}{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endset %}"
    "{% if m['role'] == 'system' %}<|system|>{{ text }}<|end|>"
    "{% elif m['role'] == 'user' %}<|user|>{{ text }}<|end|>"
    "{% else %}<|assistant|>{% generation %}{{ text }}<|end|>{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _words(rng: random.Random, n: int) -> list[str]:
    """Pseudo-words: enough distinct strings for a BPE to learn 32k merges (the shapes text alone has ~50 words)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def build(work: Path) -> dict:
    """Build (once) the shapes data, the Llava model + processor and the same model as a tinyml folder."""
    done = work / "built.json"
    if done.is_file():
        return json.loads(done.read_text())
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    from tinyml_cli.core.connectors import MLPConnector
    from tinyml_cli.core.model import LMM
    from tinyml_cli.demo import synth, tiny

    work.mkdir(parents=True, exist_ok=True)
    data = synth.synth_shapes(work / "shapes", n=400, n_eval=0, seed=0)
    rng = random.Random(0)
    scenes = [synth.random_scene(rng) for _ in range(500)]
    texts = [tiny._scene_text(s, rng) for s in scenes]
    words = _words(rng, 400_000)
    texts += [" ".join(words[i:i + 50]) for i in range(0, len(words), 50)]
    tok = tiny.build_tokenizer(texts, vocab_size=VOCAB)
    tok.chat_template = CHAT_TEMPLATE
    image_id = tok.convert_tokens_to_ids("<image>")

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=SiglipVisionConfig(**VISION).to_dict(),
                      text_config=LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                              **LLM).to_dict(),
                      image_token_id=image_id, vision_feature_layer=-1, vision_feature_select_strategy="full",
                      projector_hidden_act="gelu", multimodal_projector_bias=True)
    llava = LlavaForConditionalGeneration(cfg).eval()
    proc_img = SiglipImageProcessor(size={"height": VISION["image_size"], "width": VISION["image_size"]})
    processor = LlavaProcessor(image_processor=proc_img, tokenizer=tok, patch_size=VISION["patch_size"],
                               vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=0, image_token="<image>")
    llava.save_pretrained(work / "llava")
    processor.save_pretrained(work / "llava")

    # The same weights in tinyml's layout: Llama LLM (+ lm_head), SigLIP tower, mlp2x_gelu connector.
    from transformers import LlamaForCausalLM, SiglipVisionModel
    llm = LlamaForCausalLM(LlamaConfig(**cfg.text_config.to_dict()))
    llm.model.load_state_dict(llava.model.language_model.state_dict())
    llm.lm_head.load_state_dict(llava.lm_head.state_dict())
    vision = SiglipVisionModel(SiglipVisionConfig(**VISION))
    vision.load_state_dict(llava.model.vision_tower.state_dict())
    conn = MLPConnector(VISION["hidden_size"], LLM["hidden_size"], 2)
    p = llava.model.multi_modal_projector
    conn.proj[0].load_state_dict(p.linear_1.state_dict())
    conn.proj[2].load_state_dict(p.linear_2.state_dict())
    n_img = (VISION["image_size"] // VISION["patch_size"]) ** 2
    spec = {"format": "tinyml-lmm/1", "connector": "mlp2x_gelu", "vision_dim": VISION["hidden_size"],
            "llm_dim": LLM["hidden_size"], "num_patches": n_img, "num_image_tokens": n_img,
            "vision_feature_layer": -1, "resampler_queries": 16, "resampler_layers": 2,
            "llm_source": "benchmark", "vision_source": "benchmark"}
    lmm = LMM(vision, conn, llm.eval(), tok, proc_img, spec)
    lmm.save(work / "tinyml")

    # Both sides must compute the same function: compare logits on one image + prompt.
    ids = torch.tensor([[tok.bos_token_id] + [image_id] * n_img + tok("a red circle")["input_ids"]])
    pix = torch.randn(1, 3, VISION["image_size"], VISION["image_size"])
    with torch.no_grad():
        a = llava(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids)).logits
        b = lmm(ids, torch.ones_like(ids), pix)
    assert torch.allclose(a, b, atol=1e-4), f"the two layouts differ: {(a - b).abs().max()}"
    info = {"train": data["train"], "llava": str(work / "llava"), "tinyml": str(work / "tinyml"),
            "vocab_size": len(tok), "llm_params": sum(x.numel() for x in llm.parameters()),
            "vision_params": sum(x.numel() for x in vision.parameters()),
            "total_params": sum(x.numel() for x in llava.parameters()), "image_tokens": n_img}
    done.write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------------------------- meters
class TokenCounter:
    """Counts non-pad tokens (attention-mask sum) of the forward calls of one model instance that build a graph."""

    def __init__(self, model=None):
        self.total = 0
        if model is not None:
            model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not torch.is_grad_enabled():  # e.g. TRL's DPO reference pass through the same (peft) model
            return
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        if mask is not None:
            self.total += int(mask.sum())


class StepClock:
    """(time, tokens) after every optimizer step; tokens/s over the steps after warm-up.

    `extra` holds other figures a side measures (the dpo reference pass), reported beside tokens/s.
    """

    def __init__(self, counter: TokenCounter):
        import time
        self.counter, self.now, self.marks, self.extra = counter, time.perf_counter, [], {}

    def tick(self):
        self.marks.append((self.now(), self.counter.total))

    def tokens_per_s(self, warmup: int) -> float:
        (t0, n0), (t1, n1) = self.marks[warmup - 1], self.marks[-1]
        return (n1 - n0) / (t1 - t0)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since it started (Linux: VmHWM).

    Not getrusage's ru_maxrss: Linux carries the parent's RSS at fork over exec into it, so every side would
    report at least the driver's size (which builds the model and the exports).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ------------------------------------------------------------------------------------- the shared setting
def preferences(work: Path) -> str:
    """400 synthetic preference pairs on shapes images (`tinyml data synth-preferences`), written once."""
    out = work / "pref"
    if not (out / "pref_train.jsonl").is_file():
        from tinyml_cli.demo import synth
        synth.synth_preferences(out, n=400, n_eval=0, n_probe=0, seed=1)
    return str(out / "pref_train.jsonl")


FULL_SETTING = {"on": "tinyml train.optimizer_in_backward=true; no gradient clipping on either side",
                "off": "tinyml's ordinary optimizer step; gradients clipped at 1.0 on both sides"}


def tinyml_sets(info: dict, a, train: str, method: str, lora_dropout: float) -> list[str]:
    """tinyml's `--set` overrides for the shared setting; full fine-tuning steps AdamW inside the backward pass."""
    sets = [f"model.init_from={info['tinyml']}", f"data.train={train}", f"data.max_length={a.max_length}",
            f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}", f"train.lr={a.lr}",
            "train.scheduler=constant", "train.warmup_ratio=0", "train.log_every=1000", "train.seed=0",
            "model.dtype=fp32", 'train.mixed_precision="no"', f"peft.method={method}", "peft.r=8", "peft.alpha=16",
            f"peft.dropout={lora_dropout}", f"peft.target_modules={','.join(LORA_TARGETS)}", "train.parts=[connector]"]
    if method == "full" and a.in_backward == "on":  # no global clipping with it: nor on the TRL side (trl_args)
        sets += ["train.optimizer_in_backward=true", "train.max_grad_norm=0"]
    return sets + [f"train.chunked_loss={'true' if a.chunked_loss == 'on' else 'false'}"]


def trl_args(a, method: str) -> dict:
    """TRL's config fields for the same setting: AdamW, constant lr, fp32, clipping at 1.0 (none where tinyml steps
    in the backward pass)."""
    import tempfile
    cpu = not torch.cuda.is_available()
    return dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=0.0 if method == "full" and a.in_backward == "on" else 1.0, logging_steps=1000,
                save_strategy="no", report_to="none", gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=cpu,
                max_length=a.max_length, dataloader_num_workers=0, seed=0, disable_tqdm=True)


def trl_lora(method: str, dropout: float):
    """peft's LoRA for the Llava model: the LLM's projections, connector trained in full (None for full)."""
    if method != "lora":
        return None
    from peft import LoraConfig
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, task_type="CAUSAL_LM",
                      target_modules=r".*language_model.*\.(" + "|".join(LORA_TARGETS) + ")",
                      modules_to_save=["multi_modal_projector"])


def tick_callback(progress):
    """A transformers TrainerCallback calling progress() after every optimizer step."""
    from transformers import TrainerCallback

    class Tick(TrainerCallback):
        def on_step_end(self, *args, **kw):
            progress()
    return Tick()


def strip_image(text: str) -> str:
    """Text without tinyml's `<image>` marker (TRL places the image itself, at the start of the first turn)."""
    return text.replace("<image>\n", "").replace("<image>", "")


def trl_preference_rows(work: Path) -> list[tuple[dict, list[dict], object]]:
    """The shared preference pairs as TRL reads them: (record, prompt turns without the `<image>` marker, RGB image)."""
    from PIL import Image
    path = Path(preferences(work))
    rows = []
    for line in open(path, encoding="utf-8"):
        rec = json.loads(line)
        prompt = [{"role": m["role"], "content": strip_image(m["content"])} for m in rec["prompt"]]
        rows.append((rec, prompt, Image.open(path.parent / rec["image"]).convert("RGB")))
    return rows


# ------------------------------------------------------------------------------------------------ driving
def run_side(script: str, args: list[str]) -> dict:
    """Run one side in a fresh interpreter (no shared allocator or caches); returns its JSON line."""
    res = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def median(xs):
    return statistics.median(xs)


def arguments(doc: str):
    """The options every tinyml-vs-TRL script takes (and the hidden ones of its worker processes)."""
    import argparse
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--work", default="runs/bench", help="cache folder for the built model and data")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per speed run (warm-up included)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--num-generations", type=int, default=4, help="grpo: responses sampled per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="grpo: tokens generated per response")
    p.add_argument("--in-backward", choices=["on", "off"], default="on",
                   help="full fine-tuning: tinyml with train.optimizer_in_backward and neither side clipping (on), "
                        "or tinyml's ordinary optimizer step and both sides clipping at 1.0 (off)")
    p.add_argument("--chunked-loss", choices=["on", "off"], default="on",
                   help="tinyml's train.chunked_loss (on: the default; off: every labelled row's log-softmax at once)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each side on CPU (shared "
                                                           "machine: 1 keeps other loads from stalling a thread team)")
    p.add_argument("--side", choices=["tinyml", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    return p


def start(doc: str, sides: dict):
    """Parse the options; in a worker process run its one measurement and print it (returns None), else return them."""
    a = arguments(doc).parse_args()
    if a.side:
        print(json.dumps(worker(a, sides)))
        return None
    return a


def reporter(a):
    """say(...): progress lines on stderr, silent under --json."""
    return (lambda *x: None) if a.json else (lambda *x: print(*x, file=sys.stderr))


def worker(a, sides: dict) -> dict:
    """One side, one method, one measurement (speed, or memory under the tensor tracker), in this process.

    `sides[name](info, a)` returns (clock, go): go(progress) trains, calling progress() after each step.
    """
    info = json.loads((Path(a.work) / "built.json").read_text())
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(a.threads)
    mode = PeakTensorMemory(inputs=True) if a.memory and not cuda else None
    if mode:
        mode.__enter__()
    clock, go = sides[a.side](info, a)
    seen = {}

    def progress():
        clock.tick()
        if len(clock.marks) == a.steps and mode:
            seen["peak"] = mode.peak  # load + training steps; not what happens after the last step
    go(progress)
    if mode:
        mode.__exit__(None, None, None)
    out = {"side": a.side, "method": a.method, "steps": len(clock.marks), "peak_rss_bytes": peak_rss_bytes()}
    if a.memory:
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else seen["peak"]
    else:
        out["tokens_per_s"] = clock.tokens_per_s(a.warmup)
        out["tokens"] = clock.marks[-1][1] - clock.marks[a.warmup - 1][1]
        out["seconds"] = clock.marks[-1][0] - clock.marks[a.warmup - 1][0]
        out.update(clock.extra)
    return out


def compare(script: str, a) -> dict:
    """Per method: speed runs (tinyml and TRL alternating who goes first), then one memory run per side.

    Returns {method: {"tinyml": ..., "trl": ..., "ratios": ...}}, medians over the repeats, each run kept in `runs`.
    """
    say = reporter(a)
    shared = ["--work", a.work, "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
              "--lr", str(a.lr), "--warmup", str(a.warmup), "--threads", str(a.threads), "--in-backward", a.in_backward,
              "--chunked-loss", a.chunked_loss, "--num-generations", str(a.num_generations),
              "--max-new-tokens", str(a.max_new_tokens)]
    methods = {}
    for method in a.methods.split(","):
        res = {"tinyml": {"runs": []}, "trl": {"runs": []}}
        for r in range(a.repeats):
            for side in (("tinyml", "trl") if r % 2 == 0 else ("trl", "tinyml")):
                o = run_side(script, shared + ["--side", side, "--method", method, "--steps", str(a.steps)])
                res[side]["runs"].append(o)
                say(f"{method} {side} run {r + 1}: {o['tokens_per_s']:.0f} tokens/s")
        for side in ("tinyml", "trl"):
            o = run_side(script, shared + ["--side", side, "--method", method, "--memory",
                                           "--steps", str(a.memory_steps)])
            res[side]["peak_memory_bytes"] = o["peak_memory_bytes"]
            say(f"{method} {side} peak tensor memory {o['peak_memory_bytes'] / 2**20:.0f} MiB")
        for side in ("tinyml", "trl"):
            runs, tps = res[side]["runs"], [o["tokens_per_s"] for o in res[side]["runs"]]
            res[side].update(tokens_per_s=median(tps), tokens_per_s_runs=tps,
                             peak_rss_bytes=median([o["peak_rss_bytes"] for o in runs]))
        res["ratios"] = {"tokens_per_s": res["tinyml"]["tokens_per_s"] / res["trl"]["tokens_per_s"],
                         "peak_memory": res["tinyml"]["peak_memory_bytes"] / res["trl"]["peak_memory_bytes"],
                         "peak_rss": res["tinyml"]["peak_rss_bytes"] / res["trl"]["peak_rss_bytes"]}
        methods[method] = res
    return methods


def worst(methods: dict) -> dict:
    """The headline ratios: the worse of the methods for tinyml (lowest speed ratio, highest memory ratio)."""
    return {"tokens_per_s": min(m["ratios"]["tokens_per_s"] for m in methods.values()),
            "peak_memory": max(m["ratios"]["peak_memory"] for m in methods.values())}

"""demo: the whole pipeline on the tiny default, offline, on CPU in a few minutes.

build-tiny -> data synth-shapes -> pretrain-align -> eval (before) -> sft -> eval (after), with the shipped
tiny recipes; prints a before/after table of held-out accuracy per question type.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .. import ui
from ..config import load_config
from ..stages.bitdelta import compress_config, run_compress

N_TRAIN, N_EVAL = 8000, 200


QUICK_TINY = {"llm_steps": 3, "vision_steps": 3, "n_scenes": 300}


def _eval(folder: Path, cfg) -> dict:

    from ..core.generation import evaluate_model
    from ..core.model import load_model
    metrics, _ = evaluate_model(load_model(folder), cfg.data.eval, cfg)
    # beside the run's metrics.jsonl, where `tinyml report` finds it for its eval table
    (folder / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _preference(out: Path, con, quick: bool, seed: int):
    return run_preference_stages(out, out / "sft", con, quick, seed)


def _halva(out: Path, con, quick: bool, seed: int):
    """HALVA from the sft model on the same hallucination pairs as dpo: POPE false positives on the probe and
    general VQA on the shapes held-out split, beside dpo's."""
    from ..core.generation import evaluate_model
    from ..core.model import load_model
    from ..stages.halva import run_halva
    shutil.rmtree(out / "halva", ignore_errors=True)
    t = time.time()
    prefs = out / "prefs"
    cfg = load_config("tiny_halva", [f"model.init_from={out / 'sft'}", f"data.train={prefs / 'pref_train.jsonl'}",
                                     f"data.eval={prefs / 'pref_eval.jsonl'}", f"train.seed={seed}"]
                      + (["train.max_steps=3", "train.batch_size=4"] if quick else []))
    with ui.training_bar(con, "halva") as bar:
        h = run_halva(cfg, out / "halva", progress=bar)["metrics"]
    probe, shapes = str(prefs / "pope_probe.jsonl"), str(out / "shapes" / "eval.jsonl")
    m = {"pope_fp_rate_halva": _pope_fp_rate(out / "halva", probe, cfg),
         "vqa_accuracy_halva": evaluate_model(load_model(out / "halva"), shapes, cfg)[0]["vqa_accuracy"],
         "vqa_accuracy_dpo": evaluate_model(load_model(out / "dpo"), shapes, cfg)[0]["vqa_accuracy"],
         "halva_phrase_accuracy": h.get("eval_phrase_accuracy"), "halva_phrase_accuracy_sft": h.get("eval_phrase_accuracy_before")}
    return m, {"halva": time.time() - t}, {"halva": str(out / "halva")}


def _edge(out: Path, con, quick: bool, seed: int):
    t = time.time()
    with con.status("export: ONNX fp32 and int4, hf-llava; greedy parity and held-out accuracy..."):
        m = edge_demo_metrics(out / "sft", out / "shapes" / "eval.jsonl", out / "edge")
    return m, {"edge": time.time() - t}, {"onnx": str(out / "edge" / "onnx"), "onnx_int4": str(out / "edge" / "onnx-int4"),
                                          "hf_llava": str(out / "edge" / "hf-llava")}


def _bitdelta(out: Path, con, quick: bool, seed: int):
    """BitDelta's use case: several fine-tunes kept over one base. Here the DPO run as a 1-bit delta over the sft
    model it started from (align -> sft is the tiny LLM learning the task from scratch, not a fine-tune)."""
    shutil.rmtree(out / "bitdelta", ignore_errors=True)
    t = time.time()
    with ui.training_bar(con, "bitdelta scale distillation") as bar:
        m = bitdelta_demo_metrics(out / "sft", out / "dpo", out / "shapes" / "train.jsonl", out / "shapes" / "eval.jsonl",
                                  out / "bitdelta", progress=bar, seed=seed, status=bar.status)
    return m, {"bitdelta": time.time() - t}, {"bitdelta": str(out / "bitdelta")}


# Stages `--full` adds after sft, in order: each takes (out, console, quick, seed) and returns
# (metrics, seconds per stage, artifacts), merged into the demo's result.
FULL_STAGES = [_preference, _halva, _edge, _bitdelta]


TINY_SEED = 1234  # build_tiny's default seed: the tiny default of `--seed 0`


def run_demo(out: str | Path, con, quick: bool = False, full: bool = False, seed: int = 0) -> dict:
    """The demo's stages; `seed` drives every random choice: the tiny default's pretraining (seed 1234 + seed), the
    synthetic data (shapes: seed, preference pairs: 1 + seed) and every training run's train.seed."""
    from ..stages.sft import run_sft
    from .synth import synth_shapes
    from .tiny import build_tiny

    t0 = time.time()
    out = Path(out)
    for sub in ("tiny", "shapes", "align", "sft"):
        shutil.rmtree(out / sub, ignore_errors=True)
    seconds = {}
    with con.status("building the tiny default (tokenizer, LLM and vision pretraining)..."):
        tiny = build_tiny(out / "tiny", seed=TINY_SEED + seed, **(QUICK_TINY if quick else {}))
    seconds["build_tiny"] = time.time() - t0
    t = time.time()
    files = synth_shapes(out / "shapes", n=48 if quick else N_TRAIN, n_eval=4 if quick else N_EVAL, seed=seed)
    steps = [f"train.seed={seed}"] + (["train.max_steps=3", "train.batch_size=4"] if quick else [])
    seconds["data"] = time.time() - t

    paths = [f"model.llm={tiny['llm']}", f"model.vision={tiny['vision']}", f"data.eval={files['eval']}"]
    align_cfg = load_config("tiny_align", paths + [f"data.train={files['captions']}"] + steps)
    t = time.time()
    with ui.training_bar(con, "pretrain-align") as bar:
        align = run_sft(align_cfg, out / "align", "pretrain-align", progress=bar, status=bar.status)
    seconds["pretrain_align"] = time.time() - t
    before = _eval(out / "align", align_cfg)

    sft_cfg = load_config("tiny_sft", [f"model.init_from={out / 'align'}", f"data.train={files['train']}",
                                       f"data.eval={files['eval']}"] + steps)
    t = time.time()
    with ui.training_bar(con, "sft") as bar:
        sft = run_sft(sft_cfg, out / "sft", "sft", progress=bar, status=bar.status)
    seconds["sft"] = time.time() - t
    t = time.time()
    after = _eval(out / "sft", sft_cfg)
    seconds["eval"] = time.time() - t

    ui.demo_table(con, before, after)

    metrics = {
        "vqa_accuracy_before": before["vqa_accuracy"], "vqa_accuracy_after": after["vqa_accuracy"],
        "vqa_accuracy_by_type": after["vqa_accuracy_by_type"],
        "vqa_accuracy_by_type_before": before["vqa_accuracy_by_type"],
        "pope_f1_before": before.get("pope", {}).get("f1", 0.0), "pope_f1_after": after.get("pope", {}).get("f1", 0.0),
        "pope_after": after.get("pope", {}), "align_loss_last": align["metrics"]["loss_last"],
        "sft_loss_first": sft["metrics"]["loss_first"], "sft_loss_last": sft["metrics"]["loss_last"],
        "stage_seconds": seconds, "seed": seed, "seconds": time.time() - t0,
    }
    artifacts = {"tiny": str(out / "tiny"), "data": str(out / "shapes"), "align": str(out / "align"),
                 "sft": str(out / "sft")}
    for stage in FULL_STAGES if full else []:
        m, secs, arts = stage(out, con, quick, seed)
        metrics.update(m)
        seconds.update(secs)
        artifacts.update(arts)
    metrics["seconds"] = time.time() - t0
    return {"command": "demo", "output_dir": str(out), "metrics": metrics, "artifacts": artifacts,
            "trainable_params": sft["trainable_params"], "total_params": sft["total_params"]}


# The 3600-step sft model gets nearly every held-out pair and probe question right, so DPO's gains are a
# few items: 1000 of each keeps them from hanging on one or two answers.
N_PAIRS, N_PAIRS_EVAL, N_PROBE = 24000, 1000, 1000


def _pope_fp_rate(folder: Path, probe: str, cfg) -> float:
    from ..core.generation import evaluate_model
    from ..core.model import load_model
    metrics, _ = evaluate_model(load_model(folder), probe, cfg)
    return metrics["pope"]["fp_rate"]


def run_preference_stages(out: Path, sft_dir: Path, con, quick: bool = False, seed: int = 0) -> tuple[dict, dict, dict]:
    """(metrics, seconds per stage, artifacts) of synth-preferences -> reward -> dpo -> mdpo -> ppo -> grpo from an
    sft folder."""
    import time

    from ..stages.dpo import run_dpo
    from ..stages.grpo import run_grpo
    from ..stages.ppo import run_ppo
    from ..stages.reward import run_reward
    from .synth import synth_preferences

    for sub in ("prefs", "reward", "dpo", "mdpo", "ppo", "grpo"):
        shutil.rmtree(out / sub, ignore_errors=True)
    seconds, t = {}, time.time()
    files = synth_preferences(out / "prefs", n=24 if quick else N_PAIRS, n_eval=8 if quick else N_PAIRS_EVAL,
                              n_probe=8 if quick else N_PROBE, seed=1 + seed)
    common = [f"model.init_from={sft_dir}", f"data.train={files['train']}", f"data.eval={files['eval']}",
              f"train.seed={seed}"]
    short = ["train.max_steps=3", "train.batch_size=4"] if quick else []
    seconds["prefs"] = time.time() - t

    t = time.time()
    with ui.training_bar(con, "reward") as bar:
        reward = run_reward(load_config("tiny_reward", common + short), out / "reward", progress=bar, status=bar.status)
    seconds["reward"] = time.time() - t

    t = time.time()
    dpo_cfg = load_config("tiny_dpo", common + short)
    with ui.training_bar(con, "dpo") as bar:
        dpo = run_dpo(dpo_cfg, out / "dpo", progress=bar, status=bar.status)
    fp_sft = _pope_fp_rate(sft_dir, files["pope_probe"], dpo_cfg)
    fp_dpo = _pope_fp_rate(out / "dpo", files["pope_probe"], dpo_cfg)
    seconds["dpo"] = time.time() - t

    t = time.time()  # mDPO: the same recipe as dpo, plus the image-conditional and anchor terms
    mdpo_cfg = load_config("tiny_mdpo", common + short)
    with ui.training_bar(con, "mdpo") as bar:
        mdpo = run_dpo(mdpo_cfg, out / "mdpo", progress=bar, status=bar.status)
    fp_mdpo = _pope_fp_rate(out / "mdpo", files["pope_probe"], mdpo_cfg)
    seconds["mdpo"] = time.time() - t

    t = time.time()
    ppo_cfg = load_config("tiny_ppo", common + (["ppo.rollouts=2", "ppo.rollout_size=8", "ppo.minibatch=4"] if quick else []))
    with ui.training_bar(con, "ppo") as bar:
        ppo = run_ppo(ppo_cfg, out / "ppo", progress=bar, status=bar.status)
    seconds["ppo"] = time.time() - t

    t = time.time()
    grpo_cfg = load_config("tiny_grpo", common + (["grpo.rollouts=2", "grpo.prompts=2", "grpo.num_generations=4",
                                                   "grpo.minibatch=8"] if quick else []))
    with ui.training_bar(con, "grpo") as bar:
        grpo = run_grpo(grpo_cfg, out / "grpo", progress=bar, status=bar.status)
    seconds["grpo"] = time.time() - t

    d, p, md, g = dpo["metrics"], ppo["metrics"], mdpo["metrics"], grpo["metrics"]
    metrics = {"reward_accuracy": reward["metrics"]["eval_accuracy"], "reward_margin": reward["metrics"]["eval_margin"],
               "pref_accuracy_sft": d["eval_pref_accuracy_before"], "pref_accuracy_dpo": d["eval_pref_accuracy"],
               "dpo_rewards_margin": d["eval_rewards_margin"], "pope_fp_rate_sft": fp_sft, "pope_fp_rate_dpo": fp_dpo,
               "ppo_score_first": p["score_first"], "ppo_score_last": p["score_last"], "ppo_kl_last": p["kl_last"],
               "ppo_kl_max": p["kl_max"],
               # mDPO on the same pairs and probe as DPO; image accuracy: the chosen answer likelier with its image
               # than with the corrupted one (held-out pairs)
               "pref_accuracy_mdpo": md["eval_pref_accuracy"], "pope_fp_rate_mdpo": fp_mdpo,
               "mdpo_rewards_margin": md["eval_rewards_margin"],
               "mdpo_image_accuracy_sft": md["eval_image_accuracy_before"],
               "mdpo_image_accuracy": md["eval_image_accuracy"],
               # GRPO's exact-match reward, first and last quarter of the rollouts (as ppo's)
               "grpo_score_first": g["score_first"], "grpo_score_last": g["score_last"],
               "grpo_kl_last": g.get("kl_last")}
    artifacts = {"prefs": str(out / "prefs"), "reward": str(out / "reward"), "dpo": str(out / "dpo"),
                 "mdpo": str(out / "mdpo"), "ppo": str(out / "ppo"), "grpo": str(out / "grpo")}
    return metrics, seconds, artifacts


def edge_demo_metrics(model_dir: str | Path, eval_file: str | Path, out_dir: str | Path, cfg=None,
                      block_size: int = 32, symmetric: bool = False, llava_prompts: int = 16) -> dict:
    """Export a trained model and measure what the edge path keeps, on the held-out prompts of `eval_file`:

    - `onnx_greedy_match`: fraction of prompts whose fp32 ONNX greedy tokens equal PyTorch's;
    - `int4_size_ratio`: bytes of the int4 export over the fp32 export (all graphs);
    - `vqa_accuracy_torch` / `vqa_accuracy_onnx` / `vqa_accuracy_int4`: held-out accuracy of each;
    - `hf_llava_max_logit_diff`: largest logit difference of the transformers LLaVA checkpoint (MLP connectors).
    `cfg` is the run's config (its `gen.max_new_tokens`, `data.max_length`, `data.system_prompt` are used; greedy
    whatever `gen.temperature` says). Writes `onnx/`, `onnx-int4/` and `hf-llava/` under out_dir.
    """
    import time

    from ..config import load_config
    from ..core.export import (
        export_hf_llava,
        export_onnx,
        llava_max_logit_diff,
        load_merged,
    )
    from ..core.generation import generated_tokens
    from ..edge.int4 import quantize_onnx
    from ..edge.runner import OnnxLMM
    from ..records.conversations import eval_examples
    from ..records.encoder import encoder_for
    from ..records.scoring import score
    t0 = time.time()
    cfg = cfg or load_config(None)
    cfg.data.eval = str(eval_file)
    out = Path(out_dir)
    n_new = cfg.gen.max_new_tokens

    model = load_merged(model_dir)
    examples = eval_examples(cfg.data.eval, encoder_for(model, cfg.data), cfg.data)
    ref = generated_tokens(model, examples, n_new, batch_size=cfg.gen.batch_size)

    def accuracy(tokens, decode) -> float:  # greedy answers scored like `tinyml eval`
        return score(examples, [decode(t, skip_special_tokens=True).strip() for t in tokens])["vqa_accuracy"]
    torch_acc = accuracy(ref, model.tokenizer.decode)

    export_onnx(model_dir, out / "onnx")
    fp32 = OnnxLMM(out / "onnx")
    onnx_tokens = fp32.generated_tokens(examples, n_new, batch_size=cfg.gen.batch_size)
    match = sum(a == b for a, b in zip(ref, onnx_tokens)) / len(ref)
    onnx_acc = accuracy(onnx_tokens, fp32.tokenizer.decode)

    q = quantize_onnx(out / "onnx", out / "onnx-int4", block_size=block_size, symmetric=symmetric)
    int4 = OnnxLMM(out / "onnx-int4")
    int4_tokens = int4.generated_tokens(examples, n_new, batch_size=cfg.gen.batch_size)
    int4_acc = accuracy(int4_tokens, int4.tokenizer.decode)

    metrics = {"onnx_greedy_match": match, "onnx_prompts": len(ref), "int4_size_ratio": q["size_ratio"],
               "int4_size_ratio_by_graph": q["size_ratio_by_graph"], "onnx_fp32_bytes": q["bytes_before"]["total"],
               "onnx_int4_bytes": q["bytes_after"]["total"], "vqa_accuracy_torch": torch_acc,
               "vqa_accuracy_onnx": onnx_acc, "vqa_accuracy_int4": int4_acc,
               "int4_greedy_match": sum(a == b for a, b in zip(ref, int4_tokens)) / len(ref)}
    if model.spec["connector"] in ("linear", "mlp2x_gelu"):
        export_hf_llava(model_dir, out / "hf-llava")
        metrics["hf_llava_max_logit_diff"] = llava_max_logit_diff(model_dir, out / "hf-llava",
                                                                  examples[:llava_prompts])
    metrics["edge_seconds"] = time.time() - t0
    return metrics


def bitdelta_demo_metrics(base_dir, finetuned_dir, train_file, eval_file, out_dir, progress=None, seed: int = 0,
                          status=None) -> dict:
    """The demo's BitDelta figures: the fine-tuned run compressed against its base, default settings, calibrated
    on the conversations of train_file (the fine-tuned run's own data may be preference pairs)."""
    cfg = compress_config(None, [f"data.train={train_file}", f"data.eval={eval_file}", f"train.seed={seed}"], finetuned_dir)
    m = run_compress(cfg, base_dir, finetuned_dir, out_dir, progress=progress, status=status)["metrics"]
    return {"vqa_accuracy_bitdelta_finetuned": m["vqa_accuracy_finetuned"], "bitdelta_ratio": m["ratio"], "bitdelta_ratio_total": m["ratio_total"],
            "bitdelta_kl_initial": m["kl_initial"], "bitdelta_kl_distilled": m["kl_distilled"],
            "bitdelta_top1_agreement_initial": m["top1_agreement_initial"],
            "bitdelta_top1_agreement_distilled": m["top1_agreement_distilled"],
            "vqa_accuracy_bitdelta_initial": m["vqa_accuracy_initial"],
            "vqa_accuracy_bitdelta": m["vqa_accuracy_distilled"]}

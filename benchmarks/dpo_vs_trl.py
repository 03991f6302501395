"""DPO throughput and peak memory: tinyml's `dpo` vs TRL's DPOTrainer, LoRA and full, same model, data, batch, length.

    python benchmarks/dpo_vs_trl.py --json        (needs `pip install -e ".[bench]"`)

Both sides train the random-weight LLaVA model of common.py on the same 400 synthetic preference pairs (shapes
images; prompt, chosen and rejected answers, as `tinyml data synth-preferences` writes them): sigmoid DPO loss,
beta 0.1, AdamW at the same learning rate, fp32, batch 8 pairs (16 sequences), max length 256, no dropout.
LoRA: r 8, alpha 16 on the LLM's projections, connector trained in full, gradients clipped at 1.0 on both sides;
full: every weight, tinyml with `train.optimizer_in_backward`, neither side clipping (as in sft_vs_trl.py).

How each side gets the reference log-probs, by its own default: tinyml computes them once before training, with
the starting weights (`pref.precompute_ref`); TRL runs the reference every step (the policy with its adapters
disabled for LoRA, a second model for full), as TRL 1.16 refuses `precompute_ref_log_probs` for vision data.
So that the reference costs the same on both sides, the headline tokens/s of tinyml charges its reference
pass: each trained token also pays the reference pass's seconds per token, measured in the same process
(`tokens_per_s_loop` leaves it out). Tokens are the non-pad tokens of the policy's training forwards.
`ratios` are tinyml / TRL, the worse of LoRA and full (per-method figures under `methods`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import common


def tinyml_side(info: dict, a) -> tuple:
    """tinyml's own `dpo` path (run_dpo: build, encode, reference pass, train loop), with meters around it."""
    import tinyml_cli.core.logprobs as preference
    import tinyml_cli.stages.dpo as dpo
    from tinyml_cli.config import load_config
    counter = common.TokenCounter()  # counted in the step function: run_dpo builds the model itself
    clock = common.StepClock(counter)
    make_step, logps = dpo.dpo_step, preference.policy_logps

    def counted_dpo_step(pcfg, ref=None):
        step = make_step(pcfg, ref)

        def counted(model, batch):  # chosen and rejected rows of the one policy forward
            counter.total += int(batch["attention_mask"].sum())
            return step(model, batch)
        return counted

    def timed_logps(model, pairs, collate, batch_size=32):  # the reference pass over the training pairs
        t = time.perf_counter()
        out = logps(model, pairs, collate, batch_size)
        tokens = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
        clock.extra.update(ref_seconds=time.perf_counter() - t, ref_tokens=tokens)
        return out
    dpo.dpo_step, preference.policy_logps = counted_dpo_step, timed_logps
    sets = common.tinyml_sets(info, a, common.preferences(Path(a.work)), a.method, lora_dropout=0.0)
    cfg = load_config(None, sets + ["pref.beta=0.1", "pref.loss_type=sigmoid"])
    return clock, lambda progress: dpo.run_dpo(cfg, tempfile.mkdtemp(), progress=lambda *x: progress())


def trl_side(info: dict, a) -> tuple:
    """TRL's DPOTrainer on the Llava model with its processor (its vision preference collator)."""
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"images": [image], "prompt": prompt, "chosen": rec["chosen"], "rejected": rec["rejected"]}
                              for rec, prompt, image in common.trl_preference_rows(Path(a.work))])
    processor = AutoProcessor.from_pretrained(info["llava"])
    model = LlavaForConditionalGeneration.from_pretrained(info["llava"], dtype=torch.float32)
    clock = common.StepClock(common.TokenCounter(model))
    args = DPOConfig(**common.trl_args(a, a.method), beta=0.1, loss_type=["sigmoid"])

    def go(progress):
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=processor,
                             peft_config=common.trl_lora(a.method, 0.0), callbacks=[common.tick_callback(progress)])
        trainer.train()
    return clock, go


def with_reference(run: dict) -> float:
    """tinyml's tokens/s when every trained token also pays for its share of the reference pass."""
    return run["tokens"] / (run["seconds"] + run["tokens"] * run["ref_seconds"] / run["ref_tokens"])


def main() -> None:
    a = common.start(__doc__, {"tinyml": tinyml_side, "trl": trl_side})
    if a is None:
        return
    import torch
    import trl
    info = common.build(Path(a.work))
    common.preferences(Path(a.work))
    methods = common.compare(__file__, a)
    for m in methods.values():  # the headline figure charges tinyml's reference pass (see the docstring)
        t = m["tinyml"]
        t["tokens_per_s_loop"], t["tokens_per_s_loop_runs"] = t["tokens_per_s"], t["tokens_per_s_runs"]
        t["tokens_per_s_runs"] = [with_reference(r) for r in t["runs"]]
        t["tokens_per_s"] = common.median(t["tokens_per_s_runs"])
        m["ratios"]["tokens_per_s_loop"] = t["tokens_per_s_loop"] / m["trl"]["tokens_per_s"]
        m["ratios"]["tokens_per_s"] = t["tokens_per_s"] / m["trl"]["tokens_per_s"]
    out = {"benchmark": "dpo_vs_trl", "device": "cuda" if torch.cuda.is_available() else "cpu",
           "trl_version": trl.__version__, "model": {k: v for k, v in info.items() if k != "train"},
           "setting": {"pairs": 400, "batch_size_pairs": a.batch_size, "max_length": a.max_length, "steps": a.steps,
                       "warmup": a.warmup, "repeats": a.repeats, "lr": a.lr, "threads": a.threads, "beta": 0.1,
                       "loss": "sigmoid",
                       "reference": "tinyml: precomputed before training, its cost charged per token in tokens_per_s; "
                                    "TRL: a reference forward every step",
                       "full": common.FULL_SETTING[a.in_backward],
                       "lora": "gradients clipped at 1.0 on both sides",
                       "peak_memory": "peak live tensor storage bytes (TorchDispatchMode), load + reference pass + "
                                      "training steps"},
           "methods": methods, "ratios": common.worst(methods)}
    print(json.dumps(out, indent=None if a.json else 2))


if __name__ == "__main__":
    main()

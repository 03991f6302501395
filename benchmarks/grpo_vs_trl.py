"""GRPO throughput and peak memory: tinyml's `grpo` vs TRL's GRPOTrainer, LoRA and full, same model, prompts, G,
lengths, batch and steps.

    python benchmarks/grpo_vs_trl.py --json        (needs `pip install -e ".[bench]"`)

Both sides train the random-weight LLaVA model of common.py on the prompts of the same 400 synthetic preference
pairs (an image and a question; the chosen answer is the reference of an exact-match reward): each optimizer
step samples `--num-generations` (G) responses to each of `--batch-size / G` prompts, up to `--max-new-tokens`
tokens each, at temperature 1, scores them, and takes one clipped step on them (TRL's defaults: one iteration
per generation, beta 0 so no reference model on either side, token-mean "dapo" loss, group-scaled advantages),
AdamW at the same learning rate, fp32. LoRA: r 8, alpha 16 on the LLM's projections, connector trained in full,
no dropout on either side, gradients clipped at 1.0; full: every weight, tinyml with `train.optimizer_in_backward`,
neither side clipping (as in sft_vs_trl.py).
Tokens are the non-pad tokens (prompt and response) of the training forwards; time is the wall clock between
optimizer steps, so it holds generation, scoring and the update, as a step does. Peak memory is the peak total of
live tensor storages over loading and the steps, in a separate run. `ratios` are tinyml / TRL, the worse of LoRA
and full (per-method figures under `methods`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import common


def tinyml_side(info: dict, a) -> tuple:
    """tinyml's own `grpo` path (run_grpo: build, encode, rollouts on the train loop), with meters around it."""
    import tinyml_cli.stages.grpo as grpo
    from tinyml_cli.config import load_config
    counter = common.TokenCounter()  # counted in the step function: run_grpo builds the model itself
    make_step = grpo.grpo_step

    def counted_grpo_step(g, command):
        step = make_step(g, command)

        def counted(model, batch):  # prompt + response tokens of the training forward
            counter.total += int(batch["attention_mask"].sum())
            return step(model, batch)
        return counted
    grpo.grpo_step = counted_grpo_step
    G = a.num_generations
    sets = common.tinyml_sets(info, a, common.preferences(Path(a.work)), a.method, lora_dropout=0.0)
    cfg = load_config(None, sets + ["grpo.rewards=[exact_match]", f"grpo.num_generations={G}",
                                    f"grpo.prompts={a.batch_size // G}", f"grpo.rollouts={a.steps}",
                                    f"grpo.minibatch={a.batch_size}", f"grpo.max_new_tokens={a.max_new_tokens}",
                                    "grpo.temperature=1.0", "grpo.beta=0.0", "grpo.loss_type=dapo", "grpo.epochs=1"])
    return common.StepClock(counter), lambda progress: grpo.run_grpo(cfg, tempfile.mkdtemp(),
                                                                       progress=lambda *x: progress())


def trl_side(info: dict, a) -> tuple:
    """TRL's GRPOTrainer on the Llava model with its processor (conversational prompts with an image column)."""
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import GRPOConfig, GRPOTrainer

    from tinyml_cli.records.scoring import normalize
    data = Dataset.from_list([{"image": image, "prompt": prompt, "answer": rec["chosen"][0]["content"]}
                              for rec, prompt, image in common.trl_preference_rows(Path(a.work))])
    processor = AutoProcessor.from_pretrained(info["llava"])
    model = LlavaForConditionalGeneration.from_pretrained(info["llava"], dtype=torch.float32)
    clock = common.StepClock(common.TokenCounter(model))

    def exact_match(completions, answer, **_):  # the same rule as tinyml's exact_match
        return [float(normalize(c[0]["content"]) == normalize(x)) for c, x in zip(completions, answer)]
    args = GRPOConfig(**{k: v for k, v in common.trl_args(a, a.method).items() if k != "max_length"},
                      num_generations=a.num_generations, max_completion_length=a.max_new_tokens, temperature=1.0,
                      top_k=0, beta=0.0, loss_type="dapo", num_iterations=1, disable_dropout=True)

    def go(progress):
        trainer = GRPOTrainer(model=model, args=args, reward_funcs=exact_match, train_dataset=data,
                              processing_class=processor, peft_config=common.trl_lora(a.method, 0.0),
                              callbacks=[common.tick_callback(progress)])
        trainer.train()
    return clock, go


def main() -> None:
    a = common.start(__doc__, {"tinyml": tinyml_side, "trl": trl_side})
    if a is None:
        return
    import torch
    import trl
    if a.batch_size % a.num_generations:
        raise SystemExit("--batch-size must be a multiple of --num-generations (responses per step = prompts x G)")
    info = common.build(Path(a.work))
    common.preferences(Path(a.work))
    methods = common.compare(__file__, a)
    out = {"benchmark": "grpo_vs_trl", "device": "cuda" if torch.cuda.is_available() else "cpu",
           "trl_version": trl.__version__, "model": {k: v for k, v in info.items() if k != "train"},
           "setting": {"prompts": 400, "responses_per_step": a.batch_size, "num_generations": a.num_generations,
                       "max_new_tokens": a.max_new_tokens, "steps": a.steps, "warmup": a.warmup,
                       "repeats": a.repeats, "lr": a.lr, "threads": a.threads, "temperature": 1.0, "beta": 0.0,
                       "loss": "dapo", "full": common.FULL_SETTING[a.in_backward],
                       "lora": "no dropout; gradients clipped at 1.0 on both sides",
                       "tokens": "prompt + response tokens of the training forwards",
                       "peak_memory": "peak live tensor storage bytes (TorchDispatchMode), load + generation + training"},
           "methods": methods, "ratios": common.worst(methods)}
    print(json.dumps(out, indent=None if a.json else 2))


if __name__ == "__main__":
    main()

"""Run configuration: typed sections, YAML recipes and dotted `--set section.key=value` overrides.

Unknown keys and wrongly typed values are user errors that name the key (and the closest valid ones);
the resolved config is saved as `config.yaml` beside every output.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Literal

import yaml

from . import UserError

Part = Literal["connector", "llm", "vision"]  # the parts of a composed model (core.model.PARTS)


def _f(default, help: str):
    """A dataclass field with its documentation where it is declared (shown by `tinyml recipes keys`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    vlm: str = _f("", "a published VLM instead of llm + vision + connector: hub id or folder of any "
                      "AutoModelForImageTextToText checkpoint with its processor (SmolVLM, Qwen2.5-VL, Gemma 3...)")
    llm: str = _f("", "causal LM: hub id, local folder (AutoModelForCausalLM) or a .gguf file (dequantized)")
    vision: str = _f("", "vision encoder: hub id or local folder (CLIP / SigLIP vision or full model)")
    connector: Literal["linear", "mlp2x_gelu", "resampler", "qformer", "c-abstractor", "xattn"] = _f(
        "mlp2x_gelu", "image features -> LLM: linear (VILA), mlp2x_gelu (LLaVA-1.5), resampler (Flamingo perceiver), "
                      "qformer (BLIP-2), c-abstractor (Honeybee / MM1), xattn (Flamingo gated cross-attention)")
    init_from: str = _f("", "a tinyml run folder whose saved llm, vision and connector start this run")
    vision_feature_layer: int = _f(-1, "hidden layer of the vision encoder fed to the connector (LLaVA: -2)")
    resampler_queries: int = _f(16, "number of learned queries (image tokens) of the resampler")
    resampler_layers: int = _f(2, "perceiver layers of the resampler")
    connector_tokens: int = _f(16, "c-abstractor: image tokens after its pooling (a square number)")
    xattn_every: int = _f(1, "xattn: a gated cross-attention block before every N-th LLM layer (its perceiver: "
                             "resampler_queries, resampler_layers)")
    qformer_queries: int = _f(32, "number of learned queries (image tokens) of the qformer connector")
    qformer_layers: int = _f(2, "qformer layers (self-attention, cross-attention to the image, MLP)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = _f("auto", "weights dtype (auto: bf16 on a bf16 GPU, else fp32)")
    trust_remote_code: bool = _f(False, "allow model code from the hub (off: safer)")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = _f("sdpa", "attention kernel of the LLM")


@dataclass
class DataConfig:
    train: str = _f("", "training data: JSON / JSONL, parquet file or folder, datasets folder, or hub id owner/name[:split]")
    eval: str = _f("", "held-out data for eval (same format; records may carry `type` and `answer`)")
    max_length: int = _f(512, "maximum tokens per record, image tokens included")
    system_prompt: str = _f("", "system message prepended to every conversation")
    on_error: Literal["fail", "skip"] = _f("fail", "what a bad record does: fail names it, skip lists it in skipped.txt")
    columns: dict = _f({}, "data set columns by tinyml field, e.g. {image: img, messages: dialog} (fields: image, "
                           "images, conversations, messages, prompt, chosen, rejected, id, type, answer)")
    cache_dir: str = _f("", "where encoded JSON / JSONL data sets are cached, one folder per data file, tokenizer, chat "
                            "template and encoding settings ('': ~/.cache/tinyml/encoded, or under $XDG_CACHE_HOME)")
    num_proc: int = _f(0, "processes that encode a data file into the cache (0: one per CPU up to 8; 1 for a small file)")
    group_by_length: bool = _f(False, "batches of records of similar length (sorted within groups of 64 batches of the shuffled "
                                      "order, the batches then shuffled): less padding, another data order")
    packing: bool = _f(False, "lay each micro-batch's records end to end in one row, without padding (positions restart per "
                              "record, attention stays within it): same loss, fewer tokens computed; composed models "
                              "(model.llm + model.vision), not model.vlm, xattn or prompt / prefix tuning")
    num_workers: int = _f(0, "DataLoader worker processes that open and pre-process each batch's images ahead of the "
                             "training step (0: in the training process); memory is pinned on CUDA")
    streaming: bool = _f(False, "sft / pretrain-align: read data.train (parquet, a datasets folder or a hub id) as a stream, a block "
                                "at a time, encoded as training reaches it: nothing cached or held whole; needs train.max_steps; "
                                "resume is exact")
    stream_block: int = _f(1024, "data.streaming: records read, encoded and shuffled together (the order is the data set's, "
                                 "shuffled within blocks)")


@dataclass
class TrainConfig:
    parts: list[Part] = _f(["connector"], "parts that train with peft.method=freeze")
    vision_freeze_first_n: int = _f(0, "with vision in parts: keep the first N vision layers frozen (TinyLLaVA share)")
    max_steps: int = _f(0, "optimizer steps (0: run train.epochs)")
    epochs: float = _f(1.0, "passes over the data when max_steps is 0")
    batch_size: int = _f(8, "records per micro-batch (per device)")
    grad_accum: int = _f(1, "micro-batches per optimizer step; the step's loss is the mean over all their labelled tokens "
                                "(pairs for reward / dpo), as one batch of them would give")
    lr: float = _f(1e-3, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = _f("adamw", "adamw (torch), or bitsandbytes' 8-bit AdamW (paged: states live in CUDA "
                                 "unified memory and move to CPU RAM when the card is full; on CPU, paged = adamw8bit)")
    warmup_ratio: float = _f(0.03, "fraction of steps of linear warmup")
    scheduler: Literal["cosine", "linear", "constant"] = _f("cosine", "learning-rate schedule after warmup")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)")
    optimizer_in_backward: bool = _f(False, "step each weight's optimizer inside the backward pass and free its gradient at once "
                                            "(no full gradient buffer; any method and train.optimizer; needs grad_accum 1, "
                                            "max_grad_norm 0, one process)")
    chunked_loss: bool = _f(True, "losses over the vocabulary in chunks of rows: no [tokens x vocabulary] logits tensor is ever held "
                                  "(false: the fp32 log-softmax of every labelled token at once, as before)")
    offload_activations: bool = _f(False, "keep the tensors saved for the backward pass in CPU memory until it needs them (pinned, "
                                          "copied on a side stream on CUDA); with gradient_checkpointing: each layer's input")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _f("auto", "autocast precision (auto: bf16 where the GPU supports it)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    seed: int = _f(0, "seed for weights init, data order and dropout")
    dropout: Literal["auto", "off", "on"] = _f(
        "auto", "dropout while training (peft.dropout and the models' own); off: every dropout probability 0 in the policy "
                "and the reference; auto: off for reward, dpo and ppo (as TRL: their log-prob ratios compare against "
                "eval-mode forwards) and BitDelta distillation, on for pretrain-align and sft")
    save_every: int = _f(0, "write a resumable checkpoint every N steps (0: only the final model)")
    keep_last: int = _f(2, "checkpoints kept")
    log_every: int = _f(10, "steps between metrics.jsonl lines")
    report_to: list[Literal["tensorboard", "wandb"]] = _f([], "also log metrics to these trackers (wandb offline), via accelerate (files under the run folder)")


@dataclass
class PeftConfig:
    method: Literal["full", "freeze", "lora", "qlora", "dora", "ia3", "bitfit", "adapter", "prompt-tuning", "prefix-tuning",
                    "llama-adapter", "tinytl"] = _f(
        "freeze", "full: every weight; freeze: train.parts; qlora: 4-bit LLM + LoRA; bitfit: biases only; adapter: Houlsby "
                  "bottlenecks; llama-adapter: zero-gated adaption prompts in the top layers; tinytl: lite residual "
                  "branches + biases (least activation memory); the others as in peft")
    parts: list[Part] = _f(["llm"], "where lora / dora / qlora, bitfit and adapter apply (ia3, prompt-tuning, "
                                   "prefix-tuning: llm only)")
    r: int = _f(8, "LoRA rank")
    alpha: int = _f(16, "LoRA alpha")
    dropout: float = _f(0.05, "LoRA dropout")
    target_modules: str = _f("all-linear", "LoRA targets: all-linear or comma-separated module names")
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "qlora: 4-bit type of the frozen LLM weights (bitsandbytes)")
    double_quant: bool = _f(True, "qlora: quantize the quantization constants too (saves ~0.4 bit per weight)")
    adapter_size: int = _f(16, "adapter: bottleneck width of each adapter (after every attention and MLP block)")
    adapter_layers: int = _f(8, "llama-adapter: top LLM layers that get adaption prompts (peft.virtual_tokens each)")
    virtual_tokens: int = _f(8, "prompt-tuning / prefix-tuning: learned tokens (or key/value prefixes) prepended")


@dataclass
class GenConfig:
    max_new_tokens: int = _f(16, "tokens generated per answer")
    temperature: float = _f(0.0, "0: greedy; > 0: sampling")
    top_p: float = _f(1.0, "nucleus sampling mass")
    batch_size: int = _f(64, "prompts per generation batch")


@dataclass
class PrefConfig:
    beta: float = _f(0.1, "dpo / kto: strength of the pull towards the reference (higher: stay closer); simpo: the "
                          "reward scale (paper: 2-2.5); orpo: the weight of the odds-ratio term (lambda)")
    loss_type: Literal["sigmoid", "ipo", "ipo_norm", "simpo", "orpo", "mdpo"] = _f(
        "sigmoid", "dpo: sigmoid (DPO); ipo (IPO on summed response log-probs); ipo_norm (IPO on per-token mean "
                   "log-probs, TRL's ipo: the 1/(2 beta) target then holds per token, not per response); simpo / orpo "
                   "(no reference model); mdpo (DPO + the chosen answer with the true image over a corrupted one + an "
                   "anchored chosen reward); kto is its own command")
    label_smoothing: float = _f(0.0, "dpo: conservative DPO / SimPO, the assumed share of flipped labels (0: none)")
    rpo_alpha: float = _f(0.0, "dpo: weight of the chosen answer's per-token NLL added to the loss (RPO; for simpo "
                               "TRL's cpo_alpha; 0: none)")
    precompute_ref: bool = _f(True, "dpo / kto: reference log-probs once before training (no reference model in memory)")
    simpo_gamma: float = _f(0.5, "simpo: the target margin gamma of beta x (avg log-prob chosen - rejected)")
    mdpo_anchor: float = _f(0.0, "mdpo: the margin the chosen reward is kept above (delta; paper: 0)")
    mdpo_crop: float = _f(0.2, "mdpo: the corrupted image is a random crop of at most this share of the image's area, "
                               "resized back (paper: 0-20 %)")
    desirable_weight: float = _f(1.0, "kto: weight of the desirable answers' loss (raise it when they are fewer)")
    undesirable_weight: float = _f(1.0, "kto: weight of the undesirable answers' loss")
    halva_alpha: float = _f(0.5, "halva: weight of the token-wise KL to the reference on the rest of the correct answer")
    margin: float = _f(0.0, "reward: Bradley-Terry margin, -log sigmoid(r_chosen - r_rejected - margin)")


@dataclass
class PPOConfig:
    reward: str = _f("exact_match", "a rule (exact_match: the response equals the record's reference answer; answer_tags; "
                                    "format) or a reward model folder")
    rollouts: int = _f(20, "generate -> score -> update rounds")
    rollout_size: int = _f(64, "prompts sampled per rollout")
    epochs: int = _f(2, "passes over each rollout")
    minibatch: int = _f(32, "responses per optimizer step")
    temperature: float = _f(1.0, "sampling temperature of the rollouts")
    max_new_tokens: int = _f(4, "tokens generated per response")
    kl_ctl: float = _f(0.05, "weight of the per-token KL penalty (initial value when adaptive)")
    adaptive_kl: bool = _f(False, "adapt kl_ctl towards kl_target (Ziegler et al. 2019)")
    kl_target: float = _f(0.5, "adaptive_kl: target KL per response")
    kl_horizon: int = _f(1000, "adaptive_kl: responses over which kl_ctl may change by about e")
    gamma: float = _f(1.0, "GAE discount")
    lam: float = _f(0.95, "GAE lambda")
    clip: float = _f(0.2, "policy ratio clip range")
    value_clip: float = _f(0.2, "value clip range around the rollout's values")
    vf_coef: float = _f(0.5, "weight of the value loss (the critic shares the policy's backbone)")


@dataclass
class BitDeltaConfig:
    loss: Literal["mse", "kl"] = _f("mse", "scale distillation objective on the logits of every real position: mse (the "
                                           "paper's mean squared error) or kl (KL(fine-tuned || compressed))")


@dataclass
class GRPOConfig:
    rewards: list[str] = _f(["exact_match"], "grpo / rloo: rewards summed per response: exact_match | answer_tags (the "
                                             "<answer>...</answer> text) | format (grpo.format_pattern) | a reward model folder")
    reward_weights: list[float] = _f([], "grpo / rloo: weight of each reward, in the order of grpo.rewards (empty: all 1)")
    format_pattern: str = _f("", "grpo / rloo: the regular expression of the format reward, matched against the whole "
                                 "response (empty: <think>...</think> then <answer>...</answer>)")
    num_generations: int = _f(8, "grpo / rloo: G, the responses sampled per prompt (a group)")
    prompts: int = _f(8, "grpo / rloo: prompts per rollout (a rollout holds prompts x num_generations responses)")
    rollouts: int = _f(20, "grpo / rloo: sample -> score -> update rounds")
    epochs: int = _f(1, "grpo / rloo: passes over each rollout (TRL's num_iterations; more reuse it off-policy, clipped)")
    minibatch: int = _f(64, "grpo / rloo: responses per micro-batch")
    temperature: float = _f(1.0, "grpo / rloo: sampling temperature (log-probs are those of the tempered policy)")
    max_new_tokens: int = _f(32, "grpo / rloo: tokens generated per response (dr_grpo's constant normaliser)")
    beta: float = _f(0.0, "grpo / rloo: weight of the KL to the reference (grpo: k3 per token in the loss; rloo: the "
                          "summed log-ratio as a reward penalty); 0: no reference model is kept")
    clip: float = _f(0.2, "grpo / rloo: the importance ratio is clipped below at 1 - clip")
    clip_high: float = _f(0.2, "grpo / rloo: ... and above at 1 + clip_high (DAPO's clip-higher: 0.28)")
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = _f("dapo", "grpo: mean over response tokens (dapo), over responses "
                                                               "of each one's token mean (grpo), or sum / (responses x max_new_tokens) (dr_grpo)")
    scale_rewards: Literal["group", "batch", "none"] = _f("group", "grpo: advantages divided by the std of the group, of "
                                                                   "the rollout, or not at all (none: Dr. GRPO)")
    normalize_advantages: bool = _f(False, "rloo: whiten the leave-one-out advantages over the rollout")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    pref: PrefConfig = field(default_factory=PrefConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    bitdelta: BitDeltaConfig = field(default_factory=BitDeltaConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fields() -> dict[str, tuple[type, dataclasses.Field]]:
    """`section.key` -> (declared type, field), in declaration order."""
    out = {}
    for sec in dataclasses.fields(RunConfig):
        cls = sec.default_factory
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{sec.name}.{f.name}"] = (hints[f.name], f)
    return out


def choices(key: str) -> tuple[str, ...]:
    """The valid values of a choice-valued key (or of each item of a list of choices); () for free values."""
    kind = _fields()[key][0]
    if typing.get_origin(kind) is list:
        kind = typing.get_args(kind)[0]
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


def all_keys() -> dict[str, str]:
    """Every `section.key` with its help text (its valid values appended, for a choice)."""
    out = {}
    for key, (_, f) in _fields().items():
        valid = choices(key)
        out[key] = f.metadata.get("help", "") + (f" [{' | '.join(valid)}]" if valid else "")
    return out


def _choice(key: str, value: str, valid: tuple) -> str:
    if value in valid:
        return value
    close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"{key}={value!r} is not valid{hint}: choose {', '.join(valid)}")


def _coerce(key: str, value, kind):
    """Check a value against the key's declared type; ints are accepted for floats, choices against their values."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads on / off and yes / no as booleans: take the choice it was
            spelled = [w for w in (("on", "yes", "true") if value else ("off", "no", "false")) if w in typing.get_args(kind)]
            value = spelled[0] if spelled else value
        if not isinstance(value, str):
            raise UserError(f"{key} must be one of {', '.join(typing.get_args(kind))}, got {value!r}")
        return _choice(key, value, typing.get_args(kind))
    if origin is list or kind is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}")
        valid = choices(key)
        if typing.get_args(kind) and typing.get_args(kind)[0] is float:
            try:
                return [float(v) for v in value]
            except (TypeError, ValueError):
                raise UserError(f"{key} must be a list of numbers, got {value!r}") from None
        return [_choice(key, str(v), valid) if valid else str(v) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float) and isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
        try:
            return kind(value)
        except ValueError:
            raise UserError(f"{key} must be {kind.__name__}, got {value!r}") from None
    if kind is dict:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise UserError(f"{key} must be a mapping of names, like {{image: img}}, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{key} must be {kind.__name__}, got {value!r}")
    return value


def _set(cfg: RunConfig, key: str, value) -> None:
    fields = _fields()
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else f" (valid sections: {', '.join(f.name for f in dataclasses.fields(RunConfig))})"
        raise UserError(f"unknown config key '{key}'{hint}")
    section, name = key.split(".", 1)
    setattr(getattr(cfg, section), name, _coerce(key, value, fields[key][0]))


def check(cfg: RunConfig) -> RunConfig:
    """Rules that tie keys together or bound a number, checked when the recipe loads (before any model does)."""
    t, p, pref, ppo, g = cfg.train, cfg.peft, cfg.pref, cfg.ppo, cfg.grpo
    if t.optimizer_in_backward:
        why = [need for bad, need in (
            (t.grad_accum != 1, "train.grad_accum=1 (gradients cannot add up over micro-batches; raise train.batch_size instead)"),
            (t.max_grad_norm > 0, "train.max_grad_norm=0 (clipping by the global norm needs every gradient before any step)"),
            (t.mixed_precision == "fp16", "train.mixed_precision no or bf16 (the fp16 loss scaler unscales all gradients before the step)"),
        ) if bad]
        if why:
            raise UserError("train.optimizer_in_backward needs " + "; ".join(why))
    if cfg.model.vlm and (cfg.model.llm or cfg.model.vision):
        raise UserError("model.vlm is a whole model: leave model.llm and model.vision unset with it")
    if cfg.data.packing and (cfg.model.vlm or cfg.model.connector == "xattn" or p.method in ("prompt-tuning", "prefix-tuning")):
        raise UserError("data.packing needs a composed model (model.llm + model.vision, not xattn) and a method other than "
                        "prompt-tuning / prefix-tuning")
    if cfg.data.streaming:
        why = [need for bad, need in (
            (t.max_steps <= 0, "train.max_steps (a stream's length is not known before it is read)"),
            (cfg.data.num_workers > 0, "data.num_workers=0 (its batches are made in the training process)"),
            (cfg.data.group_by_length, "data.group_by_length=false (it sorts the whole data set's lengths)"),
        ) if bad]
        if why:
            raise UserError("data.streaming needs " + "; ".join(why))
    if cfg.model.vlm and p.method in ("ia3", "adapter", "prompt-tuning", "prefix-tuning", "llama-adapter", "tinytl"):
        raise UserError(f"peft.method={p.method} is not available for model.vlm checkpoints: use full, freeze, "
                        "lora, dora, qlora or bitfit")
    if p.method in ("ia3", "prompt-tuning", "prefix-tuning", "llama-adapter") and list(dict.fromkeys(p.parts)) != ["llm"]:
        raise UserError(f"peft.method={p.method} applies to the LLM only: set peft.parts=[llm]")
    if p.method == "qlora" and "llm" not in p.parts:
        raise UserError("peft.method=qlora puts LoRA on the 4-bit LLM: peft.parts must include llm")
    if p.method not in ("full", "freeze") and not p.parts:
        raise UserError("peft.parts is empty: name where the method applies (llm, vision, connector)")
    bounds = [("train.batch_size", t.batch_size >= 1, "at least 1"), ("train.grad_accum", t.grad_accum >= 1, "at least 1"),
              ("train.max_steps", t.max_steps >= 0, "0 or more"), ("data.max_length", cfg.data.max_length >= 1, "at least 1"),
              ("data.num_proc", cfg.data.num_proc >= 0, "0 or more"), ("data.num_workers", cfg.data.num_workers >= 0, "0 or more"),
              ("data.stream_block", cfg.data.stream_block >= 1, "at least 1"),
              ("peft.virtual_tokens", p.virtual_tokens >= 1, "at least 1"),
              ("peft.adapter_layers", p.adapter_layers >= 1, "at least 1"), ("peft.adapter_size", p.adapter_size >= 1, "at least 1"),
              ("pref.beta", pref.beta > 0, "> 0"), ("pref.label_smoothing", 0 <= pref.label_smoothing < 0.5, "in [0, 0.5)"),
              ("pref.rpo_alpha", pref.rpo_alpha >= 0, ">= 0"), ("pref.mdpo_crop", 0 < pref.mdpo_crop < 1, "in (0, 1)"),
              ("pref.desirable_weight", pref.desirable_weight > 0, "> 0"),
              ("pref.undesirable_weight", pref.undesirable_weight > 0, "> 0"), ("ppo.temperature", ppo.temperature > 0, "> 0 (rollouts are sampled)"),
              ("ppo.rollouts", ppo.rollouts >= 1, "at least 1"), ("ppo.rollout_size", ppo.rollout_size >= 1, "at least 1"),
              ("ppo.minibatch", ppo.minibatch >= 1, "at least 1"), ("ppo.epochs", ppo.epochs >= 1, "at least 1"),
              ("grpo.num_generations", g.num_generations >= 2, "at least 2 (advantages compare the samples of a prompt)"),
              ("grpo.prompts", g.prompts >= 1, "at least 1"), ("grpo.rollouts", g.rollouts >= 1, "at least 1"),
              ("grpo.epochs", g.epochs >= 1, "at least 1"), ("grpo.minibatch", g.minibatch >= 1, "at least 1"),
              ("grpo.temperature", g.temperature > 0, "> 0 (rollouts are sampled)"),
              ("grpo.max_new_tokens", g.max_new_tokens >= 1, "at least 1"), ("grpo.beta", g.beta >= 0, ">= 0"),
              ("grpo.clip", 0 < g.clip < 1, "in (0, 1)"), ("grpo.clip_high", g.clip_high > 0, "> 0")]
    for key, ok, need in bounds:
        if not ok:
            section, name = key.split(".")
            raise UserError(f"{key} must be {need}, got {getattr(getattr(cfg, section), name)}")
    if g.reward_weights and len(g.reward_weights) != len(g.rewards):
        raise UserError(f"grpo.reward_weights has {len(g.reward_weights)} weights for {len(g.rewards)} rewards "
                        f"({', '.join(g.rewards)})")
    if not g.rewards:
        raise UserError("grpo.rewards is empty: name exact_match, answer_tags, format or a reward model folder")
    return cfg


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        full = f"{prefix}{k}"
        if isinstance(v, dict) and "." not in full:
            out.update(_flatten(v, full + "."))
        else:
            out[full] = v
    return out


def recipe_path(path: str | Path) -> Path:
    """A recipe file, or a recipe shipped with tinyml given by name (`tiny_sft`)."""
    p = Path(path)
    if p.exists():
        return p
    shipped = files("tinyml_cli.recipes") / (p.name if p.suffix == ".yaml" else p.name + ".yaml")
    return Path(str(shipped)) if shipped.is_file() else p


def _recipe_not_found(path: str | Path) -> UserError:
    """A missing recipe file; a bare name is compared with the shipped recipes' names."""
    p, names = Path(path), list(_recipe_files())
    if p.parent != Path(".") or p.suffix not in ("", ".yaml"):
        return UserError(f"config file not found: {p}")
    close = difflib.get_close_matches(p.stem, names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return UserError(f"config file not found: {p} ({hint}shipped recipes: {', '.join(names)})")


# What save_config records about a run beside its recipe (the command, bitdelta's input folders). A saved
# config.yaml is a recipe that runs again as it is, so these top-level keys are accepted and ignored on load.
RUN_INFO = ("command", "base", "finetuned")


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                defaults: dict | None = None) -> RunConfig:
    """Defaults of the command, then the YAML recipe, then `--set key=value` overrides."""
    cfg = RunConfig()
    for k, v in (defaults or {}).items():
        _set(cfg, k, v)
    if path:
        p = recipe_path(path)
        if not p.is_file():
            raise _recipe_not_found(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{p}: a recipe must be a mapping of sections")
        data = {k: v for k, v in data.items() if k not in RUN_INFO or isinstance(v, dict)}
        for k, v in _flatten(data).items():
            _set(cfg, k, v)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set takes section.key=value, got '{item}'")
        k, raw = item.split("=", 1)
        try:
            v = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            v = raw
        if v is None:
            v = ""
        _set(cfg, k.strip(), v)
    return check(cfg)


def save_config(cfg: RunConfig, out_dir: str | Path, extra: dict | None = None) -> Path:
    """The resolved recipe as `config.yaml` (a recipe `-c` runs again), with `extra` run facts (RUN_INFO keys)."""
    unknown = set(extra or {}) - set(RUN_INFO)
    if unknown:  # a key load_config does not know would make the saved file fail to load again
        raise ValueError(f"save_config: {sorted(unknown)} are not RUN_INFO keys")
    p = Path(out_dir) / "config.yaml"
    data = cfg.to_dict()
    if extra:
        data.update(extra)
    p.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return p


def config_from_dict(data: dict) -> RunConfig:
    """Rebuild a RunConfig from a saved config.yaml (sections other than the run's are ignored)."""
    cfg = RunConfig()
    for k, v in _flatten({s: data[s] for s in data if s in {f.name for f in dataclasses.fields(RunConfig)}}).items():
        _set(cfg, k, v)
    return cfg


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def model_source_problem(value: str) -> str | None:
    """Why a model source (model.llm, model.vision: a folder or a hub id) cannot load, found without loading it;
    None when it may. A value that cannot be a hub id (`name` or `owner/name`) must be a folder here."""
    if Path(value).expanduser().is_dir():
        return None
    hub_like = re.fullmatch(r"[\w.-]{1,96}(/[\w.-]{1,96})?", value) and ".." not in value and "--" not in value \
        and not value.startswith(".")
    if not hub_like:
        return "no such folder" if not Path(value).expanduser().exists() else "not a folder"
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(value, "config.json"), str):
            return "no such folder, and no hub model of that name in the local cache (HF_HUB_OFFLINE is set)"
    return None


def _recipe_files() -> dict:
    return {f.name[:-5]: f for f in sorted(files("tinyml_cli.recipes").iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml") and f.is_file()}


def _opening(text: str) -> tuple[str, str]:
    """(what it is, the command that runs it) from a recipe's opening comment block."""
    comments = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comments.append(" ".join(line.lstrip("#").split()))
    commands = [c for c in comments if c.startswith("tinyml ")]
    # the line that runs this recipe names it with -c; the lines before it may prepare data
    command = next((c for c in commands if " -c " in c), commands[0] if commands else "")
    return (comments[0] if comments else ""), command


def shipped_recipes() -> list[dict]:
    out = []
    for name, f in _recipe_files().items():
        about, command = _opening(f.read_text(encoding="utf-8"))
        out.append({"name": name, "about": about, "command": command})
    return out


def recipe_text(name: str) -> str:
    found = _recipe_files()
    key = name[:-5] if name.endswith(".yaml") else name
    if key not in found:
        raise UserError(f"no shipped recipe '{name}' (shipped: {', '.join(found)})")
    return found[key].read_text(encoding="utf-8")

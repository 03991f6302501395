"""The memory planner: exact counts of the known configs, the breakdown arithmetic, fit advice, the CPU tracker."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tinyml_cli.config import load_config
from tinyml_cli.estimate import (GIB, MetaLMM, Setting, advice, estimate, gpu_table, largest_batch,
                                 llm_layer_activations, qlora_weight_bytes, verdict)
from tinyml_cli.memtrack import PeakTensorMemory

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


# ------------------------------------------------------------------------------- exact parameter counts
def llama_like(c, qkv_bias=False, norm_params=1):
    """Analytic count of a Llama / Qwen2 / StableLM decoder from its config values."""
    h, i, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    attn = h * h + 2 * h * kv + h * h + (h + 2 * kv if qkv_bias else 0)
    layer = attn + 3 * h * i + 2 * norm_params * h
    return V * h * (1 if c["tie_word_embeddings"] else 2) + L * layer + norm_params * h


def phi(c):
    h, i, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * h  # q k v dense with bias; fc1, fc2; one LayerNorm
    return 2 * V * h + V + L * layer + 2 * h  # embeddings, lm_head with bias, final LayerNorm


def vit(v, clip):
    h, i, L, p, s = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["patch_size"], v["image_size"]
    n = (s // p) ** 2
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    mlp = h * i + i + i * h + h
    if clip:  # class token, bias-free patch conv, CLS position, pre- and post-LayerNorm
        return h + 3 * p * p * h + (n + 1) * h + 2 * h + L * layer + 2 * h
    head = h + 3 * h * h + 3 * h + h * h + h + 2 * h + mlp  # SigLIP's attention-pooling head
    return 3 * p * p * h + h + n * h + L * layer + 2 * h + head


LLMS = {"tinyllama-1.1b": (lambda c: llama_like(c), 1_100_048_384),
        "qwen2.5-0.5b": (lambda c: llama_like(c, qkv_bias=True), 494_032_768),
        "phi-2": (phi, 2_779_683_840),
        "stablelm-2-1.6b": (lambda c: llama_like(c, qkv_bias=True, norm_params=2), None)}


def _cfg(*sets):
    return load_config(None, list(sets))


@pytest.mark.parametrize("name", list(LLMS))
def test_known_llm_counts_are_exact(name):
    formula, public = LLMS[name]
    c = json.loads((CONFIGS / name / "config.json").read_text())
    from tinyml_cli.estimate import param_counts
    counts = param_counts(MetaLMM(_cfg(f"model.llm={CONFIGS / name}",
                                       f"model.vision={CONFIGS / 'clip-vit-large-patch14-336'}"), torch.bfloat16))
    assert counts["llm"] == formula(c)
    if public:
        assert counts["llm"] == public


@pytest.mark.parametrize("name,clip,public", [("siglip-so400m-patch14-384", False, 428_225_600),
                                              ("clip-vit-large-patch14-336", True, 303_507_456)])
def test_known_vision_counts_are_exact(name, clip, public):
    v = json.loads((CONFIGS / name / "config.json").read_text())["vision_config"]
    meta = MetaLMM(_cfg(f"model.llm={CONFIGS / 'qwen2.5-0.5b'}", f"model.vision={CONFIGS / name}"), torch.bfloat16)
    n = sum(p.numel() for p in meta.vision.parameters())
    assert n == vit(v, clip) == public
    # the connector between them: mlp2x_gelu, vision width -> LLM width -> LLM width
    assert sum(p.numel() for p in meta.connector.parameters()) == v["hidden_size"] * 896 + 896 + 896 * 896 + 896


def test_lora_trainable_count_from_the_meta_model():
    """TinyLlama with LoRA r=8 on all linear layers of every decoder layer, plus the trained connector."""
    cfg = _cfg(f"model.llm={CONFIGS / 'tinyllama-1.1b'}", f"model.vision={CONFIGS / 'siglip-so400m-patch14-384'}",
               "peft.method=lora", "train.parts=[connector,llm]", "data.max_length=1024")
    p = estimate(cfg, Setting(batch=1, seq=1024)).params
    h, i, kv = 2048, 5632, 256
    per_layer = 8 * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    connector = 1152 * h + h + h * h + h
    assert p["adapters"] == 22 * per_layer
    assert p["trainable"] == 22 * per_layer + connector
    assert p["llm"] == 1_100_048_384


# ------------------------------------------------------------------------------ breakdown arithmetic
@pytest.fixture(scope="module")
def tiny_sets(tiny):
    return [f"model.llm={tiny / 'llm'}", f"model.vision={tiny / 'vision'}", "train.parts=[connector,llm]"]


def test_breakdown_sums_and_overheads(tiny_sets):
    cfg = _cfg(*tiny_sets, "peft.method=full")
    cpu = estimate(cfg, Setting(device="cpu", batch=4, seq=64))
    assert sum(cpu.breakdown.values()) == cpu.tensor_bytes == cpu.total_bytes
    n = cpu.params["total"]
    assert cpu.params["trainable"] == n  # full: every weight
    assert cpu.detail["gradients_bytes"] == 4 * n and cpu.breakdown["optimizer_states"] == 8 * n  # fp32, AdamW
    gpu = estimate(cfg, Setting(device="cuda", batch=4, seq=64))
    assert gpu.detail["gradients_bytes"] == 2 * n and gpu.breakdown["optimizer_states"] == 4 * n  # bf16 weights
    assert gpu.breakdown["weights_llm"] == 2 * cpu.params["llm"]
    assert gpu.total_bytes == gpu.tensor_bytes + gpu.breakdown["cuda_context"] + gpu.breakdown["allocator_overhead"]
    eight = estimate(cfg, Setting(device="cuda", batch=4, seq=64, optimizer="adamw8bit"))
    assert eight.breakdown["optimizer_states"] == 2 * n + 8 * -(-n // 256)


def test_activations_scale_with_tokens_and_checkpointing_saves(tiny_sets):
    cfg = _cfg(*tiny_sets, "peft.method=lora")
    a = estimate(cfg, Setting(device="cpu", batch=4, seq=128))
    b = estimate(cfg, Setting(device="cpu", batch=8, seq=128))
    assert b.breakdown["activations"] == 2 * a.breakdown["activations"]
    assert b.detail["llm_layer_activation_bytes"] == 2 * a.detail["llm_layer_activation_bytes"]
    assert b.breakdown["logits"] > a.breakdown["logits"]
    c = estimate(cfg, Setting(device="cpu", batch=8, seq=128, checkpointing=True))
    assert c.tensor_bytes < b.tensor_bytes


def test_layer_activations_by_hand(tiny_sets):
    """The tiny LLM: h=64, i=192, 8 heads of 8 (no GQA); bytes per token of one decoder layer in fp32."""
    lcfg = MetaLMM(_cfg(*tiny_sets), torch.float32).lcfg
    frozen = 4 * 64 * 4 + 8 * 4 + 2 * 64 * 4 + 2 * 4 + 3 * 192 * 4  # q k v out, lse, norm inputs, 1/rms, MLP
    assert llm_layer_activations(_cfg(*tiny_sets, "peft.method=freeze"), lcfg, 4, "cpu", False) == frozen
    assert llm_layer_activations(_cfg(*tiny_sets), lcfg, 4, "cpu", True) == frozen + (4 * 64 + 192) * 4
    lora = _cfg(*tiny_sets, "peft.method=lora", "peft.dropout=0.05")
    inputs = 6 * 64 + 192  # in-features of q k v o gate up (64) and down (192)
    assert llm_layer_activations(lora, lcfg, 4, "cpu", False) == frozen + 7 * 8 * 4 + inputs * (4 + 4)
    frozen_bf16 = 4 * 64 * 2 + 8 * 4 + 2 * 64 * 4 + 2 * 4 + 3 * 192 * 2  # norm inputs stay fp32
    assert llm_layer_activations(lora, lcfg, 2, "cuda", False) == frozen_bf16 + 7 * 8 * 4 + inputs * (2 + 1)  # bool mask
    no_dropout = _cfg(*tiny_sets, "peft.method=lora", "peft.dropout=0")
    assert llm_layer_activations(no_dropout, lcfg, 4, "cpu", False) == frozen + 7 * 8 * 4 + (64 + 64 + 192) * 4


def test_qlora_weights_as_stored():
    n = 4096 * 4096
    assert qlora_weight_bytes(n, double_quant=True) == n // 2 + n // 64 + 4 * (n // 64 // 256)
    assert qlora_weight_bytes(n, double_quant=False) == n // 2 + 4 * (n // 64)
    cfg = _cfg(f"model.llm={CONFIGS / 'tinyllama-1.1b'}", f"model.vision={CONFIGS / 'siglip-so400m-patch14-384'}",
               "data.max_length=1024")
    lora = estimate(replace_method(cfg, "lora"), Setting(batch=1, seq=1024)).breakdown["weights_llm"]
    qlora = estimate(replace_method(cfg, "qlora"), Setting(batch=1, seq=1024)).breakdown["weights_llm"]
    assert qlora < 0.4 * lora  # 4-bit body, bf16 embeddings and head


def replace_method(cfg, method):
    import copy
    cfg = copy.deepcopy(cfg)
    cfg.peft.method = method
    return cfg


# ------------------------------------------------------------------------------------- cards and advice
def test_verdicts_and_card_table():
    assert verdict(int(7 * GIB), 8) == "fits"
    assert verdict(int(7.5 * GIB), 8) == "tight"
    assert verdict(int(8.1 * GIB), 8) == "no"
    table = gpu_table(int(11 * GIB))
    assert {r["gib"] for r in table} >= {8, 10, 11, 12, 16, 20, 24}
    assert [r["verdict"] for r in table if r["gib"] in (10, 12, 24)] == ["no", "tight", "fits"]


def test_advice_makes_a_big_setting_fit():
    cfg = _cfg(f"model.llm={CONFIGS / 'tinyllama-1.1b'}", f"model.vision={CONFIGS / 'siglip-so400m-patch14-384'}",
               "peft.method=lora", "train.parts=[connector,llm]", "data.max_length=2048", "train.batch_size=8")
    setting = Setting(device="cuda", batch=8, seq=2048)
    base = estimate(cfg, setting)
    assert verdict(base.total_bytes, 12) == "no"
    tips = {a["change"].split(" (")[0]: a for a in advice(cfg, setting, 12)}
    assert tips["gradient checkpointing"]["total_bytes"] < base.total_bytes
    assert tips["qlora"]["total_bytes"] < base.total_bytes
    assert tips["sequence 1024"]["total_bytes"] < base.total_bytes
    assert tips["64 image tokens"]["total_bytes"] < base.total_bytes
    b = largest_batch(cfg, setting, 12)
    assert b >= 1
    assert estimate(cfg, replace(setting, batch=b)).total_bytes <= 0.9 * 12 * GIB
    assert estimate(cfg, replace(setting, batch=b + 1)).total_bytes > 0.9 * 12 * GIB


def test_inference_kv_cache():
    cfg = _cfg(f"model.llm={CONFIGS / 'tinyllama-1.1b'}", f"model.vision={CONFIGS / 'siglip-so400m-patch14-384'}")
    e = estimate(cfg, Setting(mode="infer", batch=2, context=4096, kv_bytes=2, seq=1024))
    assert e.breakdown["kv_cache"] == 2 * 22 * 4 * 64 * 2 * 4096 * 2  # k and v, layers, kv heads, head dim
    assert "gradients" not in e.breakdown


# ------------------------------------------------------------------------------------ the CPU tracker
def test_tracker_counts_live_tensor_bytes():
    w = torch.nn.Linear(10, 10, bias=False)  # 400 bytes, registered up front
    with PeakTensorMemory(w) as mem:
        a = torch.ones(1000)  # 4000
        b = a * 2  # 4000: peak 8400
        del a
        c = b + 1  # a is gone: 8400 again, not 12400
        view = c[:10]  # a view shares its storage: nothing new
        assert mem.current == 400 + 8000
    assert mem.peak == 8400
    del b, c, view


@pytest.mark.slow
def test_measured_peak_of_real_steps_is_near_the_estimate(tiny_sets):
    from tinyml_cli.estimate import measure
    for method, ckpt in [("lora", False), ("full", True)]:
        cfg = _cfg(*tiny_sets, f"peft.method={method}", "train.batch_size=4", "data.max_length=96",
                   f"train.gradient_checkpointing={str(ckpt).lower()}")
        got = measure(cfg, device="cpu")["measured_bytes"]
        est = estimate(cfg, Setting(device="cpu", batch=4, seq=96, checkpointing=ckpt)).tensor_bytes
        assert abs(est / got - 1) < 0.10, (method, est, got)


def test_cli_estimate_json(tiny):
    r = subprocess.run([sys.executable, "-m", "tinyml_cli", "estimate", "--json", "--device", "cpu",
                        "--set", f"model.llm={tiny / 'llm'}", "--set", f"model.vision={tiny / 'vision'}",
                        "--set", "peft.method=lora", "--set", "data.max_length=64"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    m = out["metrics"]
    assert out["command"] == "estimate"
    assert set(m["params"]) >= {"llm", "vision", "connector", "total", "trainable"}
    assert m["total_bytes"] == sum(m["breakdown"].values())
    assert out["gpus"] and out["advice"]
    bad = subprocess.run([sys.executable, "-m", "tinyml_cli", "estimate", "--set", f"model.llm={tiny / 'llm'}",
                          "--set", f"model.vision={tiny / 'vision'}", "--optimizer", "sgd"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "optimizer" in bad.stderr

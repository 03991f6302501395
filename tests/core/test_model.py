import pytest
import torch

from tinyml_cli.core.batching import Collator, ImageLoader
from tinyml_cli.core.connectors import build_connector
from tinyml_cli.core.model import build_model, load_model, load_vision
from tinyml_cli.records.conversations import load_examples
from tinyml_cli.records.encoder import Encoder


@pytest.mark.parametrize("kind,tokens", [("linear", 16), ("mlp2x_gelu", 16), ("resampler", 8)])
def test_connector_shapes(kind, tokens):
    c = build_connector(kind, 64, 48, queries=8, layers=2)
    out = c(torch.randn(2, 16, 64))
    assert out.shape == (2, tokens, 48)
    assert c.num_tokens(16) == tokens


def test_resampler_is_independent_of_patch_count():
    c = build_connector("resampler", 64, 48, queries=4, layers=1)
    assert c(torch.randn(3, 100, 64)).shape == (3, 4, 48)


def _batch(model, shapes, n=3, left=False, gen=False):
    enc = Encoder(model.tokenizer, model.num_image_tokens, 256)
    ex, _ = load_examples(shapes / "eval.jsonl", enc, for_generation=gen)
    return Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor), left_pad=left)(ex[:n]), ex[:n]


def test_save_load_round_trip_identical_logits(tiny_model, shapes, tmp_path):
    batch, _ = _batch(tiny_model, shapes)
    tiny_model.eval()
    with torch.no_grad():
        ref = tiny_model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        loss = tiny_model(**batch)
    tiny_model.save(tmp_path / "m")
    for f in ["tinyml_model.json", "connector.safetensors", "llm/config.json", "llm/model.safetensors",
              "llm/tokenizer.json", "vision/config.json", "vision/preprocessor_config.json"]:
        assert (tmp_path / "m" / f).is_file(), f
    back = load_model(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(back(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]), ref)
        assert torch.equal(back(**batch), loss)


def test_image_changes_the_output(tiny_model, shapes):
    batch, _ = _batch(tiny_model, shapes)
    with torch.no_grad():
        a = tiny_model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        b = tiny_model(batch["input_ids"], batch["attention_mask"], torch.zeros_like(batch["pixel_values"]))
    assert not torch.allclose(a, b)


def test_batched_generation_equals_one_by_one(tiny_model, shapes):
    batch, ex = _batch(tiny_model, shapes, n=4, left=True, gen=True)
    batch.pop("labels")
    together = tiny_model.generate(**batch, max_new_tokens=4)
    for i in range(4):
        one, _ = _batch(tiny_model, shapes, n=4, left=True, gen=True)
        single = Collator(tiny_model.tokenizer.pad_token_id, ImageLoader(tiny_model.image_processor), left_pad=True)([ex[i]])
        single.pop("labels")
        alone = tiny_model.generate(**single, max_new_tokens=4)[0]
        row = together[i][: len(alone)]
        assert torch.equal(row, alone), i


def _save_clip_vision(path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    m = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, projection_dim=32))
    m.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)


def test_clip_vision_drops_cls_token(tiny_cfg, tmp_path):
    _save_clip_vision(tmp_path / "clip")
    cfg = tiny_cfg(f"model.vision={tmp_path / 'clip'}", "model.vision_feature_layer=-2")
    model = build_model(cfg.model)
    assert model.num_image_tokens == 16
    feats = model.encode_images(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 16, model.spec["llm_dim"])


def test_vision_from_full_siglip_checkpoint(tmp_path):
    """Real SigLIP repos hold the text tower too: the vision tower loads from them with its weights."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel
    full = SiglipModel(SiglipConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)))
    full.save_pretrained(tmp_path / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")
    vision, proc = load_vision(str(tmp_path / "siglip"))
    w = full.vision_model.embeddings.patch_embedding.weight
    assert torch.equal(vision.embeddings.patch_embedding.weight, w)


def test_missing_model_path_is_a_user_error(tiny_cfg):
    from tinyml_cli import UserError
    with pytest.raises(UserError, match="cannot load"):
        build_model(tiny_cfg("model.llm=/nonexistent/llm").model)


def test_pickled_weights_are_refused(tiny, tmp_path):
    """Weights load only from safetensors: a pickle-only checkpoint is a user error, never unpickled."""
    import shutil

    from transformers import AutoModelForCausalLM

    from tinyml_cli import UserError
    from tinyml_cli.core.model import load_llm
    llm = AutoModelForCausalLM.from_pretrained(tiny / "llm")
    shutil.copytree(tiny / "llm", tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save(llm.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot load LLM"):
        load_llm(str(tmp_path / "pickled"))


def test_remote_code_is_off_by_default():
    from tinyml_cli.config import RunConfig
    assert RunConfig().model.trust_remote_code is False


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "ia3"])
def test_adapter_model_round_trip_identical_logits(tiny_cfg, shapes, tmp_path, method):
    """A (Q)LoRA folder reloads with the base weights it trained on: peft's wrapped layers are not saved."""
    from tinyml_cli.core.model import build_model
    from tinyml_cli.core.trainable import configure_trainable, quantization_config
    cfg = tiny_cfg(f"peft.method={method}", "peft.r=4")
    torch.manual_seed(0)
    model = build_model(cfg.model, quantization_config=quantization_config(cfg, torch.float32))
    configure_trainable(model, cfg)
    with torch.no_grad():  # lora_B starts at zero and IA3 vectors at one: make the adapters do something
        for n, p in model.llm.named_parameters():
            if "lora_B" in n or "ia3_l" in n:
                p.normal_(1.0 if "ia3_l" in n else 0.0, 0.5)
    batch, _ = _batch(model, shapes)
    # Saved before any eval-mode forward, as after training: bitsandbytes repacks 4-bit weights for its CPU
    # inference kernel on the first such forward, and unpacking them again for a save is not exact.
    model.save(tmp_path / "m")
    model.eval()
    with torch.no_grad():
        ref = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    back = load_model(tmp_path / "m").eval()
    with torch.no_grad():
        out = back(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        with back.llm.disable_adapter():  # and the adapters matter, so the comparison above means something
            assert not torch.allclose(back(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]), ref,
                                      atol=1e-3)


def test_4bit_llm_with_odd_widths_runs_inference_on_cpu(tmp_path, tiny):
    """bitsandbytes' fast CPU kernel fails on widths that are not multiples of 32 / 64; load_llm routes such
    layers to its general kernel, so any model loaded in 4-bit evaluates."""
    from transformers import (
        AutoTokenizer,
        BitsAndBytesConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from tinyml_cli.core.model import load_llm
    tok = AutoTokenizer.from_pretrained(tiny / "llm")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "odd")
    tok.save_pretrained(tmp_path / "odd")
    llm, _ = load_llm(str(tmp_path / "odd"), quantization_config=BitsAndBytesConfig(load_in_4bit=True,
                                                                                     bnb_4bit_compute_dtype=torch.float32))
    assert llm.is_loaded_in_4bit
    llm.eval()
    with torch.no_grad():
        logits = llm(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, len(tok)) and torch.isfinite(logits).all()

"""bitfit, bottleneck adapters, prompt tuning and prefix tuning: analytic trainable counts, frozen weights
bit-identical after training, the loss going down, and the saved result loading back."""

import json
import shutil

import pytest
import torch

from tinyml_cli import UserError
from tinyml_cli.data import Collator, Encoder, ImageLoader, load_examples
from tinyml_cli.model import build_model, count_params, load_model
from tinyml_cli.sft import configure_trainable, run_sft


def _batch(model, shapes, n=3, gen=False):
    enc = Encoder(model.tokenizer, model.num_image_tokens, 256)
    ex, _ = load_examples(shapes / "eval.jsonl", enc, for_generation=gen)
    batch = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor), left_pad=gen)(ex[:n])
    return batch


def _fresh(cfg):
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model)


def _train_and_compare(cfg, out, trained_prefixes):
    """Train, reload, and check that exactly the parameters under `trained_prefixes` moved."""
    r = run_sft(cfg, out, "sft")
    assert r["metrics"]["loss_last"] < r["metrics"]["loss_first"]
    fresh = _fresh(cfg)  # the same seed gives the same initial adapters as the run's
    configure_trainable(fresh, cfg)
    before = dict(fresh.named_parameters())
    after = dict(load_model(out).named_parameters())
    assert before.keys() == after.keys()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(n.startswith(trained_prefixes) for n in moved), sorted(moved)[:5]
    return r, moved


# ------------------------------------------------------------------------------------------------- bitfit
def test_bitfit_on_an_llm_without_biases_names_what_has_none(tiny_cfg):
    cfg = tiny_cfg("peft.method=bitfit", "peft.parts=[llm]")
    with pytest.raises(UserError, match=r"the llm \(LlamaForCausalLM\) has no bias terms .*attention_bias and "
                                        r"mlp_bias off.*connector, vision"):
        configure_trainable(_fresh(cfg), cfg)


def test_bitfit_trains_exactly_the_biases_of_vision_and_connector(tiny_cfg, tmp_path):
    cfg = tiny_cfg("peft.method=bitfit", "peft.parts=[vision,connector]", "train.parts=[]", "train.lr=1e-2",
                   "train.max_steps=8")
    model = _fresh(cfg)
    configure_trainable(model, cfg)
    v = model.vision.config
    h, i, layers = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    per_layer = 4 * h + i + h + 2 * h  # q k v out, fc1, fc2, two layer norms
    head = 3 * h + h + h + i + h  # SigLIP's pooling head: attention in / out, layer norm, fc1, fc2
    vision = layers * per_layer + h + h + head  # + patch embedding and post layer norm
    connector = 2 * model.spec["llm_dim"]  # mlp2x_gelu: two linear layers
    assert count_params(model)[0] == vision + connector
    _, moved = _train_and_compare(cfg, tmp_path / "bitfit", ("vision.", "connector."))
    assert all(n.endswith(".bias") for n in moved)


def test_bitfit_on_an_llm_with_biases(tiny, tiny_cfg, tmp_path):
    """An LLM built with attention biases (as Qwen2's q / k / v): bitfit trains those and only those."""
    shutil.copytree(tiny / "llm", tmp_path / "llm")
    conf = json.loads((tmp_path / "llm" / "config.json").read_text())
    (tmp_path / "llm" / "config.json").write_text(json.dumps({**conf, "attention_bias": True}))
    cfg = tiny_cfg(f"model.llm={tmp_path / 'llm'}", "peft.method=bitfit", "train.parts=[]")
    model = _fresh(cfg)
    configure_trainable(model, cfg)
    c = model.llm.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    assert count_params(model)[0] == c.num_hidden_layers * (c.hidden_size + 2 * kv + c.hidden_size)


# ------------------------------------------------------------------------------------- bottleneck adapters
def test_fresh_adapters_leave_the_model_unchanged(tiny_cfg, shapes):
    cfg = tiny_cfg("peft.method=adapter", "peft.parts=[llm,vision]")
    model = _fresh(cfg).eval()
    batch = _batch(model, shapes)
    with torch.no_grad():
        ref = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        configure_trainable(model, cfg)
        assert torch.equal(model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]), ref)
        for a in model.adapters.modules():  # and they are really in the path: a non-zero up-projection changes it
            if hasattr(a, "up"):
                a.up.weight.normal_()
        assert not torch.allclose(model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]), ref)


def test_adapters_train_exactly_their_analytic_count_and_reload(tiny_cfg, shapes, tmp_path):
    cfg = tiny_cfg("peft.method=adapter", "peft.adapter_size=8", "train.parts=[]", "train.lr=1e-2",
                   "train.max_steps=8")
    model = _fresh(cfg)
    configure_trainable(model, cfg)
    c, s = model.llm.config, 8
    per_adapter = c.hidden_size * s + s + s * c.hidden_size + c.hidden_size
    assert count_params(model)[0] == c.num_hidden_layers * 2 * per_adapter  # after attention and after MLP
    _train_and_compare(cfg, tmp_path / "adapter", ("adapters.llm.",))
    assert (tmp_path / "adapter" / "adapters.safetensors").is_file()
    spec = json.loads((tmp_path / "adapter" / "tinyml_model.json").read_text())
    assert spec["bottleneck_adapters"] == {"size": 8, "parts": ["llm"]}
    # the saved LLM is the plain base: it loads in transformers without the adapters
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "llm")
    trained = load_model(tmp_path / "adapter").eval()
    batch = _batch(trained, shapes)
    with torch.no_grad():
        a = trained(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        again = load_model(tmp_path / "adapter").eval()(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        plain = build_model(cfg.model).eval()
        assert torch.equal(a, again)
        assert not torch.allclose(a, plain(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]))


def test_adapter_needs_transformer_blocks(tiny_cfg):
    cfg = tiny_cfg("peft.method=adapter", "peft.parts=[connector]")
    with pytest.raises(UserError, match=r"connector \(MLPConnector\) has no transformer layers"):
        configure_trainable(_fresh(cfg), cfg)


# --------------------------------------------------------------------------------- prompt / prefix tuning
@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_virtual_tokens_give_peft_s_own_loss(tiny_cfg, shapes, method):
    """tinyml prepends the learned prompt itself (image tokens are embedded before the LLM runs); its loss is
    the one peft's forward computes with the labels padded by -100 for the virtual tokens."""
    cfg = tiny_cfg(f"peft.method={method}", "peft.virtual_tokens=5")
    model = _fresh(cfg)
    configure_trainable(model, cfg)
    batch = _batch(model, shapes)
    seen = {}
    decoder = model.base_llm().get_decoder()
    def look(module, args, kw):  # the cache grows during the forward: read its length on the way in
        cache = kw.get("past_key_values")
        seen.update(kw, prefix=cache.get_seq_length() if cache is not None else 0)
    hook = decoder.register_forward_pre_hook(look, with_kwargs=True)
    with torch.no_grad():
        ours = model(**batch)
    hook.remove()
    n, length = 5, batch["input_ids"].shape[1]
    assert seen["attention_mask"].shape[1] == length + n and bool(seen["attention_mask"][:, :n].all())
    if method == "prompt-tuning":  # the learned embeddings come first, then the sequence with its image tokens
        assert seen["inputs_embeds"].shape[1] == length + n
        prompt = model.llm.prompt_encoder["default"].embedding.weight
        assert torch.equal(seen["inputs_embeds"][0, :n], prompt)
    else:  # a prefix of n keys / values in every layer
        assert seen["inputs_embeds"].shape[1] == length and seen["prefix"] == n
    with torch.no_grad():
        emb = model.embed(batch["input_ids"], batch["pixel_values"])
        theirs = model.llm(inputs_embeds=emb, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-6), (ours, theirs)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_virtual_tokens_train_save_and_generate(tiny_cfg, shapes, tmp_path, method):
    cfg = tiny_cfg(f"peft.method={method}", "peft.virtual_tokens=4", "train.parts=[]", "train.lr=3e-2",
                   "train.max_steps=8")
    model = _fresh(cfg)
    configure_trainable(model, cfg)
    c = model.llm.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    assert count_params(model)[0] == (4 * c.hidden_size if method == "prompt-tuning"
                                      else 4 * c.num_hidden_layers * 2 * kv)
    out = tmp_path / method
    r = run_sft(cfg, out, "sft")
    assert r["metrics"]["loss_last"] < r["metrics"]["loss_first"]
    assert (out / "llm_adapter" / "adapter_config.json").is_file()
    assert (out / "llm_adapter" / "adapter_model.safetensors").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "llm"), out / "llm_adapter")
    fresh = _fresh(cfg)
    loaded = load_model(out).eval()
    base = dict(loaded.base_llm().named_parameters())
    assert all(torch.equal(p, base[n]) for n, p in fresh.llm.named_parameters())  # the LLM did not move
    # greedy generation follows the training-time forward token by token (positions, prefix and mask agree)
    batch = _batch(loaded, shapes, n=1, gen=True)
    batch.pop("labels")
    new = loaded.generate(**batch, max_new_tokens=3)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for tok in new:
            logits = loaded(ids, mask, batch["pixel_values"])
            assert int(logits[0, -1].argmax()) == int(tok)
            ids, mask = torch.cat([ids, tok.view(1, 1)], 1), torch.cat([mask, mask[:, :1]], 1)
    # and left-padded batches generate what each prompt does alone
    batch = _batch(loaded, shapes, n=4, gen=True)
    batch.pop("labels")
    together = loaded.generate(**batch, max_new_tokens=3)
    for i in range(4):
        keep = batch["attention_mask"][i].bool()
        alone = loaded.generate(batch["input_ids"][i:i + 1, keep], batch["attention_mask"][i:i + 1, keep],
                                batch["pixel_values"][i:i + 1], max_new_tokens=3)[0]
        assert torch.equal(together[i][:len(alone)], alone), i


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "ia3", "prompt-tuning", "prefix-tuning"])
def test_llm_only_methods_refuse_other_parts(tiny_cfg, method):
    cfg = tiny_cfg(f"peft.method={method}", "peft.parts=[llm,vision]")
    with pytest.raises(UserError, match="applies to the LLM only"):
        configure_trainable(_fresh(cfg), cfg)

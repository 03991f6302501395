"""The Q-Former connector (BLIP-2): a fixed number of query tokens that read the image by cross-attention."""

import torch

from tinyml_cli.core.connectors import QFormerConnector, build_connector
from tinyml_cli.core.model import build_model, load_model


def test_qformer_gives_one_token_per_query_whatever_the_patches():
    c = build_connector("qformer", 64, 48, queries=6, layers=2)
    assert isinstance(c, QFormerConnector) and c.num_tokens(16) == 6
    for patches in (4, 16, 100):
        assert c(torch.randn(2, patches, 64)).shape == (2, 6, 48)


def test_qformer_queries_attend_to_each_other_and_to_the_image():
    torch.manual_seed(0)
    c = build_connector("qformer", 64, 48, queries=4, layers=1).eval()
    x = torch.randn(1, 9, 64)
    with torch.no_grad():
        ref = c(x)
        assert not torch.allclose(c(torch.randn(1, 9, 64)), ref)  # the output depends on the image
        c.layers[0].cross_attn.out_proj.weight.zero_()
        c.layers[0].cross_attn.out_proj.bias.zero_()
        # without cross-attention it cannot see the image at all
        assert torch.allclose(c(x), c(torch.randn(1, 9, 64)))
        q = c.latents.clone()
        c.latents[0].add_(1.0)  # and self-attention lets one query change the others' outputs
        assert not torch.allclose(c(x)[0, 1:], ref[0, 1:])
        c.latents.copy_(q)


def test_qformer_model_saves_and_loads(tiny_cfg, shapes, tmp_path):
    from tinyml_cli.core.model import recipe_encoder as encoder_for
    cfg = tiny_cfg("model.connector=qformer", "model.qformer_queries=5", "model.qformer_layers=1")
    model = build_model(cfg.model)
    assert model.num_image_tokens == 5 and encoder_for(cfg).n_img == 5
    feats = model.encode_images(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 5, model.spec["llm_dim"])
    model.save(tmp_path / "m")
    back = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.eval().encode_images(x), model.eval().encode_images(x))


def test_qformer_connector_trains_from_a_recipe(tiny_cfg, shapes, tmp_path):
    """model.connector=qformer in a recipe: pretrain-align trains the Q-Former alone and lowers the loss."""
    from tinyml_cli.stages.sft import run_sft
    cfg = tiny_cfg("model.connector=qformer", "model.qformer_queries=4", "model.qformer_layers=1",
                   "train.parts=[connector]", "train.lr=3e-3", "train.max_steps=6")
    r = run_sft(cfg, tmp_path / "align", "pretrain-align")
    torch.manual_seed(cfg.train.seed)
    fresh, trained = build_model(cfg.model), load_model(tmp_path / "align")
    assert isinstance(trained.connector, QFormerConnector) and trained.num_image_tokens == 4
    d, l = fresh.spec["vision_dim"], fresh.spec["llm_dim"]
    attention, mlp = 4 * d * d + 4 * d, 2 * d + d * 4 * d + 4 * d + 4 * d * d + d  # (q k v in, out); norm, fc, fc
    layer = 3 * 2 * d + 2 * attention + mlp  # three norms, self- and cross-attention, MLP
    assert r["trainable_params"] == 4 * d + 1 * layer + 2 * d + d * l + l  # queries, layers, norm, projection
    before, after = dict(fresh.named_parameters()), dict(trained.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(n.startswith("connector.") for n in moved)
    from tinyml_cli.core.batching import Collator, ImageLoader
    from tinyml_cli.records.conversations import load_examples
    from tinyml_cli.records.encoder import Encoder
    enc = Encoder(fresh.tokenizer, 4, 256)
    ex, _ = load_examples(shapes / "train.jsonl", enc)
    batch = Collator(fresh.tokenizer.pad_token_id, ImageLoader(fresh.image_processor))(ex[:16])
    with torch.no_grad():
        assert trained.eval()(**batch) < fresh.eval()(**batch)


# ------------------------------------------------------------------------------------------- c-abstractor
def test_c_abstractor_pools_the_patch_grid_to_its_tokens():
    from tinyml_cli import UserError
    from tinyml_cli.core.connectors import CAbstractorConnector
    torch.manual_seed(0)
    c = build_connector("c-abstractor", 32, 48, queries=4).eval()
    assert isinstance(c, CAbstractorConnector) and c.num_tokens(16) == 4
    x = torch.randn(2, 16, 32)
    out = c(x)
    assert out.shape == (2, 4, 48)
    # locality: changing the top-left quarter of the patch grid changes the top-left token most
    y = x.clone().reshape(2, 4, 4, 32)
    y[:, :2, :2] += 3.0
    delta = (c(y.reshape(2, 16, 32)) - out).abs().mean(-1)[0]
    assert delta.argmax().item() == 0
    d, l = 32, 48  # 4 residual blocks (two GroupNorms and two 3x3 convs each), then Linear-GELU-Linear
    assert sum(p.numel() for p in c.parameters()) == 4 * (2 * 2 * d + 2 * (9 * d * d + d)) + d * l + l + l * l + l
    with __import__("pytest").raises(UserError, match="square grid"):
        build_connector("c-abstractor", 32, 48, queries=5)


def test_c_abstractor_model_trains_saves_and_loads(tiny_cfg, tmp_path):
    from tinyml_cli.stages.sft import run_sft
    cfg = tiny_cfg("model.connector=c-abstractor", "model.connector_tokens=4", "train.parts=[connector]",
                   "train.lr=3e-3", "train.max_steps=6", "train.batch_size=8")
    r = run_sft(cfg, tmp_path / "align", "pretrain-align")
    assert r["metrics"]["loss_last"] < r["metrics"]["loss_first"]
    torch.manual_seed(cfg.train.seed)
    fresh, back = build_model(cfg.model), load_model(tmp_path / "align")
    assert back.num_image_tokens == 4 and back.spec["connector_tokens"] == 4
    before, after = dict(fresh.named_parameters()), dict(back.named_parameters())
    assert {n for n in before if not torch.equal(before[n], after[n])} <= {n for n in before if n.startswith("connector.")}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        again = load_model(tmp_path / "align").eval()
        assert torch.equal(back.eval().encode_images(x), again.encode_images(x))
        assert back.encode_images(x).shape == (2, 4, back.spec["llm_dim"])


# ----------------------------------------------------------------------------------------------- xattn
def _batch(model, shapes, n=4):
    from tinyml_cli.core.batching import Collator, ImageLoader
    from tinyml_cli.records.conversations import load_examples
    from tinyml_cli.records.encoder import Encoder
    ex, _ = load_examples(shapes / "train.jsonl", Encoder(model.tokenizer, model.num_image_tokens, 256))
    return Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor))(ex[:n])


def test_xattn_starts_as_the_llm_alone(tiny_cfg, shapes):
    """Gates at zero: with images in cross-attention, the logits equal the language model's own on the text."""
    from tinyml_cli.core.connectors import XAttnConnector
    cfg = tiny_cfg("model.connector=xattn", "model.resampler_queries=4", "model.resampler_layers=1")
    model = build_model(cfg.model).eval()
    assert isinstance(model.connector, XAttnConnector) and model.num_image_tokens == 0
    n_layers = model.llm.config.num_hidden_layers
    assert len(model.connector.blocks) == n_layers  # xattn_every 1
    b = _batch(model, shapes)
    assert not (b["input_ids"] == model.image_token_id).any()  # no image token in the sequence
    with torch.no_grad():
        ours = model(b["input_ids"], b["attention_mask"], b["pixel_values"])
        alone = model.llm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        assert torch.allclose(ours, alone, atol=1e-5)
        for blk in model.connector.blocks:  # an open gate makes the image matter
            blk.attn_gate.fill_(1.0)
        assert not torch.allclose(model(b["input_ids"], b["attention_mask"], b["pixel_values"]), alone, atol=1e-3)
        other = model(b["input_ids"], b["attention_mask"], torch.randn_like(b["pixel_values"]))
        assert not torch.allclose(other, model(b["input_ids"], b["attention_mask"], b["pixel_values"]), atol=1e-4)


def test_xattn_trains_opens_its_gates_and_reloads(tiny_cfg, shapes, tmp_path):
    from tinyml_cli.stages.sft import run_sft
    cfg = tiny_cfg("model.connector=xattn", "model.resampler_queries=4", "model.resampler_layers=1",
                   "model.xattn_every=2", "train.parts=[connector]", "train.lr=3e-3", "train.max_steps=8")
    r = run_sft(cfg, tmp_path / "x", "pretrain-align")
    assert r["metrics"]["loss_last"] < r["metrics"]["loss_first"]
    torch.manual_seed(cfg.train.seed)
    fresh, back = build_model(cfg.model).eval(), load_model(tmp_path / "x").eval()
    assert len(back.connector.blocks) == -(-back.llm.config.num_hidden_layers // 2)
    assert all(float(b.attn_gate.abs()) > 0 and float(b.ff_gate.abs()) > 0 for b in back.connector.blocks)
    for n, p in fresh.llm.named_parameters():  # the LLM and the vision tower stay as they were
        assert torch.equal(p, dict(back.llm.named_parameters())[n]), n
    d, l, q = fresh.spec["vision_dim"], fresh.spec["llm_dim"], 4
    attention = lambda k: 4 * k * k + 4 * k  # noqa: E731 - in-projection (q, k, v) and out-projection
    perceiver = 2 * 2 * d + attention(d) + 2 * d + d * 4 * d + 4 * d + 4 * d * d + d
    resampler = q * d + perceiver + 2 * d + d * l + l
    block = 2 * 2 * l + attention(l) + l * 4 * l + 4 * l + 4 * l * l + l + 2
    assert r["trainable_params"] == resampler + len(back.connector.blocks) * block
    b = _batch(back, shapes)
    with torch.no_grad():
        model2 = load_model(tmp_path / "x").eval()
        assert torch.equal(back(b["input_ids"], b["attention_mask"], b["pixel_values"]),
                           model2(b["input_ids"], b["attention_mask"], b["pixel_values"]))
        ids = b["input_ids"][:1, :12]
        out = back.generate(ids, torch.ones_like(ids), b["pixel_values"][:1], max_new_tokens=3)
        assert out.shape[0] == 1


def test_xattn_export_is_refused_in_one_line(tiny_cfg, tmp_path):
    import pytest

    from tinyml_cli import UserError
    from tinyml_cli.core.export import export_onnx
    cfg = tiny_cfg("model.connector=xattn", "model.resampler_queries=4", "model.resampler_layers=1")
    build_model(cfg.model).save(tmp_path / "m")
    with pytest.raises(UserError, match="xattn connector"):
        export_onnx(tmp_path / "m", tmp_path / "onnx")

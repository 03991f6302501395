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

"""The Q-Former connector (BLIP-2): a fixed number of query tokens that read the image by cross-attention."""

import torch

from tinyml_cli.model import QFormerConnector, build_connector, build_model, load_model


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
    from tinyml_cli.data import encoder_for
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

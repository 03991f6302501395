"""LLaVA both ways: tinyml's model -> `export --format hf-llava` -> taken back in as a composed model, identical."""

import pytest
import torch

from tinyml_cli import UserError
from tinyml_cli.core.batching import Collator, ImageLoader
from tinyml_cli.core.export import export_hf_llava
from tinyml_cli.core.model import is_model_dir, load_model
from tinyml_cli.records.conversations import load_examples
from tinyml_cli.records.encoder import Encoder


@pytest.fixture(scope="module")
def round_trip(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava")
    tiny_model.save(out / "tinyml")
    export_hf_llava(out / "tinyml", out / "llava")
    return out / "tinyml", out / "llava"


def test_an_hf_llava_export_loads_back_with_identical_logits_and_answers(tiny_model, round_trip, shapes):
    src, llava = round_trip
    assert is_model_dir(llava) and not (llava / "tinyml_model.json").exists()
    back = load_model(llava).eval()
    orig = load_model(src).eval()
    assert back.spec["connector"] == "mlp2x_gelu" and back.num_image_tokens == orig.num_image_tokens
    enc = Encoder(orig.tokenizer, orig.num_image_tokens, 256)
    ex, _ = load_examples(shapes / "eval.jsonl", enc, for_generation=True)
    batch = Collator(orig.tokenizer.pad_token_id, ImageLoader(orig.image_processor), left_pad=True)(ex[:4])
    batch.pop("labels")
    with torch.no_grad():
        a = orig(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        b = back(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert torch.equal(a, b)
    assert torch.equal(orig.generate(**batch, max_new_tokens=4), back.generate(**batch, max_new_tokens=4))


def test_a_llava_folder_saves_as_a_tinyml_folder(round_trip, tmp_path):
    _, llava = round_trip
    model = load_model(llava)
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "tinyml_model.json").is_file()
    assert load_model(tmp_path / "m").spec["imported_from"] == "hf-llava"


def test_a_llava_checkpoint_with_a_multi_layer_feature_is_refused(round_trip, tmp_path):
    import json
    import shutil
    _, llava = round_trip
    shutil.copytree(llava, tmp_path / "l")
    cfg = json.loads((tmp_path / "l" / "config.json").read_text())
    cfg["vision_feature_layer"] = [-2, -1]
    (tmp_path / "l" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="several layers"):
        load_model(tmp_path / "l")


@pytest.mark.slow
def test_onnx_export_of_a_llava_checkpoint_matches_pytorch(round_trip, shapes, tmp_path):
    from tinyml_cli.core.export import export_onnx
    from tinyml_cli.core.generation import generated_tokens
    from tinyml_cli.edge.runner import OnnxLMM
    _, llava = round_trip
    model = load_model(llava)
    export_onnx(llava, tmp_path / "onnx")
    runner = OnnxLMM(tmp_path / "onnx")
    ex, _ = load_examples(shapes / "eval.jsonl", Encoder(model.tokenizer, model.num_image_tokens, 256),
                          for_generation=True)
    assert runner.generated_tokens(ex[:6], 4) == generated_tokens(model, ex[:6], 4)

"""Data formats: parquet, `datasets` folders and hub ids give the batches JSONL gives; OpenAI content parts;
column mapping; TRL preference records."""

import json

import pytest

from tinyml_cli import UserError
from tinyml_cli.core.batching import Collator, ImageLoader
from tinyml_cli.records.conversations import load_examples, messages_of
from tinyml_cli.records.encoder import Encoder
from tinyml_cli.records.preferences import preference_record
from tinyml_cli.records.sources import is_hub_id, read_records, rename_columns


@pytest.fixture
def enc(tiny_model):
    return Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, max_length=256)


def _shapes_rows(shapes, n=8):
    """The first n shapes records with their images as {"bytes", "path"} structs, as parquet holds them."""
    rows = [r for _, r in read_records(shapes / "train.jsonl")][:n]
    return rows, [{**r, "image": {"bytes": (shapes / r["image"]).read_bytes(), "path": r["image"]}} for r in rows]


def _batches(path, enc, tiny_model, **kw):
    ex, _ = load_examples(path, enc, **kw)
    col = Collator(tiny_model.tokenizer.pad_token_id, ImageLoader(tiny_model.image_processor))
    return [col(ex[i:i + 4]) for i in range(0, len(ex), 4)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].equal(y[k]), k


def test_jsonl_parquet_and_datasets_folder_give_identical_batches(shapes, enc, tiny_model, tmp_path):
    import datasets
    from PIL import Image
    rows, with_bytes = _shapes_rows(shapes)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:  # the JSONL's images sit beside it
        (tmp_path / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / r["image"]).write_bytes((shapes / r["image"]).read_bytes())
    ref = _batches(tmp_path / "d.jsonl", enc, tiny_model)

    datasets.Dataset.from_list(with_bytes).to_parquet(str(tmp_path / "d.parquet"))
    _same(ref, _batches(tmp_path / "d.parquet", enc, tiny_model))
    (tmp_path / "pq").mkdir()  # a folder of parquet shards
    datasets.Dataset.from_list(with_bytes[:4]).to_parquet(str(tmp_path / "pq" / "train-0.parquet"))
    datasets.Dataset.from_list(with_bytes[4:]).to_parquet(str(tmp_path / "pq" / "train-1.parquet"))
    _same(ref, _batches(tmp_path / "pq", enc, tiny_model))

    # a `datasets` folder whose image column holds PIL images (stored by datasets as PNG bytes)
    pil = [{**r, "image": Image.open(shapes / r["image"]).convert("RGB")} for r in rows]
    feats = datasets.Features({**{k: v for k, v in datasets.Dataset.from_list(rows).features.items()},
                               "image": datasets.Image()})
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pil, features=feats)}).save_to_disk(str(tmp_path / "ds"))
    _same(ref, _batches(tmp_path / "ds", enc, tiny_model))


def test_hub_id_goes_through_load_dataset(shapes, enc, tiny_model, tmp_path, monkeypatch):
    import datasets
    rows, with_bytes = _shapes_rows(shapes, 4)
    calls = []

    def fake_load_dataset(name, split):  # stands in for the network: the same call a user's hub id makes
        calls.append((name, split))
        return datasets.Dataset.from_list(with_bytes)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    ex, _ = load_examples("someone/shapes:validation", enc)
    assert calls == [("someone/shapes", "validation")] and len(ex) == 4
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not looked up on the hub"):
        load_examples("someone/shapes", enc)
    assert is_hub_id("owner/name") and not is_hub_id("runs/shapes/train.jsonl") and not is_hub_id("d/t.jsonl")


def test_openai_content_parts_match_llava_text():
    oai = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}
    llava = {"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    assert messages_of(oai) == messages_of(llava)
    with pytest.raises(ValueError, match="unknown content part"):
        messages_of({"messages": [{"role": "user", "content": [{"type": "audio"}]}]})


def test_column_mapping():
    rec = {"img": "a.png", "dialog": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}], "x": 1}
    out = rename_columns(rec, {"image": "img", "conversations": "dialog"})
    assert out == {"image": "a.png", "conversations": rec["dialog"], "x": 1}


@pytest.mark.slow
def test_messages_data_set_trains(shapes, tiny_cfg, tmp_path):
    """An OpenAI-style `messages` data set with renamed columns, in parquet with image bytes, trains."""
    import datasets

    from tinyml_cli.stages.sft import run_sft
    _, with_bytes = _shapes_rows(shapes, 16)
    rows = []
    for r in with_bytes:
        msgs = []
        for t in r["conversations"]:
            text = t["value"].replace("<image>\n", "")
            parts = ([{"type": "image"}] if "<image>" in t["value"] else []) + [{"type": "text", "text": text}]
            msgs.append({"role": "user" if t["from"] == "human" else "assistant", "content": parts})
        rows.append({"picture": r["image"], "messages": msgs})
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "m.parquet"))
    cfg = tiny_cfg(f"data.train={tmp_path / 'm.parquet'}", "data.columns={image: picture}", "train.max_steps=2")
    result = run_sft(cfg, tmp_path / "run", "sft")
    assert result["metrics"]["examples"] == 16 and result["metrics"]["loss_last"] > 0
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_conversational_trl_preference_records(shapes, enc):
    img = {"bytes": (shapes / "images" / "000000.png").read_bytes(), "path": "000000.png"}
    conv = {"id": 7, "images": [img],
            "prompt": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                       {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]}
    assert preference_record(conv) == {"id": 7, "image": [img], "chosen": "red", "rejected": "blue",
                                       "prompt": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "<image>\nWhat color?"}]}
    # standard form: strings, the placeholder added in front of a prompt that has none
    std = {"image": "x.png", "prompt": "What color?", "chosen": "red", "rejected": "blue"}
    assert preference_record(std)["prompt"] == "<image>\nWhat color?"
    # implicit prompt: chosen and rejected are whole conversations sharing the user turn
    user = {"role": "user", "content": "<image>\nWhat color?"}
    implicit = {"images": ["x.png"], "chosen": [user, {"role": "assistant", "content": "red"}],
                "rejected": [user, {"role": "assistant", "content": "blue"}]}
    assert preference_record(implicit) == {"image": ["x.png"], "prompt": [user], "chosen": "red", "rejected": "blue"}
    # multi-turn prompts stay multi-turn; images without a placeholder go to the first user turn
    multi = {"images": ["x.png"], "chosen": "a", "rejected": "b",
             "prompt": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                        {"role": "user", "content": "q2"}]}
    assert [t["content"] for t in preference_record(multi)["prompt"]] == ["<image>\nq1", "a1", "q2"]
    with pytest.raises(ValueError, match="'rejected' is empty"):
        preference_record({"prompt": "q", "chosen": "a", "rejected": " "})
    with pytest.raises(ValueError, match="list of"):
        preference_record({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"})


@pytest.mark.slow
def test_conversational_trl_preference_data_set_trains(shapes, tiny, tmp_path):
    """TRL's conversational preference layout, images as bytes in a `datasets` folder, renamed columns: dpo
    encodes it like the same pairs in tinyml's JSONL form, and trains on it."""
    import datasets

    from tinyml_cli.config import load_config
    from tinyml_cli.core.model import recipe_encoder
    from tinyml_cli.demo.synth import synth_preferences
    from tinyml_cli.records.preferences import load_pairs
    from tinyml_cli.stages.dpo import run_dpo
    synth_preferences(tmp_path / "p", n=8, n_eval=2, n_probe=2, seed=1)
    native = [r for _, r in read_records(tmp_path / "p" / "pref_train.jsonl")]
    rows = []
    def parts(text):  # OpenAI-style content: an image part where the placeholder was
        return ([{"type": "image"}] if "<image>" in text else []) + [{"type": "text", "text": text.replace("<image>\n", "")}]
    for r in native:  # some prompts are multi-turn
        rows.append({"pictures": [{"bytes": (tmp_path / "p" / r["image"]).read_bytes(), "path": None}],
                     "prompt": [{"role": t["role"], "content": parts(t["content"])} for t in r["prompt"]],
                     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"][0]["content"]}]}],
                     "rejected": [{"role": "assistant",
                                   "content": [{"type": "text", "text": r["rejected"][0]["content"]}]}]})
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "conv"))
    sets = [f"model.llm={tiny / 'llm'}", f"model.vision={tiny / 'vision'}", f"data.train={tmp_path / 'conv'}",
            "data.columns={images: pictures}", "train.batch_size=4", "train.max_steps=2"]
    cfg = load_config(None, sets)
    enc = recipe_encoder(cfg)
    conv = load_pairs(tmp_path / "conv", enc, columns=cfg.data.columns)[0]
    ref = load_pairs(tmp_path / "p" / "pref_train.jsonl", enc)[0]
    assert [(p.chosen.input_ids, p.rejected.labels) for p in conv] == [(p.chosen.input_ids, p.rejected.labels) for p in ref]
    m = run_dpo(cfg, tmp_path / "dpo")["metrics"]
    assert m["pairs"] == 8 and m["steps"] == 2 and (tmp_path / "dpo" / "metrics.jsonl").is_file()


def test_missing_datasets_library_names_the_extra(tmp_path, enc, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"pip install 'tinyml-cli\[datasets\]'"):
        load_examples(tmp_path / "d.parquet", enc)


def test_preference_images_become_image_sources(shapes, tmp_path):
    from tinyml_cli.records.conversations import ImageBytes, image_paths
    raw = (shapes / "images" / "000000.png").read_bytes()
    rec = preference_record({"images": [{"bytes": raw, "path": "0.png"}, "images/000001.png"], "prompt": "q",
                             "chosen": "a", "rejected": "b"})
    held, path = image_paths(rec, shapes)
    assert isinstance(held, ImageBytes) and held.data == raw and path == shapes / "images" / "000001.png"
    assert rec["prompt"] == "<image>\n<image>\nq"

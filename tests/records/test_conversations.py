import json

import pytest

from tinyml_cli import UserError
from tinyml_cli.core.batching import Collator, ImageLoader
from tinyml_cli.records.conversations import load_examples, messages_of
from tinyml_cli.records.encoder import Encoder

CONV = [{"role": "user", "content": "<image>\nWhat color is the circle?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "How many objects are there?"}, {"role": "assistant", "content": "two"}]


@pytest.fixture
def enc(tiny_model):
    return Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, max_length=256)


def test_only_assistant_tokens_are_labelled(enc, tiny_model):
    tok = tiny_model.tokenizer
    ids, labels = enc.encode(CONV, 1)
    labelled = [t for t, l in zip(ids, labels) if l != -100]
    # exactly the two answers, each followed by the end-of-turn token
    assert tok.decode(labelled) == "red<|end|>two<|end|>"
    assert all(l == -100 or l == t for t, l in zip(ids, labels))


def test_image_tokens_expanded_and_never_labelled(enc, tiny_model):
    ids, labels = enc.encode(CONV, 1)
    img = [i for i, t in enumerate(ids) if t == tiny_model.image_token_id]
    # the tiny default: 32x32 images in 16x16 patches, one token per patch and no CLS token
    assert len(img) == tiny_model.num_image_tokens == 4
    assert img == list(range(img[0], img[0] + 4))  # contiguous
    assert all(labels[i] == -100 for i in img)


def test_text_matches_chat_template(enc, tiny_model):
    tok = tiny_model.tokenizer
    ids, _ = enc.encode(CONV, 1)
    text = tok.decode(ids).replace("<image>" * tiny_model.num_image_tokens, "<image>")
    assert text == tok.apply_chat_template(CONV, tokenize=False)


def test_the_compiled_template_encodes_as_apply_chat_template(tiny_model, monkeypatch):
    """The fast path (transformers' compiled template called directly) gives the same ids and labels as
    apply_chat_template, with a system prompt and for generation; a template it renders differently is not used."""
    tok = tiny_model.tokenizer
    convs = [CONV, CONV[:2], [{"role": "system", "content": "Be brief."}, *CONV]]
    fast = Encoder(tok, tiny_model.num_image_tokens, 256, "Answer in one word.", render=tiny_model.render_chat)
    slow = Encoder(tok, tiny_model.num_image_tokens, 256, "Answer in one word.")
    for c in convs:
        assert fast.encode(c, 1) == slow.encode(c, 1)
        assert fast.encode(c[:-1], 1, for_generation=True) == slow.encode(c[:-1], 1, for_generation=True)
    assert fast.render is not None
    real = tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: real(*a, **k).replace("<|end|>", "<|end|>\n"))
    other = Encoder(tok, tiny_model.num_image_tokens, 256, render=tiny_model.render_chat)
    plain = Encoder(tok, tiny_model.num_image_tokens, 256)
    assert other.encode(CONV, 1) == plain.encode(CONV, 1)  # apply_chat_template's rendering, newlines and all
    assert other.render is None


def test_generation_prompt_ends_with_assistant_tag(enc, tiny_model):
    ids, labels = enc.encode(CONV[:2], 1, for_generation=True)
    assert tiny_model.tokenizer.decode(ids[-1:]) == "<|assistant|>"
    assert set(labels) == {-100}


def test_placeholder_count_must_match_images(enc):
    with pytest.raises(ValueError, match="placeholder"):
        enc.encode(CONV, 0)
    with pytest.raises(ValueError, match="placeholder"):
        enc.encode([{"role": "user", "content": "<image><image> hi"}, {"role": "assistant", "content": "x"}], 1)


def test_truncation_never_cuts_image_tokens(tiny_model, enc):
    ids, _ = enc.encode(CONV, 1)
    first_img = ids.index(tiny_model.image_token_id)
    # a limit that ends in the middle of the image tokens
    short = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens,
                    max_length=first_img + tiny_model.num_image_tokens // 2)
    with pytest.raises(ValueError, match="image tokens end at"):
        short.encode(CONV, 1)


def test_truncation_keeps_a_label_or_errors(tiny_model, enc):
    ids, labels = enc.encode(CONV, 1)
    first_label = next(i for i, l in enumerate(labels) if l != -100)
    cut = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, max_length=first_label)
    with pytest.raises(ValueError, match="no assistant token left"):
        cut.encode(CONV, 1)
    ok = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, max_length=first_label + 2)
    ids2, labels2 = ok.encode(CONV, 1)
    assert len(ids2) == first_label + 2 and ids2 == ids[:first_label + 2]


def test_empty_assistant_turn_is_an_error():
    with pytest.raises(ValueError, match="empty assistant turn"):
        messages_of({"messages": [{"role": "user", "content": "<image> q"}, {"role": "assistant", "content": " "}]})


def test_llava_and_messages_formats_agree():
    llava = {"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    oai = {"messages": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]}
    assert messages_of(llava) == messages_of(oai)


def _png(path):
    from PIL import Image
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_bad_jsonl_names_file_and_line(tmp_path, enc):
    _png(tmp_path / "x.png")
    p = tmp_path / "d.jsonl"
    good = {"image": "x.png", "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]}
    p.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(UserError, match=r"d.jsonl:2: malformed JSON"):
        load_examples(p, enc)


def test_skip_bad_records_and_report(tmp_path, enc):
    _png(tmp_path / "x.png")
    p = tmp_path / "d.jsonl"
    good = {"image": "x.png", "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]}
    bad = {"image": "x.png", "conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "a"}]}
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl:2: 0 '<image>' placeholder"):
        load_examples(p, enc)
    ex, skipped = load_examples(p, enc, on_error="skip")
    assert len(ex) == 1 and len(skipped) == 1 and "d.jsonl:2" in skipped[0]


def test_image_path_may_not_escape(tmp_path, enc):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"image": "../../etc/passwd", "conversations": [
        {"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]}) + "\n")
    with pytest.raises(UserError, match="escapes the data folder"):
        load_examples(p, enc)


def test_collator_pads_and_loads_images(shapes, tiny_model, enc):
    ex, _ = load_examples(shapes / "train.jsonl", enc)
    col = Collator(tiny_model.tokenizer.pad_token_id, ImageLoader(tiny_model.image_processor))
    b = col(ex[:3])
    n = max(len(e.input_ids) for e in ex[:3])
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, n)
    assert b["pixel_values"].shape == (3, 3, 32, 32)
    assert int(b["attention_mask"][0].sum()) == len(ex[0].input_ids)
    left = Collator(tiny_model.tokenizer.pad_token_id, ImageLoader(tiny_model.image_processor), left_pad=True)(ex[:3])
    assert int(left["attention_mask"][:, -1].min()) == 1  # left padding: every row ends with a real token

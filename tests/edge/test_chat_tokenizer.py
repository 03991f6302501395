"""The torch-free ONNX runner's tokenizer against transformers': chat templates with `{% generation %}` marks, and
a tokenizer.json saved with padding and truncation switched on."""

import shutil

from tinyml_cli.edge.runner import ChatTokenizer

MARKED = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
          "{% else %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_generation_marks_render_as_transformers_renders_them(tiny, tmp_path):
    from transformers import AutoTokenizer
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / "llm" / f, tmp_path / f)
    (tmp_path / "chat_template.jinja").write_text(MARKED)
    msgs = [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And the shape?"}]
    ours = ChatTokenizer(tmp_path).apply_chat_template(msgs, add_generation_prompt=True)
    theirs = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(msgs, tokenize=False,
                                                                         add_generation_prompt=True)
    assert ours == theirs
    assert ours.endswith("<|user|>And the shape?<|end|><|assistant|>") and "<|assistant|>red<|end|>" in ours


def test_saved_padding_and_truncation_do_not_change_the_ids(tiny, tmp_path):
    import json

    from transformers import AutoTokenizer
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny / "llm" / f, tmp_path / f)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    saved["padding"] = {"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                        "pad_type_id": 0, "pad_token": "<pad>"}
    saved["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    text = "What color is the circle on the left of the red square in the picture?"
    ours = ChatTokenizer(tmp_path)(text)["input_ids"]
    assert ours == AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False)["input_ids"]
    assert 8 < len(ours) < 32

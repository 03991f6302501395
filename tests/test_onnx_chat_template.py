"""The torch-free ONNX runner renders chat templates that carry transformers' `{% generation %}` marks."""

import shutil

from tinyml_cli.onnx_runner import ChatTokenizer

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

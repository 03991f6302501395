"""Prompt records for the online methods and unpaired records for KTO, in the layouts TRL reads."""

import json

import pytest

from tinyml_cli import UserError
from tinyml_cli.records.conversations import Example
from tinyml_cli.records.preferences import mismatched, prompt_record, unpaired_records
from tinyml_cli.records.scoring import answer_tags, exact_match, format_match


def test_prompt_record_takes_every_layout():
    # TRL's GRPO layout: a prompt, an image, a reference column (answer or solution)
    assert prompt_record({"prompt": "What color?", "image": "a.png", "solution": "red"}) == {
        "image": ["a.png"], "prompt": "<image>\nWhat color?", "answer": "red"}
    conv = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count?"}]}],
            "images": ["a.png"], "answer": 3, "id": 9}
    assert prompt_record(conv) == {"id": 9, "image": ["a.png"], "answer": "3",
                                   "prompt": [{"role": "user", "content": "<image>\nCount?"}]}
    # no reference at all: still a prompt (for a reward model or the format reward)
    assert "answer" not in prompt_record({"prompt": "hi"})
    # a preference record: its chosen answer is the reference
    pref = prompt_record({"image": "a.png", "prompt": "Is there a cat?", "chosen": "no", "rejected": "yes"})
    assert pref["answer"] == "no" and "chosen" not in pref and "rejected" not in pref
    # an sft conversation: the prompt ends at the last user turn, whose reply is the reference
    sft = prompt_record({"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]})
    assert [m["content"] for m in sft["prompt"]] == ["<image>\nq1", "a1", "q2"] and sft["answer"] == "a2"
    # an unpaired record: a desirable completion is the reference, an undesirable one is not
    assert prompt_record({"prompt": "q", "completion": "a", "label": True})["answer"] == "a"
    assert "answer" not in prompt_record({"prompt": "q", "completion": "a", "label": False})
    with pytest.raises(ValueError, match="needs a 'prompt'"):
        prompt_record({"question": "q"})


def test_unpaired_records_and_pairs_unpaired():
    assert unpaired_records({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}], "label": False,
                             "image": "x.png"}) == [{"image": ["x.png"], "prompt": "<image>\nq", "completion": "a",
                                                     "label": False}]
    two = unpaired_records({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert [(r["completion"], r["label"]) for r in two] == [("good", True), ("bad", False)]
    with pytest.raises(ValueError, match="'label'"):
        unpaired_records({"prompt": "q", "completion": "a"})
    with pytest.raises(ValueError, match="true or false"):
        unpaired_records({"prompt": "q", "completion": "a", "label": "yes"})


def test_mismatched_pair_keeps_the_prompt_and_image_takes_the_other_answer():
    a = Example([1, 2, 3, 10, 11], [-100, -100, -100, 10, 11], ["a.png"])
    b = Example([5, 6, 20, 21, 22], [-100, -100, 20, 21, 22], ["b.png"])
    m = mismatched(a, b, max_length=64)
    assert m.input_ids == [1, 2, 3, 20, 21, 22] and m.labels == [-100] * 3 + [20, 21, 22] and m.images == ["a.png"]
    assert mismatched(a, b, max_length=4).input_ids == [1, 2, 3, 20]


def test_rule_rewards():
    assert exact_match("Red.", "red") == 1.0 and exact_match("red circle", "red") == 0.0
    assert exact_match("x", None) == 0.0
    assert answer_tags("<think>it is</think> <answer> Red </answer>", "red") == 1.0
    assert answer_tags("red", "red") == 0.0  # no tags, no reward
    assert format_match("<think>a\nb</think>\n<answer>c</answer>") == 1.0
    assert format_match("<answer>c</answer>") == 0.0
    assert format_match("yes", pattern="yes|no") == 1.0 and format_match("maybe", pattern="yes|no") == 0.0


def test_load_prompts_from_jsonl_and_conversations(tiny_model, shapes, tmp_path):
    from tinyml_cli.records.encoder import Encoder
    from tinyml_cli.records.preferences import load_prompts
    enc = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, 160)
    recs = [{"prompt": "What shape?", "image": "images/000000.png", "answer": "circle"},
            {"prompt": [{"role": "user", "content": "How many?"}], "image": "images/000001.png"}]
    import shutil
    (tmp_path / "images").mkdir()
    for r in recs:
        shutil.copy(shapes / r["image"], tmp_path / r["image"])
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    prompts, _ = load_prompts(tmp_path / "p.jsonl", enc)
    assert [p.meta.get("answer") for p in prompts] == ["circle", None]
    assert all(p.prompt.images and set(p.prompt.labels) == {-100} for p in prompts)
    assert prompts[0].meta["where"].endswith("p.jsonl:1")
    # the sft data of the demo is a prompt set too: each record's last question, its answer the reference
    sft, _ = load_prompts(shapes / "train.jsonl", enc)
    assert sft and all(p.meta["answer"] for p in sft)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: a prompt record needs a 'prompt'"):
        load_prompts(tmp_path / "bad.jsonl", enc)

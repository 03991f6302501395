"""Preference records whose final response does not fit data.max_length: an error naming the record (or skipped),
never a silent fallback to an earlier assistant turn; `data validate` reports them too."""

import json

import pytest
from PIL import Image

from tinyml_cli import UserError
from tinyml_cli.records.encoder import Encoder
from tinyml_cli.records.preferences import load_pairs

PROMPT = [{"role": "user", "content": "<image>\nWhat color is the circle?"}, {"role": "assistant", "content": "red"},
          {"role": "user", "content": "Is the red circle on the left or the right?"}]


def _record(i, prompt=PROMPT):
    return {"id": f"p{i}", "image": "im.png", "prompt": prompt, "chosen": [{"role": "assistant", "content": "left"}],
            "rejected": [{"role": "assistant", "content": "right"}]}


@pytest.fixture()
def pref_file(tmp_path):
    """Line 1: a single-turn pair (short); line 2: the multi-turn pair of the issue."""
    Image.new("RGB", (32, 32), "red").save(tmp_path / "im.png")
    f = tmp_path / "prefs.jsonl"
    short = [{"role": "user", "content": "<image>\nLeft or right?"}]
    f.write_text(json.dumps(_record(1, short)) + "\n" + json.dumps(_record(2)) + "\n")
    return f


def _lengths(tiny_model):
    """(prompt tokens, prompt + longer answer tokens) of the multi-turn record."""
    enc = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, 10_000)
    prompt = len(enc.encode(PROMPT, 1, for_generation=True)[0])
    full = max(len(enc.encode(PROMPT + [{"role": "assistant", "content": a}], 1)[0]) for a in ("left", "right"))
    return prompt, full


def test_a_cut_final_response_is_an_error_naming_the_record(tiny_model, pref_file):
    prompt_len, _ = _lengths(tiny_model)
    # the case: max_length = the prompt's length. The old code kept the pair, with the earlier turn
    # ("red") as the target of both chosen and rejected.
    enc = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, prompt_len)
    with pytest.raises(UserError, match=rf"{pref_file.name}:2: prompt \+ 'chosen' response take \d+ tokens > "
                                        rf"data.max_length={prompt_len}"):
        load_pairs(pref_file, enc)
    pairs, skipped = load_pairs(pref_file, enc, on_error="skip")
    assert [p.meta["id"] for p in pairs] == ["p1"]
    assert len(skipped) == 1 and skipped[0].startswith(f"{pref_file}:2: ")


def test_one_token_short_is_an_error_too_and_a_whole_fit_keeps_the_final_response(tiny_model, pref_file):
    _, full = _lengths(tiny_model)
    with pytest.raises(UserError, match=":2: prompt"):
        load_pairs(pref_file, Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, full - 1))
    pairs, _ = load_pairs(pref_file, Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, full))
    tok = tiny_model.tokenizer
    targets = [tok.decode([t for t in e.labels if t != -100], skip_special_tokens=True).strip()
               for e in (pairs[1].chosen, pairs[1].rejected)]
    assert targets == ["left", "right"]


def test_data_validate_reports_the_cut_response(tiny_cfg, tiny_model, pref_file):
    from tinyml_cli.stages.data import run_validate
    prompt_len, full = _lengths(tiny_model)
    r = run_validate(pref_file, tiny_cfg(f"data.max_length={prompt_len}"))
    assert r["metrics"]["records"] == 2 and r["metrics"]["tokens_checked"]
    assert len(r["problems"]) == 1 and r["problems"][0].startswith(f"{pref_file}:2: prompt + 'chosen' response take")
    assert run_validate(pref_file, tiny_cfg(f"data.max_length={full}"))["problems"] == []
    # without a tokenizer: the structure of preference records is checked, and they are fine
    assert run_validate(pref_file, tiny_cfg("model.llm=", "model.vision="))["problems"] == []

"""A corpus of bad inputs: each is reported with its file and record, exit code 2, and no traceback."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tinyml_cli import UserError
from tinyml_cli.records.conversations import load_examples, open_rgb, validate
from tinyml_cli.records.encoder import Encoder

OK_CONV = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]


def rec(**kw):
    return {"image": "ok.png", "conversations": OK_CONV, **kw}


def write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode())
            f.write(b"\n")


@pytest.fixture
def corpus(tmp_path):
    """(file, expected message) for each kind of bad record; line 1 of every file is a good record."""
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(os.urandom(200))
    full = (tmp_path / "ok.png").read_bytes()
    Image.new("RGB", (64, 64)).save(tmp_path / "big_ok.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "big_ok.png").read_bytes()[:60])
    Image.new("L", (9000, 8000)).save(tmp_path / "bomb.png")
    assert full
    cases = {
        "malformed_json": (b'{"image": "ok.png", "conversations": [', "malformed JSON"),
        "not_utf8": (b'{"image": "ok.png", "conversations": "\xff\xfe"}', "not UTF-8"),
        "no_conversations": ({"image": "ok.png"}, "no 'conversations'"),
        "wrong_type": (rec(conversations=[{"from": "human", "value": 3}]), "turn text is not a string"),
        "unknown_speaker": (rec(conversations=[{"from": "robot", "value": "hi"}]), "unknown speaker"),
        "missing_image": (rec(image="nope.png"), "image not found"),
        "empty_image": (rec(image="empty.png"), "cannot read image"),
        "corrupt_image": (rec(image="garbage.png"), "cannot read image"),
        "truncated_image": (rec(image="truncated.png"), "cannot read image"),
        "huge_image": (rec(image="bomb.png"), "pixel limit"),
        "escaping_path": (rec(image="../outside.png"), "escapes the data folder"),
        "no_placeholder": (rec(conversations=[{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]),
                           "0 '<image>' placeholder(s) for 1 image(s)"),
        "extra_placeholder": (rec(conversations=[{"from": "human", "value": "<image><image>?"},
                                                 {"from": "gpt", "value": "x"}]), "2 '<image>' placeholder(s)"),
        "empty_answer": (rec(conversations=[{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": ""}]),
                         "empty assistant turn"),
    }
    files = {}
    for name, (bad, msg) in cases.items():
        f = tmp_path / f"{name}.jsonl"
        write_jsonl(f, [rec(), bad])
        files[name] = (f, msg)
    return files


def test_each_bad_record_is_named(corpus):
    for name, (f, msg) in corpus.items():
        n, problems = validate(f)
        assert n == 2, name
        assert len(problems) == 1 and problems[0].startswith(f"{f}:2: ") and msg in problems[0], (name, problems)


def test_training_loader_fails_or_skips(corpus, tiny_model):
    enc = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, 256)
    f, msg = corpus["no_placeholder"]
    with pytest.raises(UserError, match=f"{f.name}:2: .*placeholder"):
        load_examples(f, enc)
    ex, skipped = load_examples(f, enc, on_error="skip")
    assert len(ex) == 1 and len(skipped) == 1


def test_token_level_problems_need_a_tokenizer(tmp_path, tiny_model):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.png")
    long_q = "What color is it? " * 40
    f = tmp_path / "long.jsonl"
    write_jsonl(f, [rec(), rec(conversations=[{"from": "human", "value": long_q + "<image>"},
                                              {"from": "gpt", "value": "red"}]),
                    rec(conversations=[{"from": "human", "value": "<image>" + long_q}, {"from": "gpt", "value": "red"}])])
    enc = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, 64)
    n, problems = validate(f, enc)
    assert n == 3 and len(problems) == 2
    assert problems[0].startswith(f"{f}:2: image tokens end at")
    assert problems[1].startswith(f"{f}:3: no assistant token left after truncation")


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16", "LA", "1"])
def test_unusual_image_modes_become_rgb(tmp_path, mode):
    p = tmp_path / f"im.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    Image.new(mode, (8, 8)).save(p)
    im = open_rgb(p)
    assert im.mode == "RGB" and im.size == (8, 8)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tinyml_cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "250"}, timeout=300)


def test_validate_command_lists_every_problem_and_exits_2(corpus, tmp_path):
    allbad = tmp_path / "all.jsonl"
    lines = [rec()]
    for name, (f, _) in corpus.items():
        lines.append(f.read_bytes().split(b"\n")[1])
    write_jsonl(allbad, lines)
    r = _cli("data", "validate", allbad, "--json")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    out = json.loads(r.stdout)
    assert out["metrics"] == {"records": len(lines), "problems": len(corpus), "kind": "conversation",
                              "tokens_checked": False}
    for i, p in enumerate(out["problems"], 2):
        assert p.startswith(f"{allbad}:{i}: ")
    ok = tmp_path / "good.jsonl"
    write_jsonl(ok, [rec(), rec()])
    assert _cli("data", "validate", ok).returncode == 0


@pytest.mark.slow
def test_sft_on_bad_data_is_one_line_exit_2(corpus, tiny, tmp_path):
    f, msg = corpus["truncated_image"]
    r = _cli("sft", "--set", f"model.llm={tiny / 'llm'}", "--set", f"model.vision={tiny / 'vision'}",
             "--set", f"data.train={f}", "--set", "train.max_steps=1", "-o", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and f"{f}:2" in lines[0] and msg in lines[0]

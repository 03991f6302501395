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
    assert not (tmp_path / "run").exists()  # it failed before its first step: no folder is left behind


# Cases training meets beyond single bad records: a whole data set that is empty, or whose records hold no
# assistant turn (the encoder refuses them: nothing to learn from).
NO_ANSWER = rec(conversations=[{"from": "human", "value": "<image>\nWhat color?"}])
ONLY_SYSTEM = rec(conversations=[{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>?"}])


@pytest.fixture
def whole_sets(tmp_path, corpus):
    """(file, what training says): data sets training rejects as a whole."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n")
    write_jsonl(tmp_path / "no_answer.jsonl", [NO_ANSWER])
    write_jsonl(tmp_path / "only_system.jsonl", [ONLY_SYSTEM, NO_ANSWER])
    (tmp_path / "empty_list.json").write_text("[]")
    return {"empty": tmp_path / "empty.jsonl", "blank": tmp_path / "blank.jsonl",
            "no_answer": tmp_path / "no_answer.jsonl", "only_system": tmp_path / "only_system.jsonl",
            "empty_list": tmp_path / "empty_list.json"}


def test_validate_finds_whatever_training_rejects(corpus, whole_sets, tiny_model):
    """The same bad inputs through the training loader (which stops at the first) and through validate (which must
    report at least that one, naming the same record): every case training rejects, validate reports."""
    from tinyml_cli.core.batching import Collator, ImageLoader
    enc = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, 256)
    collate = Collator(tiny_model.tokenizer.pad_token_id, ImageLoader(tiny_model.image_processor))
    files = {**{k: f for k, (f, _) in corpus.items()}, **whole_sets}
    for name, f in files.items():
        with pytest.raises(UserError) as e:
            for ex in load_examples(f, enc)[0]:  # images are decoded when their batch is made
                collate([ex])
        training_says = str(e.value)
        for encoder in (None, enc):  # without a recipe (structure only) and with the tokenizer
            n, problems = validate(f, encoder)
            assert problems, (name, encoder)
            if training_says.startswith(f"{f}:2: cannot read image"):  # decoding: PIL's words differ by path
                assert problems[0].startswith(f"{f}:2: cannot read image"), (name, problems)
            else:
                assert training_says in problems, (name, training_says, problems)


def test_validate_passes_what_training_takes(tmp_path, tiny_model):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.png")
    write_jsonl(tmp_path / "ok.jsonl", [rec(), rec(conversations=[{"from": "system", "value": "Be brief."}] + OK_CONV)])
    enc = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, 256)
    assert len(load_examples(tmp_path / "ok.jsonl", enc)[0]) == 2
    assert validate(tmp_path / "ok.jsonl") == (2, []) and validate(tmp_path / "ok.jsonl", enc) == (2, [])


PAIR = {"image": "ok.png", "prompt": "<image>\nWhat color?", "chosen": "red", "rejected": "blue"}


@pytest.fixture
def pair_corpus(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(os.urandom(200))
    cases = {
        "no_rejected": {k: v for k, v in PAIR.items() if k != "rejected"},
        "empty_chosen": {**PAIR, "chosen": " "},
        "prompt_not_text": {**PAIR, "prompt": 7},
        "prompt_ends_with_assistant": {**PAIR, "prompt": [{"role": "user", "content": "<image>?"},
                                                          {"role": "assistant", "content": "red"}]},
        "missing_image": {**PAIR, "image": "nope.png"},
        "corrupt_image": {**PAIR, "image": "garbage.png"},
        "two_placeholders": {**PAIR, "prompt": "<image><image>\nWhat color?"},
        "conversation_record": rec(),
    }
    files = {}
    for name, bad in cases.items():
        files[name] = tmp_path / f"pairs_{name}.jsonl"
        write_jsonl(files[name], [PAIR, bad])
    files["empty"] = tmp_path / "pairs_empty.jsonl"
    files["empty"].write_bytes(b"")
    files["good"] = tmp_path / "pairs_good.jsonl"
    write_jsonl(files["good"], [PAIR, {**PAIR, "chosen": [{"role": "assistant", "content": "red"}]}])
    return files


def test_validate_pairs_finds_whatever_preference_training_rejects(pair_corpus, tiny_model):
    from tinyml_cli.records.preferences import load_pairs, validate_pairs
    enc = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, 256)
    for name, f in pair_corpus.items():
        if name == "good":
            assert len(load_pairs(f, enc)[0]) == 2
            assert validate_pairs(f) == (2, []) and validate_pairs(f, enc) == (2, [])
            continue
        with pytest.raises(UserError) as e:
            load_pairs(f, enc)
        for encoder in (None, enc):
            problems = validate_pairs(f, encoder)[1]
            assert str(e.value) in problems, (name, str(e.value), problems)


def test_validate_command_reports_what_training_would_and_exits_2(whole_sets, pair_corpus):
    for name in ("empty", "no_answer"):
        r = _cli("data", "validate", whole_sets[name], "--json")
        assert r.returncode == 2 and "Traceback" not in r.stderr, (name, r.stderr)
        assert json.loads(r.stdout)["problems"], name
    r = _cli("data", "validate", pair_corpus["missing_image"], "--json")  # preference data: checked as dpo reads it
    out = json.loads(r.stdout)
    assert r.returncode == 2 and out["metrics"]["kind"] == "preference"
    assert out["problems"] == [f"{pair_corpus['missing_image']}:2: image not found: {pair_corpus['missing_image'].parent / 'nope.png'}"]
    r = _cli("data", "validate", pair_corpus["good"], "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["metrics"] == {"records": 2, "problems": 0, "kind": "preference",
                                                                     "tokens_checked": False}

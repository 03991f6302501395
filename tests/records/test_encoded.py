"""The encoded-data cache: the records today's in-memory encoding gives, from several processes, read back from
the cache; bad records named or listed as before; a new entry when anything that decides the tokens changes;
images checked lazily."""

import json
import shutil

import pytest

from tinyml_cli import UserError
from tinyml_cli.records import encoded
from tinyml_cli.records.conversations import load_examples, validate
from tinyml_cli.records.encoded import encode_cached
from tinyml_cli.records.encoder import Encoder


@pytest.fixture
def enc(tiny_model):
    return Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, max_length=256)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(encoded, "BLOCK", 2048)  # a shapes record is ~500 bytes: many blocks, several processes


def _copy(shapes, tmp_path, lines):
    """A JSONL of `lines` (records or raw strings) beside a copy of the shapes images."""
    shutil.copytree(shapes / "images", tmp_path / "images")
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    (tmp_path / "d.jsonl").write_text(text)
    return tmp_path / "d.jsonl"


def _rows(shapes):
    return [json.loads(line) for line in (shapes / "train.jsonl").read_text().splitlines()]


def test_cache_gives_todays_records_from_several_processes(shapes, enc, small_blocks, tmp_path):
    ref, _ = load_examples(shapes / "train.jsonl", enc)
    cache = tmp_path / "cache"
    got, skipped, hit = encode_cached(shapes / "train.jsonl", enc, cache, num_proc=2)
    assert not hit and not skipped and len(got) == len(ref) == 48
    for a, i in zip(ref, range(len(got))):
        b = got[i]
        assert (b.input_ids, b.labels, b.images, b.meta["where"]) == (a.input_ids, a.labels, a.images, a.meta["where"])
    again, _, hit = encode_cached(shapes / "train.jsonl", enc, cache, num_proc=1)
    assert hit and again.folder == got.folder and list(again.lengths) == list(got.lengths)
    assert len(list(cache.iterdir())) == 1  # no temporary folder left behind


def test_cache_name_follows_content_tokenizer_and_settings(shapes, enc, tiny_model, tmp_path):
    path = _copy(shapes, tmp_path, _rows(shapes)[:6])
    cache = tmp_path / "cache"
    first = encode_cached(path, enc, cache)[0].folder
    assert encode_cached(path, enc, cache)[2]
    shorter = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, max_length=200)
    system = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, max_length=256, system_prompt="Be brief.")
    assert not encode_cached(path, shorter, cache)[2] and not encode_cached(path, system, cache)[2]
    path.write_text(path.read_text() + json.dumps(_rows(shapes)[7]) + "\n")
    recs, _, hit = encode_cached(path, enc, cache)
    assert not hit and len(recs) == 7 and recs.folder != first


@pytest.mark.parametrize("num_proc", [1, 2])
def test_bad_records_fail_naming_the_first_or_are_listed(shapes, enc, small_blocks, tmp_path, num_proc):
    rows = _rows(shapes)
    lines = rows[:10] + ["{broken"] + rows[10:30] + [{"image": "images/nope.png", **{
        k: v for k, v in rows[30].items() if k != "image"}}] + rows[31:]
    path = _copy(shapes, tmp_path, lines)
    with pytest.raises(UserError, match=r"d\.jsonl:11: malformed JSON"):
        encode_cached(path, enc, tmp_path / "c", num_proc=num_proc)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # a failed encoding caches nothing
    recs, skipped, _ = encode_cached(path, enc, tmp_path / "c", on_error="skip", num_proc=num_proc)
    _, ref_skipped = load_examples(path, enc, on_error="skip")
    assert len(recs) == 47 and len(skipped) == 2 and skipped == ref_skipped
    assert "d.jsonl:32: image not found" in skipped[1]
    with pytest.raises(UserError, match=r"d\.jsonl:11"):  # the skip-made entry, read under on_error=fail
        encode_cached(path, enc, tmp_path / "c", num_proc=num_proc)


def test_empty_file_and_no_usable_record(shapes, enc, tmp_path):
    path = _copy(shapes, tmp_path, [])
    with pytest.raises(UserError, match="no usable record \\(the data set is empty\\)"):
        encode_cached(path, enc, tmp_path / "c")
    path.write_text("{broken\n")
    with pytest.raises(UserError, match="no usable record$"):
        encode_cached(path, enc, tmp_path / "c", on_error="skip")


def test_json_list_files_too(shapes, enc, tmp_path):
    shutil.copytree(shapes / "images", tmp_path / "images")
    (tmp_path / "d.json").write_text(json.dumps(_rows(shapes)[:5]))
    ref, _ = load_examples(tmp_path / "d.json", enc)
    got, _, _ = encode_cached(tmp_path / "d.json", enc, tmp_path / "c", num_proc=2)
    assert [got[i].input_ids for i in range(5)] == [e.input_ids for e in ref]
    assert got[4].meta["where"] == ref[4].meta["where"] == f"{tmp_path / 'd.json'} record 5"


def test_images_are_checked_lazily(shapes, enc, tiny_model, tmp_path):
    """Encoding stats images (a missing one is a bad record) without opening them; a broken image is found when
    its batch is made, naming its record, and `data validate` finds it up front."""
    rows = _rows(shapes)[:4]
    path = _copy(shapes, tmp_path, [])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows[2] = {**rows[2], "image": "broken.png"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs, skipped, _ = encode_cached(path, enc, tmp_path / "c")
    assert len(recs) == 4 and not skipped
    with pytest.raises(UserError, match=r"d\.jsonl:3: cannot read image .*broken\.png"):
        tiny_model.collator()([recs[i] for i in range(4)])
    n, problems = validate(path, enc)
    assert n == 4 and len(problems) == 1 and "d.jsonl:3: cannot read image" in problems[0]

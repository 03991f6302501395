"""Batches made in DataLoader worker processes are the batches the training process makes, bit for bit, from
the first step and from a resumed position; a broken image still fails in one line naming its record."""

import json
import shutil
from types import SimpleNamespace

import pytest

from tinyml_cli import UserError
from tinyml_cli.core.loop import ExampleBatches
from tinyml_cli.records.encoded import encode_cached
from tinyml_cli.records.encoder import Encoder

ONE = SimpleNamespace(num_processes=1, process_index=0)


def _take(source, n, tcfg):
    gen = source.batches(ONE, tcfg, None)
    out = [next(gen) for _ in range(n)]
    gen.close()
    return out


def _same(a, b):
    assert len(a) == len(b)
    for (ia, x), (ib, y) in zip(a, b):
        assert ia == ib and x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].equal(y[k]), k


@pytest.fixture
def records(tiny_model, shapes, tmp_path):
    enc = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, max_length=256)
    return encode_cached(shapes / "train.jsonl", enc, tmp_path / "cache")[0]


def test_workers_make_the_same_batches_as_the_training_process(tiny_model, records):
    tcfg = SimpleNamespace(batch_size=5, seed=3)
    ref = _take(ExampleBatches(records, tiny_model.collator()), 12, tcfg)  # 9 per epoch: into the second epoch
    assert {i["epoch"] for i, _ in ref} == {0, 1} and "pixel_values" in ref[0][1]
    workers = ExampleBatches(records, tiny_model.collator(), num_workers=2)
    _same(ref, _take(workers, 12, tcfg))
    assert workers.done == 12
    resumed = ExampleBatches(records, tiny_model.collator(), num_workers=2)
    resumed.load_state_dict({"done": 7})
    _same(ref[7:], _take(resumed, 5, tcfg))


def test_a_broken_image_in_a_worker_is_one_line_naming_the_record(tiny_model, shapes, tmp_path):
    shutil.copytree(shapes / "images", tmp_path / "images")
    (tmp_path / "images" / "000001.png").write_bytes(b"not a png")
    rows = [json.loads(x) for x in (shapes / "train.jsonl").read_text().splitlines()][:4]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, max_length=256)
    recs = encode_cached(tmp_path / "d.jsonl", enc, tmp_path / "cache")[0]
    with pytest.raises(UserError) as e:
        _take(ExampleBatches(recs, tiny_model.collator(), num_workers=1), 1, SimpleNamespace(batch_size=4, seed=0))
    assert "d.jsonl:2: cannot read image" in str(e.value) and "\n" not in str(e.value)


def test_group_by_length_batches_similar_lengths_in_a_seeded_order(tiny_model, records):
    from tinyml_cli.core.loop import MicroBatchOrder
    lengths = list(records.lengths)
    plain = MicroBatchOrder(len(records), 4, 1, 0, seed=1)
    grouped = MicroBatchOrder(len(records), 4, 1, 0, seed=1, lengths=lengths)
    per = grouped.per_epoch
    assert sorted(i for k in range(per) for i in grouped[k][1]) == list(range(48))  # every record, once an epoch
    pad = lambda order: sum(max(lengths[i] for i in order[k][1]) * 4 - sum(lengths[i] for i in order[k][1])  # noqa: E731
                            for k in range(per))
    assert pad(grouped) < pad(plain) / 2
    assert [grouped[k] for k in range(per)] == [MicroBatchOrder(48, 4, 1, 0, 1, lengths)[k] for k in range(per)]
    assert [grouped[k][1] for k in range(per)] != [grouped[per + k][1] for k in range(per)]  # a new order each epoch
    tcfg = SimpleNamespace(batch_size=4, seed=1)
    a = _take(ExampleBatches(records, tiny_model.collator(), group_by_length=True), 3, tcfg)
    b = _take(ExampleBatches(records, tiny_model.collator(), num_workers=1, group_by_length=True), 3, tcfg)
    _same(a, b)

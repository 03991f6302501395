"""data.streaming: a parquet / `datasets` source read a block at a time, shuffled within blocks, epoch after epoch,
with a position that resumes exactly; sft trains on it and a crashed run resumes to the uninterrupted weights."""

import itertools
import json
from types import SimpleNamespace

import pytest

from tinyml_cli import UserError
from tinyml_cli.records.stream import RecordStream, streamable


def _parse(rec):
    if rec["id"] % 7 == 3:
        raise ValueError("a bad record")
    return SimpleNamespace(id=rec["id"], meta={})


@pytest.fixture
def table(tmp_path):
    """50 records in two parquet shards of 20 and 30 rows."""
    import datasets
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list([{"id": i} for i in range(20)]).to_parquet(str(tmp_path / "pq" / "a.parquet"))
    datasets.Dataset.from_list([{"id": i} for i in range(20, 50)]).to_parquet(str(tmp_path / "pq" / "b.parquet"))
    return str(tmp_path / "pq")


def _ids(stream, n):
    return [e.id for e in itertools.islice(iter(stream), n)]


def test_blocks_are_shuffled_and_epochs_cover_every_usable_record(table):
    s = RecordStream(table, _parse, seed=0, block=16, on_error="skip")
    first = _ids(s, 43)  # 50 rows, 7 bad (ids 3, 10, ..., 45): one epoch is 43 records
    good = [i for i in range(50) if i % 7 != 3]
    assert sorted(first) == good
    assert first != good  # shuffled ...
    assert sorted(first[:14]) == [i for i in range(16) if i % 7 != 3]  # ... within the first block only
    assert len(s.skipped) == 7 and s.skipped[0] == f"{table} row 4: a bad record"
    second = _ids(s, 43)
    assert sorted(second) == good and second != first  # the next epoch: a new permutation
    assert s.epoch == 1 and len(s.skipped) == 7


@pytest.mark.parametrize("cut", [1, 13, 14, 30, 43, 60])
def test_a_stream_restored_from_its_state_goes_on_exactly(table, cut):
    ref = RecordStream(table, _parse, seed=3, block=16, on_error="skip")
    whole = _ids(ref, 100)
    a = RecordStream(table, _parse, seed=3, block=16, on_error="skip")
    head = _ids(a, cut)
    state = json.loads(json.dumps(a.state_dict()))  # plain data (a checkpoint holds it)
    b = RecordStream(table, _parse, seed=3, block=16, on_error="skip")
    b.load_state_dict(state)
    assert head + _ids(b, 100 - cut) == whole
    assert b.skipped == ref.skipped and len(b.skipped) == 7  # a block read again is not listed twice


def test_a_datasets_folder_streams_and_a_bad_record_fails_naming_its_row(tmp_path):
    import datasets
    datasets.Dataset.from_list([{"id": i} for i in range(10)]).save_to_disk(str(tmp_path / "ds"))
    s = RecordStream(str(tmp_path / "ds"), _parse, seed=0, block=4)
    with pytest.raises(UserError, match=r"ds row 4: a bad record"):
        _ids(s, 10)
    assert streamable(str(tmp_path / "ds")) and not streamable(str(tmp_path / "x.jsonl"))


def test_an_empty_stream_is_an_error_not_a_hang(tmp_path):
    import datasets
    datasets.Dataset.from_list([{"id": 3}, {"id": 10}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(UserError, match="no usable record"):
        _ids(RecordStream(str(tmp_path / "bad.parquet"), _parse, 0, 4, "skip"), 1)


# ------------------------------------------------------------------ sft on a stream
@pytest.fixture
def shapes_parquet(shapes, tmp_path):
    """The shapes training records in parquet, images as bytes (how a hub data set holds them)."""
    import datasets

    from tinyml_cli.records.sources import read_records
    rows = [r for _, r in read_records(shapes / "train.jsonl")]
    rows = [{**r, "image": {"bytes": (shapes / r["image"]).read_bytes(), "path": r["image"]}} for r in rows]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    return tmp_path / "train.parquet"


def test_sft_streams_and_a_crashed_run_resumes_to_the_same_weights(tiny_cfg, shapes_parquet, tmp_path,
                                                                   sft_crashing_at):
    import torch
    from safetensors.torch import load_file

    from tinyml_cli.stages.sft import run_sft
    sets = [f"data.train={shapes_parquet}", "data.streaming=true", "data.stream_block=20", "train.max_steps=16",
            "train.save_every=1", "peft.method=full", "train.parts=connector,llm"]  # 48 records: 16 steps of 4 = 1.3 epochs
    full = run_sft(tiny_cfg(*sets), tmp_path / "full", "sft")
    assert full["metrics"]["examples"] == 64 and full["metrics"]["loss_last"] < full["metrics"]["loss_first"]
    sft_crashing_at(tiny_cfg(*sets), tmp_path / "crashed", 9)  # dies after the checkpoint of step 8 (mid-block)
    run_sft(tiny_cfg(*sets), tmp_path / "crashed", "sft", resume=True)
    for f in ("connector.safetensors", "llm/model.safetensors"):
        a, b = load_file(tmp_path / "full" / f), load_file(tmp_path / "crashed" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["epoch"] == 1


def test_streaming_recipe_rules(tiny_cfg, shapes, shapes_parquet):
    from tinyml_cli.stages.checks import check_run
    with pytest.raises(UserError, match="data.streaming needs train.max_steps"):
        tiny_cfg(f"data.train={shapes_parquet}", "data.streaming=true", "train.max_steps=0")
    with pytest.raises(UserError, match="data.num_workers=0"):
        tiny_cfg(f"data.train={shapes_parquet}", "data.streaming=true", "data.num_workers=2")
    with pytest.raises(UserError, match="not .*train.jsonl"):
        check_run(tiny_cfg("data.streaming=true"), "sft")
    with pytest.raises(UserError, match="read by sft and pretrain-align; dpo"):
        check_run(tiny_cfg(f"data.train={shapes_parquet}", "data.streaming=true"), "dpo")
    check_run(tiny_cfg(f"data.train={shapes_parquet}", "data.streaming=true"), "sft")

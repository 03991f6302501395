"""Packed batches (data.packing): records end to end in one row, positions restarting per record, give the loss
and the gradients of the padded batch; a run with packing follows the padded run's loss curve."""

import json

import pytest
import torch

from tinyml_cli.records.encoded import encode_cached
from tinyml_cli.records.encoder import Encoder


def test_packed_batch_has_the_padded_batchs_loss_and_gradients(tiny_model, shapes, tmp_path):
    enc = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, max_length=256)
    recs = encode_cached(shapes / "train.jsonl", enc, tmp_path / "c")[0]
    batch = [recs[i] for i in range(5)]
    assert len({len(e.input_ids) for e in batch}) > 1  # lengths differ: the padded batch has padding
    padded = tiny_model.collator()(batch)
    collate = tiny_model.collator()
    collate.pack = True
    packed = collate(batch)
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in batch))
    assert packed["position_ids"][0, :len(batch[0].input_ids) + 1].tolist()[-2:] == [len(batch[0].input_ids) - 1, 0]
    assert (packed["labels"] != -100).sum() == (padded["labels"] != -100).sum()  # no record starts with a target

    model, was = tiny_model, tiny_model.training
    model.train(False)  # no dropout: the two forwards must see the same network

    def loss_and_grads(b):
        model.zero_grad(set_to_none=True)
        loss = model(**b)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads
    a, ga = loss_and_grads(padded)
    b, gb = loss_and_grads(packed)
    model.zero_grad(set_to_none=True)
    model.train(was)
    assert abs(a - b) <= 1e-5 * abs(a), (a, b)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("bad", ["model.connector=xattn", "peft.method=prompt-tuning"])
def test_packing_refuses_what_it_cannot_pack(tiny_cfg, bad):
    from tinyml_cli import UserError
    with pytest.raises(UserError, match="data.packing"):
        tiny_cfg("data.packing=true", bad, "peft.parts=[llm]")


def test_sft_with_packing_follows_the_padded_curve(tiny_cfg, tmp_path):
    from tinyml_cli.stages.sft import run_sft
    sets = ("train.max_steps=3", "train.log_every=1", "train.parts=[connector,llm]", "train.dropout=off")
    run_sft(tiny_cfg(*sets), tmp_path / "pad", "sft")
    run_sft(tiny_cfg("data.packing=true", *sets), tmp_path / "pack", "sft")
    curve = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = curve(tmp_path / "pad"), curve(tmp_path / "pack")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * x, (a, b)

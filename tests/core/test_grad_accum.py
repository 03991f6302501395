"""Gradient accumulation weighs units (labelled tokens), not micro-batches: a batch of two records and the same
two records as two accumulated micro-batches give one gradient (sft, pretrain-align, BitDelta distillation)."""

import copy

import pytest
import torch

from tinyml_cli.records.conversations import Example


def _with_labelled(e: Example, k: int) -> Example:
    """The record with exactly its last k tokens labelled (k units of the next-token loss)."""
    return Example(e.input_ids, [-100] * (len(e.input_ids) - k) + e.input_ids[-k:], e.images)


def _step_grads(model, examples, step_fn, tcfg, out_dir, batch_size, grad_accum):
    """The gradients the optimizer is handed at the first step of a run (lr 0: the weights stay put), and the
    logged loss of that step."""
    import dataclasses
    import json

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from tinyml_cli.core.batching import Collator, ImageLoader
    from tinyml_cli.core.loop import ExampleBatches, train
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}

    def grab(opt, args, kwargs):
        for g in opt.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    seen[names[id(p)]] = p.grad.detach().clone()
    tcfg = dataclasses.replace(tcfg, batch_size=batch_size, grad_accum=grad_accum, max_steps=1, lr=0.0,
                               max_grad_norm=0.0, log_every=1, scheduler="constant", warmup_ratio=0.0)
    lmm = getattr(model, "student", model)  # BitDelta's Distillation wraps the model that holds the tokenizer
    collate = Collator(lmm.tokenizer.pad_token_id, ImageLoader(lmm.image_processor))
    out_dir.mkdir()
    handle = register_optimizer_step_pre_hook(grab)
    try:
        train(model, ExampleBatches(examples, collate), step_fn, tcfg, out_dir)
    finally:
        handle.remove()
    return seen, json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def _assert_same(a: dict, b: dict):
    assert a and a.keys() == b.keys()
    total = torch.cat([g.flatten() for g in a.values()]).norm()
    diff = torch.cat([(a[n] - b[n]).flatten() for n in a]).norm()
    assert diff <= 1e-4 * total, f"gradients differ: |a - b| = {diff:.3e}, |a| = {total:.3e}"


@pytest.fixture()
def two_records(tiny_model, shapes):
    from tinyml_cli.records.conversations import load_examples
    from tinyml_cli.records.encoder import Encoder
    ex, _ = load_examples(shapes / "train.jsonl", Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, 256))
    return [_with_labelled(ex[0], 1), _with_labelled(ex[1], 9)]  # the example: 1 and 9 labelled tokens


@pytest.mark.parametrize("parts", ["connector,llm", "connector"], ids=["sft", "pretrain-align"])
def test_accumulation_weighs_tokens_sft_and_align(tiny_model, tiny_cfg, two_records, parts, tmp_path):
    from tinyml_cli.core.loop import sft_step
    from tinyml_cli.core.trainable import configure_trainable
    cfg = tiny_cfg(f"train.parts={parts}")
    model = copy.deepcopy(tiny_model)
    configure_trainable(model, cfg)
    one, loss_one = _step_grads(model, two_records, sft_step, cfg.train, tmp_path / "b2", 2, 1)
    acc, loss_acc = _step_grads(model, two_records, sft_step, cfg.train, tmp_path / "b1x2", 1, 2)
    _assert_same(one, acc)
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)  # the logged loss: the step's per-token mean
    # and that is the mean over the 10 tokens computed by hand, from each record's own mean loss
    with torch.no_grad():
        from tinyml_cli.core.batching import Collator, ImageLoader
        collate = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor))
        means = [model(**collate([e])).item() for e in two_records]
    assert loss_one == pytest.approx((1 * means[0] + 9 * means[1]) / 10, rel=1e-5)


def test_accumulation_weighs_tokens_bitdelta_distillation(tiny_model, two_records, tiny_cfg, tmp_path):
    from tinyml_cli.core.bitdelta import Distillation, compress, delta_attached, distill_step
    base, ft = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base.requires_grad_(False)
    ft.requires_grad_(False).eval()
    # distillation's units are every real position: records of very different lengths
    short = Example(two_records[0].input_ids[:8], two_records[0].labels[:8], two_records[0].images)
    records = [short, two_records[1]]
    assert len(records[1].input_ids) > 3 * len(records[0].input_ids)
    with delta_attached(base, compress(base, ft)):
        tcfg = tiny_cfg().train
        one, loss_one = _step_grads(Distillation(base, ft), records, distill_step, tcfg, tmp_path / "b2", 2, 1)
        acc, loss_acc = _step_grads(Distillation(base, ft), records, distill_step, tcfg, tmp_path / "b1x2", 1, 2)
    assert all(n.endswith(".scale") for n in one)
    _assert_same(one, acc)
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)

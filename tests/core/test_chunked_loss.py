"""The chunked vocabulary losses give the numbers of the plain computation (the fp32 log-softmax of every row), values
and gradients, on every path: gradient taken ahead (frozen head, or a sum), logits recomputed in the backward pass
(a trained head with per-token gradients), and the checkpointed fallback for other head modules; and they never
hold more than a chunk of logits."""

import pytest
import torch
from torch import nn

from tinyml_cli.core import chunked_loss as cl
from tinyml_cli.core.memory import PeakTensorMemory


def _reference(head, h, y, temperature=1.0):
    lp = torch.log_softmax(head(h).float() / temperature, -1)
    return lp.gather(1, y[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)


def _setup(n=300, dim=24, vocab=50, bias=False, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(dim, vocab, bias=bias)
    h = torch.randn(n, dim, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    return head, h, y


def _grads(fn, head, h):
    """(value, grad of h, grads of the head's parameters) of a scalar made from fn()'s per-row output."""
    for t in (h, *head.parameters()):
        t.grad = None
    out = fn()
    out.backward()
    return out.detach(), h.grad.clone(), [p.grad.clone() if p.grad is not None else None for p in head.parameters()]


@pytest.mark.parametrize("head_trains", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduce", [False, True])
def test_logps_and_gradients_equal_the_plain_computation(monkeypatch, head_trains, bias, reduce):
    monkeypatch.setattr(cl, "chunk_rows", lambda vocab: 64)  # several chunks, a ragged last one
    head, h, y = _setup(bias=bias)
    head.requires_grad_(head_trains)
    weights = torch.rand(len(y))  # a per-row incoming gradient, as DPO / PPO give

    def chunked():
        lp = cl.label_logps(head, h, y, temperature=0.7, reduce=reduce)
        return lp * 1.3 if reduce else (lp * weights).sum()

    def plain():
        lp = _reference(head, h, y, 0.7)[0]
        return lp.sum() * 1.3 if reduce else (lp * weights).sum()
    a, b = _grads(chunked, head, h), _grads(plain, head, h)
    assert torch.allclose(a[0], b[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(a[1], b[1], atol=1e-5, rtol=1e-5)
    for ga, gb in zip(a[2], b[2]):
        assert (ga is None) == (gb is None) == (not head_trains)
        if ga is not None:
            assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-5)


def test_entropy_and_the_unchunked_switch():
    head, h, y = _setup()
    lp, ent = cl.label_logps(head, h, y, temperature=2.0, entropy=True)
    ref_lp, ref_ent = _reference(head, h, y, 2.0)
    assert torch.allclose(lp, ref_lp, atol=1e-6) and torch.allclose(ent, ref_ent, atol=1e-5)
    assert not ent.requires_grad
    lp2, ent2 = cl.label_logps(head, h, y, temperature=2.0, entropy=True, chunked=False)
    assert torch.allclose(lp2, ref_lp, atol=1e-6) and torch.allclose(ent2, ref_ent, atol=1e-5)
    assert torch.allclose(cl.mean_nll(head, h, y), -_reference(head, h, y)[0].mean(), atol=1e-6)


def test_other_head_modules_take_the_checkpointed_route():
    head, h, y = _setup()
    wrapped = nn.Sequential(head)  # not a plain nn.Linear
    a = _grads(lambda: cl.label_logps(wrapped, h, y).mul(torch.arange(len(y)) / len(y)).sum(), head, h)
    b = _grads(lambda: _reference(head, h, y)[0].mul(torch.arange(len(y)) / len(y)).sum(), head, h)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    assert all(torch.allclose(x, z, atol=1e-5) for x, z in zip(a[2], b[2]))


def test_bf16_autocast_matches_a_plain_autocast_forward():
    head, h, y = _setup(n=200, dim=32, vocab=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = _grads(lambda: cl.mean_nll(head, h, y), head, h)
        b = _grads(lambda: -_reference(head, h, y)[0].mean(), head, h)
    assert torch.allclose(a[0], b[0], atol=2e-3)
    assert torch.allclose(a[1], b[1], atol=1e-3, rtol=2e-2)
    assert torch.allclose(a[2][0], b[2][0], atol=1e-3, rtol=2e-2)


def test_kl_and_its_gradient_equal_the_plain_computation(monkeypatch):
    monkeypatch.setattr(cl, "chunk_rows", lambda vocab: 64)
    head, h, _ = _setup(bias=True)
    head.requires_grad_(False)
    teacher, th, _ = _setup(bias=True, seed=1)
    th = th.detach()
    a = _grads(lambda: cl.head_kl(head, h, teacher, th), head, h)
    b = _grads(lambda: cl.head_kl(head, h, teacher, th, chunked=False), head, h)
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)
    assert a[0] > 0


def test_peak_memory_is_a_chunk_of_logits_not_all_of_them(monkeypatch):
    monkeypatch.setattr(cl, "chunk_rows", lambda vocab: 128)
    n, dim, vocab = 4096, 16, 2000
    head, h, y = _setup(n, dim, vocab)
    head.requires_grad_(False)
    peaks = {}
    for chunked in (False, True):
        with PeakTensorMemory(head) as mem:
            base = mem.current
            cl.mean_nll(head, h, y, chunked=chunked).backward()
        peaks[chunked] = mem.peak - base
    all_logits = n * vocab * 4
    assert peaks[False] > all_logits  # the fp32 log-softmax of every row
    assert peaks[True] < 5 * 128 * vocab * 4 + 3 * n * dim * 4  # a few chunks of logits and rows of h-sized tensors


# ------------------------------------------------------------------------ on the models tinyml trains
def _all_grads(model, loss_fn, chunked):
    model.zero_grad(set_to_none=True)
    model.chunked_loss = chunked
    try:
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:  # the model may be a session fixture: leave it as it was
        model.chunked_loss = True
        model.zero_grad(set_to_none=True)


def _assert_same(a, b, tol=1e-5):
    assert torch.allclose(a[0], b[0], atol=tol, rtol=tol), (a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[1]
    for k in a[1]:
        assert torch.allclose(a[1][k], b[1][k], atol=tol, rtol=tol), (k, (a[1][k] - b[1][k]).abs().max())


def test_tiny_default_sft_dpo_and_ppo_losses_and_gradients_equal_the_unchunked_ones(tiny_model, shapes, prefs):
    """Every weight of the tiny default trains: sft's mean loss, DPO's per-row log-prob sums (chosen and rejected
    rows) and PPO's tempered log-probs weighted per token, chunked against the earlier full log-softmax."""
    from tinyml_cli.core.batching import Collator, ImageLoader, collator_for
    from tinyml_cli.core.logprobs import token_logps
    from tinyml_cli.records.conversations import load_examples
    from tinyml_cli.records.encoder import Encoder
    from tinyml_cli.records.preferences import load_pairs
    model = tiny_model
    model.requires_grad_(True).train()
    enc = Encoder(model.tokenizer, model.num_image_tokens, 256)
    batch = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor))(
        load_examples(shapes / "train.jsonl", enc)[0][:6])
    torch.manual_seed(0)
    _assert_same(_all_grads(model, lambda: model(**batch), True), _all_grads(model, lambda: model(**batch), False))

    pairs = load_pairs(prefs / "pref_train.jsonl", enc)[0][:4]
    pb = collator_for(model)(pairs)
    args = (pb["input_ids"], pb["attention_mask"], pb["labels"], pb["pixel_values"])
    w = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.0, 0.7, 0.2, -2.0])  # a different weight for every row

    def dpo():
        lp, mask = token_logps(model, *args)
        return ((lp * mask).sum(-1) * w).sum()
    _assert_same(_all_grads(model, dpo, True), _all_grads(model, dpo, False))

    def ppo():
        lp, mask, ent, _ = token_logps(model, *args, with_entropy=True, temperature=0.7)
        tok_w = torch.linspace(-1, 1, lp.numel()).view_as(lp)
        return (lp * mask * tok_w).sum() + 0 * ent.sum()
    _assert_same(_all_grads(model, ppo, True), _all_grads(model, ppo, False))


def test_bench_sized_llm_loss_and_gradients_equal_the_unchunked_ones():
    """The benchmark's LLM shape (width 384, 4 layers, 32k vocabulary): 1536 labelled rows, two chunks."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                                       num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=False))
    ids = torch.randint(0, 32000, (4, 385))
    assert cl.chunk_rows(32000) < 4 * 384

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.llm = llm

        def forward(self):
            h = self.llm.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 384)
            return cl.mean_nll(self.llm.lm_head, h, ids[:, 1:].reshape(-1), chunked=self.chunked_loss)
    m = M()
    _assert_same(_all_grads(m, m, True), _all_grads(m, m, False))

"""BitDelta: sign packing, which layers are compressed, sizes, apply, serving wrappers, scale distillation."""

import copy
import math

import pytest
import torch
from torch import nn

from tinyml_cli.core.bitdelta import (
    BitDelta,
    BitDeltaLinear,
    apply_delta,
    compress,
    delta_attached,
    delta_linears,
    mean_kl,
    pack_signs,
    unpack_signs,
)
from tinyml_cli.core.chunked_loss import logits_kl


class Toy(nn.Module):
    """Not a Llama: an embedding, an MLP, a LayerNorm, a conv, attention through nn.MultiheadAttention and a head
    tied to the embedding. Called like the LMM: (input_ids, attention_mask, pixel_values) -> logits; `hidden_states`
    and `head` as on the LMM."""

    def __init__(self, vocab=11, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None):
        h = self.emb(input_ids)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.norm(h + self.mlp(h))

    def forward(self, input_ids, attention_mask=None, pixel_values=None):
        return self.head(self.hidden_states(input_ids))


def toy_pair(seed=0, scale=0.05):
    """A base and a 'fine-tuned' copy: every parameter moved by noise."""
    torch.manual_seed(seed)
    base = Toy()
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * torch.randn_like(p))
    return base, ft


# ------------------------------------------------------------------------------------------- packing
def test_pack_unpack_round_trip_odd_size():
    d = torch.randn(5, 7)
    d[0, 0] = 0.0  # non-positive -> -1
    packed = pack_signs(d)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(35 / 8)
    assert torch.equal(unpack_signs(packed, d.shape), torch.where(d > 0, 1.0, -1.0))


def test_pack_bit_layout_by_hand():
    # element 8k+i is bit i of byte k: + - - + - - - + -> 1 + 8 + 128 = 137; then one + -> 1
    d = torch.tensor([1.0, -1, 0, 2, -3, -1, -1, 5, 0.5])
    assert pack_signs(d).tolist() == [137, 1]


# ------------------------------------------------------------------------------------- which layers
def test_linears_found_by_type_not_name():
    base, _ = toy_pair()
    names = set(delta_linears(base))
    # the MLP's linears; not the tied head, not MultiheadAttention's out_proj (it is never called as a module)
    assert names == {"mlp.0", "mlp.2"}


def test_hf_output_head_is_excluded(tiny_model):
    names = set(delta_linears(tiny_model))
    assert "llm.lm_head" not in names and "connector.proj.0" in names
    assert any(n.startswith("llm.model.layers.0.self_attn.") for n in names)
    assert any(n.startswith("vision.") for n in names)


# -------------------------------------------------------------------------------------------- compress
def test_compress_scales_are_mean_abs_delta_and_other_tensors_kept_whole():
    base, ft = toy_pair()
    delta = compress(base, ft)
    for name in ("mlp.0", "mlp.2"):
        d = ft.get_submodule(name).weight - base.get_submodule(name).weight
        assert torch.allclose(delta.scales[name], d.abs().mean())
        assert torch.equal(unpack_signs(delta.signs[name], d.shape), torch.where(d > 0, 1.0, -1.0))
    # everything else that differs is stored as the fine-tuned value
    assert "mlp.0.weight" not in delta.full and "mlp.0.bias" in delta.full
    for k in ("emb.weight", "norm.weight", "conv.weight", "attn.in_proj_weight", "attn.out_proj.weight"):
        assert torch.equal(delta.full[k], dict(ft.named_parameters())[k]), k


def test_unchanged_matrices_are_not_stored():
    base = Toy()
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.mlp[2].weight.add_(0.1)
    delta = compress(base, ft)
    assert set(delta.signs) == {"mlp.2"} and not delta.full


def test_ratio_arithmetic():
    delta = BitDelta(signs={"a": torch.zeros(512, dtype=torch.uint8), "b": torch.zeros(2, dtype=torch.uint8)},
                     scales={"a": torch.tensor(1.0), "b": torch.tensor(1.0)},
                     shapes={"a": torch.Size([64, 64]), "b": torch.Size([3, 5])},
                     full={"n": torch.zeros(10)})
    s = delta.sizes()
    # fp16 delta: 2 bytes per element; BitDelta: ceil(n/8) bytes of signs + 4 bytes of scale per matrix
    assert s["fp16_delta_bytes"] == 2 * (4096 + 15)
    assert s["bitdelta_bytes"] == 512 + 2 + 2 * 4
    assert s["ratio"] == pytest.approx(2 * 4111 / 522)
    # the total counts the kept tensors at their stored size (fp32 here) against their fp16 delta
    assert s["full_bytes"] == 40
    assert s["ratio_total"] == pytest.approx((2 * 4111 + 20) / (522 + 40))


def test_save_load_round_trip(tmp_path):
    base, ft = toy_pair()
    delta = compress(base, ft)
    delta.save(tmp_path / "d")
    back = BitDelta.load(tmp_path / "d")
    assert set(back.signs) == set(delta.signs) and back.shapes == delta.shapes
    for k in delta.signs:
        assert torch.equal(back.signs[k], delta.signs[k]) and torch.equal(back.scales[k], delta.scales[k])
    assert all(torch.equal(back.full[k], v) for k, v in delta.full.items())


# ------------------------------------------------------------------------------------- apply / serve
def test_apply_reconstructs_base_plus_sign_times_scale_exactly():
    base, ft = toy_pair()
    delta = compress(base, ft)
    merged = apply_delta(copy.deepcopy(base), delta)
    for name in delta.signs:
        w0, d = base.get_submodule(name).weight, ft.get_submodule(name).weight - base.get_submodule(name).weight
        want = w0 + d.abs().mean() * torch.where(d > 0, 1.0, -1.0)
        assert torch.equal(merged.get_submodule(name).weight, want)
    assert torch.equal(merged.norm.weight, ft.norm.weight) and torch.equal(merged.emb.weight, ft.emb.weight)


def test_apply_refuses_a_different_base():
    base, ft = toy_pair()
    delta = compress(base, ft)
    from tinyml_cli import UserError
    with pytest.raises(UserError, match="different base"):
        apply_delta(Toy(), delta)


def test_attached_delta_computes_the_merged_model_and_detaches_cleanly():
    base, ft = toy_pair()
    delta = compress(base, ft)
    ids = torch.randint(0, 11, (2, 6))
    merged_out = apply_delta(copy.deepcopy(base), delta)(ids)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    base_out = base(ids)
    with delta_attached(base, delta) as wrappers:
        assert set(wrappers) == {"mlp.0", "mlp.2"} and isinstance(base.mlp[0], BitDeltaLinear)
        assert torch.allclose(base(ids), merged_out, atol=1e-5)
    assert isinstance(base.mlp[0], nn.Linear) and not isinstance(base.mlp[0], BitDeltaLinear)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert torch.equal(base(ids), base_out)


def test_backward_keeps_packed_bits_not_a_full_sign_matrix():
    """Memory bound of distillation: no weight-sized tensor is saved for backward besides the base weight."""
    lin = nn.Linear(256, 256).requires_grad_(False)
    d = torch.randn(256, 256)
    layer = BitDeltaLinear(lin, pack_signs(d), d.abs().mean())
    x = torch.randn(4, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != lin.weight.data_ptr())
    assert extra < 256 * 256  # packed bits (8 KB) + activations; the fp32 sign matrix alone would be 256 KB
    y.sum().backward()
    sign = torch.where(d > 0, 1.0, -1.0)
    assert torch.allclose(layer.scale.grad, (x.detach() @ sign.t()).sum(), rtol=1e-4)
    assert torch.allclose(x.grad, (lin.weight + layer.scale.detach() * sign).sum(0).expand(4, -1), atol=1e-4)


# -------------------------------------------------------------------------------------- distillation
def test_logits_kl_by_hand():
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    student = torch.tensor([[0.0, 0.0]])             # q = (1/2, 1/2)
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert logits_kl(student, teacher).item() == pytest.approx(want, abs=1e-6)
    assert logits_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_logits_mse_by_hand():
    from tinyml_cli.core.bitdelta import logits_mse
    student, teacher = torch.tensor([[0.0, 1.0], [2.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    assert logits_mse(student, teacher).item() == pytest.approx((1 + 0 + 4 + 0) / 4)  # mean over rows and vocab


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_scale_distillation_lowers_its_objective_on_a_toy_model(tmp_path, loss):
    from tinyml_cli.config import TrainConfig
    from tinyml_cli.core.bitdelta import Distillation, distill_step, fit_to_teacher
    from tinyml_cli.core.loop import ExampleBatches, train
    base, ft = toy_pair(scale=0.1)
    delta = compress(base, ft)
    torch.manual_seed(1)
    seqs = [torch.randint(0, 11, (8,)) for _ in range(64)]

    def collate(batch):
        ids = torch.stack(batch)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    base.requires_grad_(False)
    ft.requires_grad_(False)
    with delta_attached(base, delta) as wrappers:
        base.device = torch.device("cpu")  # fit_to_teacher reads it, as on the LMM
        fit0 = fit_to_teacher(base, ft, seqs[48:], collate)
        assert fit0["kl"] == pytest.approx(mean_kl(base, ft, seqs[48:], collate))
        frozen = {k: v.clone() for k, v in base.state_dict().items() if not k.endswith(".scale")}
        tcfg = TrainConfig(max_steps=40, batch_size=8, lr=1e-2, scheduler="constant", warmup_ratio=0.0)
        train(Distillation(base, ft, loss), ExampleBatches(seqs[:48], collate), distill_step, tcfg, tmp_path)
        fit1 = fit_to_teacher(base, ft, seqs[48:], collate)
        moved = [float(w.scale.detach()) for w in wrappers.values()]
        assert all(torch.equal(v, frozen[k]) for k, v in base.state_dict().items() if k in frozen)
    # held out, the objective it trained on falls (KL by 13 %, MSE by 2 %: one scale per matrix can move the logits'
    # spread, not their offset, and MSE counts the offset)
    assert fit1[loss] < 0.98 * fit0[loss], (fit0, fit1)
    assert 0 <= fit0["top1_agreement"] <= 1
    assert moved != [float(delta.scales[n]) for n in wrappers]  # the scales trained, nothing else did
    assert (tmp_path / "metrics.jsonl").is_file()


# ------------------------------------------------------------------------------- the tiny LMM, the CLI
@pytest.fixture(scope="module")
def base_and_ft(tiny_model, tiny_cfg, tmp_path_factory):
    """A base folder and a fine-tuned one: LoRA on the LLM (merged by BitDelta), vision and connector trained."""
    from tinyml_cli.stages.sft import run_sft
    root = tmp_path_factory.mktemp("bitdelta")
    tiny_model.save(root / "base")
    run_sft(tiny_cfg(f"model.init_from={root / 'base'}", "peft.method=lora", "train.parts=[connector,vision]",
                     "train.lr=1e-2"), root / "ft", "sft")
    return root / "base", root / "ft"


def test_tiny_lmm_delta_covers_llm_vision_connector_and_serves_like_the_merged_model(base_and_ft, shapes):
    from tinyml_cli.core.batching import Collator, ImageLoader
    from tinyml_cli.core.bitdelta import load_full_precision
    from tinyml_cli.records.conversations import load_examples
    from tinyml_cli.records.encoder import Encoder
    base_dir, ft_dir = base_and_ft
    base, ft = load_full_precision(base_dir), load_full_precision(ft_dir)
    assert not hasattr(ft.llm, "peft_config")  # the LoRA adapter was merged into the weights
    delta = compress(base, ft)
    parts = {n.split(".")[0] for n in delta.signs}
    assert parts == {"llm", "vision", "connector"}
    assert "llm.lm_head" not in delta.signs and not any("embed_tokens" in k for k in delta.full)
    assert delta.sizes()["ratio"] > 10
    enc = Encoder(base.tokenizer, base.num_image_tokens, 160)
    ex = load_examples(shapes / "eval.jsonl", enc)[0][:4]
    batch = Collator(base.tokenizer.pad_token_id, ImageLoader(base.image_processor))(ex)
    batch.pop("labels")
    merged = apply_delta(load_full_precision(base_dir), delta)
    with torch.no_grad(), delta_attached(base, delta):
        assert torch.allclose(base(**batch), merged(**batch), atol=1e-4)


def test_bitdelta_help_has_examples():
    from test_cli import tinyml
    for cmd in ("compress", "apply"):
        r = tinyml("bitdelta", cmd, "--help")
        assert r.returncode == 0 and "Example: tinyml bitdelta" in r.stdout
    r = tinyml("generate", "--help")
    assert "--delta" in r.stdout


def test_apply_of_a_non_delta_folder_is_exit_2(tmp_path):
    from test_cli import tinyml
    r = tinyml("bitdelta", "apply", tmp_path, tmp_path, tmp_path / "out")
    assert r.returncode == 2 and "not a BitDelta folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_bitdelta_cli_end_to_end(base_and_ft, shapes, tmp_path):
    from safetensors.torch import load_file
    from test_cli import one_json, tinyml

    from tinyml_cli.core.model import load_model
    base_dir, ft_dir = base_and_ft
    out = tmp_path / "delta"
    # calibration / held-out data come from the fine-tuned run's own config.yaml
    r = tinyml("bitdelta", "compress", base_dir, ft_dir, out, "--set", "train.max_steps=3", "--json")
    assert r.returncode == 0, r.stderr
    res = one_json(r.stdout)
    m = res["metrics"]
    assert res["command"] == "bitdelta compress" and res["output_dir"] == str(out)
    assert m["ratio"] > 10 and m["steps"] == 3
    for k in ("kl_initial", "kl_distilled", "mse_initial", "mse_distilled", "top1_agreement_initial",
              "top1_agreement_distilled", "vqa_accuracy_initial", "vqa_accuracy_distilled", "vqa_accuracy_finetuned"):
        assert k in m, k
    assert m["kl_initial"] > 0 and 0 <= m["vqa_accuracy_distilled"] <= 1
    for f in ("bitdelta.json", "signs.safetensors", "scales.safetensors", "full.safetensors", "config.yaml",
              "metrics.jsonl"):
        assert (out / f).is_file(), f

    r = tinyml("bitdelta", "apply", base_dir, out, tmp_path / "merged", "--json")
    assert r.returncode == 0, r.stderr
    merged, base = load_model(tmp_path / "merged"), load_model(base_dir)
    signs, scales = load_file(str(out / "signs.safetensors")), load_file(str(out / "scales.safetensors"))
    name = "llm.model.layers.0.self_attn.q_proj"
    w0 = base.get_submodule(name).weight
    assert torch.equal(merged.get_submodule(name).weight, w0 + scales[name] * unpack_signs(signs[name], w0.shape))

    img = shapes / "images" / "000000.png"
    r = tinyml("generate", base_dir, "--delta", out, "--delta", out, "--image", img,
               "--prompt", "What color is the circle?", "--json")
    assert r.returncode == 0, r.stderr
    answers = one_json(r.stdout)["answers"]
    assert len(answers) == 2 and answers[0]["answer"] == answers[1]["answer"]


@pytest.mark.parametrize("chunked", [True, False])
def test_distillation_with_the_step_in_the_backward_pass_learns_the_same_scales(tmp_path, chunked):
    from tinyml_cli.config import TrainConfig
    from tinyml_cli.core.bitdelta import Distillation, distill_step
    from tinyml_cli.core.loop import ExampleBatches, train
    torch.manual_seed(1)
    seqs = [torch.randint(0, 11, (8,)) for _ in range(16)]

    def collate(batch):
        ids = torch.stack(batch)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    scales = []
    for in_backward in (False, True):
        base, ft = toy_pair(scale=0.1)
        base.requires_grad_(False), ft.requires_grad_(False)
        base.chunked_loss = chunked
        with delta_attached(base, compress(base, ft)) as wrappers:
            tcfg = TrainConfig(max_steps=4, batch_size=4, lr=1e-2, scheduler="constant", warmup_ratio=0.0,
                               max_grad_norm=0.0, optimizer_in_backward=in_backward)
            train(Distillation(base, ft), ExampleBatches(seqs, collate), distill_step, tcfg, tmp_path)
            scales.append(torch.stack([w.scale.detach() for w in wrappers.values()]))
    assert torch.allclose(scales[0], scales[1], atol=1e-7)

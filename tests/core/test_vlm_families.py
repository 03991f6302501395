"""Published VLM families as `model.vlm`: tiny random-weight instances of each family, with processors assembled
offline, saved and loaded back through `from_pretrained` (tinyml_cli.demo.tiny_vlms)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinyml_cli import UserError
from tinyml_cli.config import load_config
from tinyml_cli.core.hf_vlm import num_parameters, part_of
from tinyml_cli.core.model import build_model
from tinyml_cli.demo.tiny_vlms import FAMILIES, build_tiny_vlm
from tinyml_cli.records.conversations import load_examples, messages_of, open_rgb
from tinyml_cli.records.encoder import encoder_for

FAMS = [pytest.param(f, id=f) for f in FAMILIES]


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory):
    built = {}

    def get(family):
        if family not in built:
            built[family] = build_tiny_vlm(family, tmp_path_factory.mktemp(family))
        return built[family]
    return get


@pytest.fixture(scope="session")
def vlm(vlm_dir, shapes):
    models = {}

    def get(family):
        if family not in models:
            cfg = load_config(None, [f"model.vlm={vlm_dir(family)}", f"data.train={shapes / 'train.jsonl'}"])
            torch.manual_seed(0)
            models[family] = (build_model(cfg.model), cfg)
        return models[family]
    return get


@pytest.mark.parametrize("family", FAMS)
def test_records_encode_as_the_processor_does(family, vlm, shapes):
    model, cfg = vlm(family)
    enc = encoder_for(model, cfg.data)
    rec = json.loads((shapes / "train.jsonl").read_text().splitlines()[0])
    examples, _ = load_examples(shapes / "train.jsonl", enc)
    ids, labels = examples[0].input_ids, examples[0].labels
    text = enc._render(messages_of(rec), False)
    theirs = model.processor(text=[text], images=[[open_rgb(shapes / rec["image"])]], add_special_tokens=False)
    theirs = theirs["input_ids"][0]
    if family == "paligemma":  # its processor adds bos and a newline around the prefix our template already has
        assert theirs.count(model.image_token_id) == ids.count(model.image_token_id) > 0
    else:
        assert theirs == ids
    # labels: exactly the assistant answers, each followed by the family's end-of-turn token
    answers = [m["content"] for m in messages_of(rec) if m["role"] == "assistant"]
    labelled = model.tokenizer.decode([t for t in labels if t != -100])
    eos = model.tokenizer.eos_token
    assert labelled.replace(eos, "").replace("\n", "").replace(" ", "") == "".join(answers).replace(" ", "")
    assert all(labels[i] == -100 for i, t in enumerate(ids) if t == model.image_token_id)


@pytest.mark.parametrize("family", FAMS)
def test_parts_cover_every_parameter_once(family, vlm):
    model, _ = vlm(family)
    parts = num_parameters(model)
    assert parts["total"] == model.hf.num_parameters() == sum(p.numel() for p in model.parameters())
    assert all(parts[p] > 0 for p in ("vision", "connector", "llm")), parts


@pytest.mark.parametrize("family", FAMS)
def test_a_config_only_folder_estimates_the_exact_count(family, vlm, vlm_dir, tmp_path):
    from tinyml_cli.stages.estimate import run_estimate
    model, _ = vlm(family)
    shutil.copy(vlm_dir(family) / "config.json", tmp_path / "config.json")
    for method in ("full", "lora"):
        cfg = load_config(None, [f"model.vlm={tmp_path}", f"peft.method={method}", "data.max_length=8192"])
        m = run_estimate(cfg, device="cpu", image_size=32)["metrics"]
        assert m["params"]["total"] == model.hf.num_parameters()
        assert m["params"]["vision"] == num_parameters(model)["vision"]
        assert (m["params"]["trainable"] == m["params"]["total"]) == (method == "full")
        assert m["image_tokens"] > 0 and m["total_bytes"] > 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "smolvlm", "lfm2_vl", "internvl"])
def test_image_token_counts_follow_the_image_and_several_images_fit_one_record(family, vlm, tmp_path):
    model, cfg = vlm(family)
    small, wide = tmp_path / "small.png", tmp_path / "wide.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(small)
    Image.new("RGB", (96, 40), (0, 0, 255)).save(wide)
    rec = {"images": ["small.png", "wide.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich is wider?"}, {"from": "gpt", "value": "the second"}]}
    (tmp_path / "two.jsonl").write_text(json.dumps(rec) + "\n")
    enc = encoder_for(model, cfg.data)
    n_small, n_wide = len(enc.images.ids(small)), len(enc.images.ids(wide))
    assert n_wide != n_small  # dynamic resolution / splitting: the count follows the image's size
    ex, _ = load_examples(tmp_path / "two.jsonl", enc)
    batch = model.collator()(ex)
    loss = model(**batch)
    assert torch.isfinite(loss)
    theirs = model.processor(text=[enc._render(messages_of(rec), False)],
                             images=[[open_rgb(small), open_rgb(wide)]], add_special_tokens=False)["input_ids"][0]
    assert theirs == ex[0].input_ids


def test_truncation_never_cuts_image_tokens(vlm, shapes, tmp_path):
    model, _ = vlm("qwen2_5_vl")
    cfg = load_config(None, [f"model.vlm={model.spec['source']}", "data.max_length=12"])
    with pytest.raises(UserError, match=r"train.jsonl:1: image tokens end at \d+ > data.max_length=12"):
        load_examples(shapes / "train.jsonl", encoder_for(model, cfg.data))


def test_a_processor_without_chat_template_is_a_one_line_error(vlm_dir, tmp_path):
    src = vlm_dir("llava")
    dst = tmp_path / "llava"
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink()
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    with pytest.raises(UserError, match="has no chat template"):
        build_model(load_config(None, [f"model.vlm={dst}"]).model)


def test_vlm_excludes_composed_keys_and_methods_it_cannot_run():
    with pytest.raises(UserError, match="leave model.llm and model.vision unset"):
        load_config(None, ["model.vlm=x", "model.llm=y"])
    with pytest.raises(UserError, match="peft.method=prefix-tuning is not available for model.vlm"):
        load_config(None, ["model.vlm=x", "peft.method=prefix-tuning"])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMS)
def test_family_post_trains_saves_merges_prefers_and_generates(family, tmp_path_factory, shapes, prefs):
    """The benchmark's flow per family (benchmarks/vlm_families.py), asserted: LoRA and full sft losses fall, the
    saved adapter and the merged folder give the same logits, a DPO step and generation run, counts are exact."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import vlm_families
    row = vlm_families.family_row(family, tmp_path_factory.mktemp(f"run-{family}"), shapes, prefs, steps=12)
    assert row["sft_lora_loss_last"] < row["sft_lora_loss_first"]
    assert row["sft_full_loss_last"] < row["sft_full_loss_first"]
    assert row["adapter_reload_max_diff"] <= 1e-4 and row["merge_max_diff"] <= 1e-4
    assert row["dpo_ok"] and row["generate_ok"]
    assert row["params_exact"] and row["estimate_params_exact"]


# Published checkpoints' config.json (examples/configs): exact counts of the architecture the config describes; each
# matches the figure its model card gives (256M, 3.75B, 451M, 3B: PaliGemma 2 "3B" is 3.03B).
PUBLISHED = [("smolvlm-256m-instruct", 256_484_928, 64), ("qwen2.5-vl-3b-instruct", 3_754_622_976, 256),
             ("lfm2-vl-450m", 450_822_656, 256), ("paligemma2-3b-pt-224", 3_032_242_416, 256)]


@pytest.mark.parametrize("name,params,image_tokens", PUBLISHED)
def test_published_configs_estimate_with_exact_counts(name, params, image_tokens):
    from tinyml_cli.stages.estimate import run_estimate
    root = Path(__file__).resolve().parents[2] / "examples" / "configs" / name
    cfg = load_config(None, [f"model.vlm={root}", "peft.method=lora", "data.max_length=2048", "train.batch_size=1"])
    r = run_estimate(cfg, device="cuda", gib=24)
    m = r["metrics"]
    assert m["params"]["total"] == params
    assert m["image_tokens"] == image_tokens  # one tile at the family's default resolution
    assert 0 < m["params"]["trainable"] < m["params"]["total"] / 20  # LoRA: a few percent
    for part in ("vision", "connector"):
        assert m["breakdown"][f"weights_{part}"] == 2 * m["params"][part]  # bf16 on a GPU
    # the LLM's bf16 weights and its LoRA adapters (fp32)
    assert m["breakdown"]["weights_llm"] == 2 * m["params"]["llm"] + 4 * m["params"]["adapters"]
    assert m["total_bytes"] > m["breakdown"]["weights_llm"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "smolvlm", "gemma3"])
def test_every_command_runs_on_a_vlm(family, vlm_dir, shapes, prefs, tmp_path):
    """Families with different extra inputs (Qwen's dynamic resolution and grid sizes, SmolVLM's image splitting
    and pixel_attention_mask, Gemma 3's token_type_ids and soft-capped head) through the commands the per-family
    flow does not run: freeze by part, DoRA, QLoRA (LLM-only 4-bit) and its merge over the dequantized base, exact
    resume, reward, ppo, grpo, kto, bitdelta, eval."""
    from tinyml_cli.core.model import load_model
    from tinyml_cli.stages.bitdelta import compress_config, run_compress
    from tinyml_cli.stages.eval import run_eval
    from tinyml_cli.stages.merge import merge_run
    from tinyml_cli.stages.grpo import run_grpo
    from tinyml_cli.stages.kto import run_kto
    from tinyml_cli.stages.ppo import run_ppo
    from tinyml_cli.stages.reward import run_reward
    from tinyml_cli.stages.sft import run_sft
    src = vlm_dir(family)
    base = [f"model.vlm={src}", f"data.train={shapes / 'train.jsonl'}", "train.batch_size=2", "train.max_steps=2"]

    r = run_sft(load_config(None, [*base, "peft.method=freeze", "train.parts=[connector]"]), tmp_path / "fr", "sft")
    m = load_model(tmp_path / "fr")
    assert r["trainable_params"] == num_parameters(m)["connector"]
    run_sft(load_config(None, [*base, "peft.method=dora", "peft.parts=[llm,vision]"]), tmp_path / "dora", "sft")
    adapter = json.loads((tmp_path / "dora" / "vlm_adapter" / "adapter_config.json").read_text())
    dora = load_model(tmp_path / "dora")
    assert adapter["use_dora"] and dora.peft_parts() == ["llm", "vision"]
    adapted = {n.split(".lora_")[0] for n, _ in dora.hf.named_parameters() if ".lora_" in n}
    assert {part_of(n) for n in adapted} == {"llm", "vision"}  # not the connector
    assert not any("lm_head" in n for n in adapted)  # nor the output head

    r = run_sft(load_config(None, [*base, "peft.method=qlora"]), tmp_path / "ql", "sft")
    assert getattr(load_model(tmp_path / "ql").base_llm(), "is_loaded_in_4bit", False)
    merged = merge_run(tmp_path / "ql", tmp_path / "ql-merged")
    assert merged["metrics"]["dequantized_4bit_base"]
    assert not getattr(load_model(tmp_path / "ql-merged").base_llm(), "is_loaded_in_4bit", False)

    # resume: a run stopped after its step-2 checkpoint ends where an uninterrupted one does
    full = [*base, "peft.method=full", "train.max_steps=4", "train.save_every=2"]
    whole = run_sft(load_config(None, full), tmp_path / "whole", "sft")["metrics"]["loss_last"]
    run_sft(load_config(None, [*full[:-2], "train.max_steps=2"]), tmp_path / "cut", "sft")
    import shutil
    ckpt = tmp_path / "cut" / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-00000002", ckpt / "step-00000002")
    resumed = run_sft(load_config(None, full), tmp_path / "cut", "sft", resume=True)["metrics"]
    assert resumed["resumed_from"] == 2 and resumed["loss_last"] == pytest.approx(whole, abs=1e-5)

    pref = [f"model.vlm={src}", f"data.train={prefs / 'pref_train.jsonl'}", "peft.method=lora", "train.batch_size=2"]
    rw = run_reward(load_config(None, [*pref, "train.max_steps=2", f"data.eval={prefs / 'pref_eval.jsonl'}"]),
                    tmp_path / "rw")["metrics"]
    assert 0 <= rw["eval_accuracy"] <= 1
    pp = run_ppo(load_config(None, [*pref, "ppo.rollouts=2", "ppo.rollout_size=4", "ppo.minibatch=2", "ppo.epochs=1"]),
                 tmp_path / "ppo")["metrics"]
    assert pp["rollouts"] == 2 and pp["steps"] == 4
    # grpo: G answers per prompt through generate's num_return_sequences (Qwen's flattened patches and grid sizes
    # expanded by the family's own code), each micro-batch collated afresh from the records; kto on the same pairs
    gr = run_grpo(load_config(None, [*pref, "grpo.rollouts=2", "grpo.prompts=2", "grpo.num_generations=2",
                                     "grpo.minibatch=2", "grpo.max_new_tokens=4", "grpo.beta=0.04"]),
                  tmp_path / "grpo")["metrics"]
    assert gr["rollouts"] == 2 and gr["steps"] == 4 and gr["responses_per_rollout"] == 4
    kt = run_kto(load_config(None, [*pref, "train.max_steps=2"]), tmp_path / "kto")["metrics"]
    assert kt["answers"] > 0 and kt["steps"] == 2

    bd = run_compress(compress_config(None, [f"data.train={shapes / 'train.jsonl'}", f"data.eval={shapes / 'eval.jsonl'}",
                                             "train.max_steps=2"], tmp_path / "whole"),
                      tmp_path / "fr", tmp_path / "whole", tmp_path / "delta")["metrics"]
    assert bd["ratio"] > 10
    ev = run_eval(str(tmp_path / "whole"), load_config(None, [f"data.eval={shapes / 'eval.jsonl'}",
                                                              "gen.max_new_tokens=3"]), None)["metrics"]
    assert ev["n"] == 30 and 0 <= ev["vqa_accuracy"] <= 1

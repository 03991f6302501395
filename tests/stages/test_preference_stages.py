"""Preference data, the reward / dpo / ppo commands end to end on the tiny default (a few steps each)."""

import json

import pytest
import torch

from tinyml_cli.core.logprobs import token_logps
from tinyml_cli.records.preferences import load_pairs, response_only


def test_synth_preferences_differ_only_in_the_hallucination(prefs):
    recs = [json.loads(line) for line in (prefs / "pref_train.jsonl").read_text().splitlines()]
    assert len(recs) == 24
    for r in recs:
        good, bad = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert good != bad and r["prompt"][-1]["role"] == "user" and "<image>" in r["prompt"][0]["content"]
        if r["type"] == "existence":
            assert {good, bad} == {"yes", "no"}
    probe = [json.loads(line) for line in (prefs / "pope_probe.jsonl").read_text().splitlines()]
    assert probe and all(p["type"] == "existence" and p["answer"] in ("yes", "no") for p in probe)


def test_response_only_keeps_the_last_assistant_turn():
    assert response_only([-100, 5, 6, -100, -100, 7, 8, -100]) == [-100] * 5 + [7, 8, -100]


def test_pairs_encode_labels_on_the_response_only(tiny_model, prefs):
    from tinyml_cli.records.encoder import Encoder
    m = tiny_model
    enc = Encoder(m.tokenizer, m.num_image_tokens, 160)
    pairs, _ = load_pairs(prefs / "pref_train.jsonl", enc)
    for p in pairs:
        n = len(p.prompt.input_ids)
        # the prompt (earlier assistant turns included) is context: no label before the response starts
        assert all(x == -100 for x in p.chosen.labels[:n - 1])
        text = m.tokenizer.decode([x for x in p.chosen.labels if x != -100], skip_special_tokens=True)
        assert text.strip() == p.meta["answer"]


def _eval_pairs(tiny_model, prefs):
    """The tiny model in eval mode and its encoded held-out pairs."""
    from tinyml_cli.records.encoder import Encoder
    m = tiny_model.eval()
    return m, load_pairs(prefs / "pref_eval.jsonl", Encoder(m.tokenizer, m.num_image_tokens, 160))[0]


def test_token_logps_match_the_model_loss(tiny_model, prefs):
    from tinyml_cli.core.batching import collator_for
    m, pairs = _eval_pairs(tiny_model, prefs)
    b = collator_for(m)(pairs[:3])
    with torch.no_grad():
        lp, mask = token_logps(m, b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"])
        loss = m(**b)
    assert torch.isclose(-lp[mask].mean(), loss, atol=1e-5)  # mean NLL over response tokens = the sft loss
    assert (lp[~mask] == 0).all()


def test_tempered_token_logps_and_generation_without_image_tokens(tiny_model, prefs):
    """PPO's log-probs at temperature T are those of softmax(logits / T); sampling never emits the image token."""
    from tinyml_cli.core.batching import collator_for
    m, pairs = _eval_pairs(tiny_model, prefs)
    b = collator_for(m)(pairs[:2])
    with torch.no_grad():
        lp, mask = token_logps(m, b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"], temperature=2.0)
        logits = m.logits_at(m.hidden_states(b["input_ids"], b["attention_mask"], b["pixel_values"])[:, :-1]).float()
    want = torch.log_softmax(logits / 2.0, -1).gather(-1, b["labels"][:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(lp[mask], want[mask], atol=1e-5)
    from tinyml_cli.core.batching import Collator, ImageLoader

    def favour_image_token(module, args, out):  # the placeholder becomes by far the likeliest next token
        out[..., m.image_token_id] += 100.0
        return out
    gb = Collator(m.tokenizer.pad_token_id, ImageLoader(m.image_processor), left_pad=True)([p.prompt for p in pairs[:2]])
    gb.pop("labels")
    hook = m.llm.get_output_embeddings().register_forward_hook(favour_image_token)
    try:
        torch.manual_seed(0)
        greedy, sampled = (m.generate(**gb, max_new_tokens=4, temperature=t) for t in (0.0, 2.0))
    finally:
        hook.remove()
    assert not (greedy == m.image_token_id).any() and not (sampled == m.image_token_id).any()


def _run(cli_args):
    from typer.testing import CliRunner

    from tinyml_cli.cli import app
    res = CliRunner().invoke(app, cli_args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def _sets(tiny, prefs, *extra):
    base = [f"model.llm={tiny / 'llm'}", f"model.vision={tiny / 'vision'}", f"data.train={prefs / 'pref_train.jsonl'}",
            f"data.eval={prefs / 'pref_eval.jsonl'}", "train.batch_size=4", "train.max_steps=3", *extra]
    return [x for s in base for x in ("--set", s)]


@pytest.mark.slow
def test_reward_train_and_score(tiny, prefs, tmp_path):
    r = _run(["reward", *_sets(tiny, prefs), "-o", str(tmp_path / "rm"), "--json"])
    m = r["metrics"]
    assert r["command"] == "reward" and m["steps"] == 3 and 0 <= m["eval_accuracy"] <= 1 and m["eval_pairs"] == 8
    assert (tmp_path / "rm" / "reward_head.safetensors").is_file() and (tmp_path / "rm" / "metrics.jsonl").is_file()
    s = _run(["reward", "score", str(prefs / "pref_eval.jsonl"), "--model", str(tmp_path / "rm"), "--json",
              "--output", str(tmp_path / "scores.jsonl")])
    assert s["metrics"]["accuracy"] == pytest.approx(m["eval_accuracy"]) and s["metrics"]["pairs"] == 8
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 8


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["pref.loss_type=ipo"], ["pref.rpo_alpha=1.0"],
                                   ["peft.method=lora", "pref.precompute_ref=false"]],
                         ids=["dpo", "ipo", "rpo", "lora-live-reference"])
def test_dpo(tiny, prefs, tmp_path, extra):
    r = _run(["dpo", *_sets(tiny, prefs, "train.lr=1e-3", *extra), "-o", str(tmp_path / "dpo"), "--json"])
    m = r["metrics"]
    assert m["steps"] == 3 and 0 <= m["eval_pref_accuracy"] <= 1 and "rewards_margin" in m
    if not extra:  # the first step starts at the reference: DPO loss log 2
        first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    if extra == ["pref.rpo_alpha=1.0"]:  # log 2 plus the untrained model's NLL of the chosen answers
        assert json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])["loss"] > 0.6931 + 0.1
    assert (tmp_path / "dpo" / "tinyml_model.json").is_file()


@pytest.mark.slow
def test_ppo(tiny, prefs, tmp_path):
    r = _run(["ppo", *_sets(tiny, prefs, "ppo.rollouts=2", "ppo.rollout_size=6", "ppo.minibatch=3",
                                   "ppo.adaptive_kl=true"), "-o", str(tmp_path / "ppo"), "--json"])
    m = r["metrics"]
    assert m["rollouts"] == 2 and 0 <= m["score_last"] <= 1 and m["kl_last"] == m["kl_last"]
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # first rollout: policy == reference
    assert rows[1]["kl_ctl"] != rows[0]["kl_ctl"]  # the adaptive controller moved


@pytest.mark.slow
def test_demo_quick_full_reports_the_preference_metrics(tmp_path):
    r = _run(["demo", "--quick", "--full", "--json", "-o", str(tmp_path / "demo")])
    m = r["metrics"]
    for k in ["reward_accuracy", "pref_accuracy_sft", "pref_accuracy_dpo", "pope_fp_rate_sft", "pope_fp_rate_dpo",
              "ppo_score_first", "ppo_score_last", "ppo_kl_last", "pope_fp_rate_halva", "vqa_accuracy_halva",
              "vqa_accuracy_dpo", "grpo_score_first", "grpo_score_last", "pref_accuracy_mdpo", "pope_fp_rate_mdpo",
              "mdpo_image_accuracy"]:
        assert isinstance(m[k], float), k
    assert 0 <= m["pope_fp_rate_dpo"] <= 1 and {"reward", "dpo", "mdpo", "ppo", "grpo"} <= set(m["stage_seconds"])
    assert (tmp_path / "demo" / "ppo" / "value_head.safetensors").is_file()


@pytest.mark.parametrize("command", ["reward", "reward score", "dpo", "ppo", "grpo", "rloo", "kto",
                                     "data synth-preferences"])
def test_preference_commands_have_help_with_an_example(command):
    from test_cli import tinyml
    r = tinyml(*command.split(), "--help")
    assert r.returncode == 0, r.stderr
    assert "Example: tinyml" in r.stdout


def test_bad_preference_input_is_a_user_error(tmp_path, prefs):
    from test_cli import tinyml
    r = tinyml("dpo", "--set", "pref.loss_type=hinge", "--set", f"data.train={prefs / 'pref_train.jsonl'}",
               "-o", tmp_path / "d")
    assert r.returncode == 2 and "pref.loss_type" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "a"}) + "\n")
    from tinyml_cli import UserError
    from tinyml_cli.records.encoder import Encoder
    with pytest.raises(UserError, match=r"bad.jsonl:1: .*'rejected'"):
        load_pairs(bad, Encoder.__new__(Encoder))

"""grpo / rloo / kto and the new dpo loss types end to end on the tiny default (a few steps each), exact resume of
grpo inside a rollout, and ppo on prompt-only records."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_preference_stages import _run, _sets

# The untrained tiny model never answers exactly, so exact_match alone would score every response 0 and leave no
# advantage: a format reward that some random responses meet gives the groups different rewards.
VARIED = ["grpo.rewards=[exact_match,format]", "grpo.reward_weights=[1.0,0.5]", "grpo.format_pattern=.*[aeiou].*",
          "grpo.prompts=3", "grpo.num_generations=4", "grpo.minibatch=6", "grpo.max_new_tokens=4",
          "train.log_every=1", "train.lr=1e-3"]


def _rows(d):
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("command, extra", [("grpo", ["grpo.beta=0.04", "grpo.loss_type=dapo"]),
                                            ("grpo", ["grpo.loss_type=dr_grpo", "grpo.scale_rewards=none"]),
                                            ("rloo", ["grpo.beta=0.05", "grpo.normalize_advantages=true"])],
                         ids=["grpo-kl", "dr_grpo", "rloo-kl"])
def test_grpo_and_rloo(tiny, prefs, tmp_path, command, extra):
    out = tmp_path / command
    r = _run([command, *_sets(tiny, prefs, *VARIED, "grpo.rollouts=2", *extra), "-o", str(out), "--json"])
    m = r["metrics"]
    assert r["command"] == command and m["rollouts"] == 2 and m["responses_per_rollout"] == 12
    assert m["steps"] == 4  # 2 rollouts x 12 responses in micro-batches of 6
    assert 0 <= m["score_first"] <= 1.5 and 0 <= m["reward_format"] <= 1 and m["reward_exact_match"] == 0
    rows = _rows(out)
    # each rollout's first step trains the policy that sampled it (old log-probs of the same weights): ratio 1
    assert len(rows) == 4 and rows[0]["clip_frac"] == 0 and rows[2]["clip_frac"] == 0
    assert any(r["frac_zero_std"] < 1 for r in rows) and any(abs(r["loss"]) > 0 for r in rows)
    if "grpo.beta=0.04" in extra:
        assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and m["kl_last"] > 0  # starts at the reference
    if command == "rloo":
        assert "kl" in rows[0] and m["kl_last"] == m["kl_last"]
    assert (out / "tinyml_model.json").is_file()


@pytest.mark.slow
def test_grpo_stopped_inside_a_rollout_resumes_to_the_same_weights(tiny, prefs, tmp_path):
    """Two epochs over each rollout (so old log-probs are used), stopped after the third of a rollout's four
    micro-batches, resumed: the same weights and the same per-step losses as a run never stopped."""
    from tinyml_cli.config import load_config
    from tinyml_cli.stages.grpo import run_grpo
    sets = [s for s in _sets(tiny, prefs, *VARIED, "grpo.rollouts=2", "grpo.epochs=2", "grpo.minibatch=3",
                             "grpo.prompts=2", "grpo.num_generations=3", "grpo.beta=0.04", "train.save_every=1",
                             "train.keep_last=20") if s != "--set" and "max_steps" not in s]
    cfg = load_config(None, sets)

    class Stop(Exception):
        pass

    def stop_at(k):
        def progress(step, total, loss, tps):
            if step == k:
                raise Stop()
        return progress
    full = run_grpo(load_config(None, sets), tmp_path / "full")
    assert full["metrics"]["steps"] == 8
    with pytest.raises(Stop):
        run_grpo(cfg, tmp_path / "cut", progress=stop_at(7))  # checkpoint 7 is not written: resume from 6
    resumed = run_grpo(load_config(None, sets), tmp_path / "cut", resume=True)
    assert resumed["metrics"]["resumed_from"] == 6  # the second rollout's third micro-batch: off-policy, mid-rollout
    a, b = load_file(tmp_path / "full" / "llm" / "model.safetensors"), load_file(tmp_path / "cut" / "llm" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    done = {r["step"]: r for r in _rows(tmp_path / "cut")}
    for r in _rows(tmp_path / "full"):
        assert done[r["step"]]["loss"] == pytest.approx(r["loss"], abs=1e-6) and done[r["step"]]["score"] == r["score"]
    assert any(r["clip_frac"] > 0 or abs(r["loss"]) > 0 for r in _rows(tmp_path / "full")[2:])


@pytest.mark.slow
def test_ppo_and_grpo_read_prompt_only_records(tiny, shapes, tmp_path):
    """A prompt set as TRL's GRPO takes it: prompt, image, a reference answer; and the sft conversations."""
    recs = [json.loads(line) for line in (shapes / "eval.jsonl").read_text().splitlines()][:6]
    p = shapes / "prompts_only.jsonl"  # beside the images it names
    p.write_text("\n".join(json.dumps({"prompt": r["conversations"][0]["value"], "image": r["image"],
                                       "solution": r["answer"]}) for r in recs) + "\n")
    base = [f"model.llm={tiny / 'llm'}", f"model.vision={tiny / 'vision'}", "train.batch_size=4"]
    for data in (p, shapes / "train.jsonl"):
        ppo = ["ppo", *[x for s in base + [f"data.train={data}", "ppo.rollouts=1", "ppo.rollout_size=4",
                                            "ppo.minibatch=4", "ppo.epochs=1"] for x in ("--set", s)]]
        assert _run(ppo + ["-o", str(tmp_path / f"ppo-{data.stem}"), "--json"])["metrics"]["rollouts"] == 1
    grpo = ["grpo", *[x for s in base + [f"data.train={p}", *VARIED, "grpo.rollouts=1"] for x in ("--set", s)]]
    assert _run(grpo + ["-o", str(tmp_path / "grpo"), "--json"])["metrics"]["rollouts"] == 1
    # a rule reward that needs a reference, on prompts without one, is an error before training
    from test_cli import tinyml
    bare = shapes / "prompts_bare.jsonl"
    bare.write_text(json.dumps({"prompt": "What color?", "image": recs[0]["image"]}) + "\n")
    r = tinyml("grpo", "--set", f"model.llm={tiny / 'llm'}", "--set", f"model.vision={tiny / 'vision'}",
               "--set", f"data.train={bare}", "-o", tmp_path / "bare")
    assert r.returncode == 2 and "prompts_bare.jsonl:1: no reference answer" in r.stderr


@pytest.mark.slow
def test_kto_on_unpaired_records_and_on_pairs(tiny, prefs, tmp_path):
    pairs = [json.loads(line) for line in (prefs / "pref_train.jsonl").read_text().splitlines()]
    unpaired = prefs / "unpaired.jsonl"  # 2 desirable answers for each undesirable one
    unpaired.write_text("\n".join(json.dumps({"image": r["image"], "prompt": r["prompt"], "label": i % 3 != 0,
                                              "completion": r["chosen"] if i % 3 else r["rejected"]})
                                  for i, r in enumerate(pairs)) + "\n")
    r = _run(["kto", *_sets(tiny, prefs, f"data.train={unpaired}", "train.log_every=1", "train.lr=1e-3",
                            "pref.undesirable_weight=2.0"), "-o", str(tmp_path / "kto"), "--json"])
    m = r["metrics"]
    assert m["answers"] == 24 and m["desirable"] == 16 and m["eval_answers"] == 16  # the held-out pairs, unpaired
    rows = _rows(tmp_path / "kto")
    # at the reference: every reward 0, the reference point 0, and each answer's loss 1 - s(0) = 1/2 times its weight
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[0]["rewards_desirable"] == pytest.approx(0, abs=1e-6)
    assert 0.5 <= rows[0]["loss"] <= 1.0
    assert rows[-1]["loss"] != rows[0]["loss"]
    live = _run(["kto", *_sets(tiny, prefs, "pref.precompute_ref=false", "peft.method=lora"), "-o",
                 str(tmp_path / "kto-live"), "--json"])
    assert live["metrics"]["answers"] == 48 and live["metrics"]["steps"] == 3  # pairs unpaired: 2 answers each


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["simpo", "orpo", "mdpo"])
def test_dpo_loss_types(tiny, prefs, tmp_path, loss_type):
    r = _run(["dpo", *_sets(tiny, prefs, f"pref.loss_type={loss_type}", "train.lr=1e-3"), "-o", str(tmp_path / "d"),
              "--json"])
    m = r["metrics"]
    assert m["steps"] == 3 and 0 <= m["eval_pref_accuracy"] <= 1
    first = _rows(tmp_path / "d")[0]
    if loss_type == "mdpo":  # at the reference each of the three terms is log 2
        assert first["loss"] == pytest.approx(3 * 0.693147, abs=1e-3) and 0 <= m["eval_image_accuracy"] <= 1
        assert "rewards_corrupted" in first and m["eval_image_accuracy_before"] == m["eval_image_accuracy_before"]
    if loss_type == "orpo":  # the NLL of the untrained model's chosen answers dominates
        assert first["loss"] > 1.0

"""The preference part of `tinyml demo --full`: hallucination pairs -> reward -> dpo -> ppo, after sft.

What the figures measure (all on data the stages never train on):
- reward_accuracy: held-out pairs where the reward model scores the chosen answer above the rejected one;
- pref_accuracy_sft / _dpo: held-out pairs where the model gives the chosen answer a higher summed log-prob
  than the rejected one, before (the sft model) and after DPO;
- pope_fp_rate_sft / _dpo: share of "yes" answers (greedy) to questions about absent objects on the harder
  held-out POPE probe of `synth-preferences` (three-object scenes, absent objects are binding swaps), since the
  core demo's POPE split is answered perfectly after sft;
- ppo_score_first / _last: exact-match score of the sampled responses of the first and last quarter of the PPO rollouts;
  ppo_kl_last: the KL to the reference (summed over a response) in the last rollout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import ui
from .config import load_config

# The 3600-step sft model gets nearly every held-out pair and probe question right, so DPO's gains are a
# few items: 1000 of each keeps them from hanging on one or two answers.
N_PAIRS, N_PAIRS_EVAL, N_PROBE = 24000, 1000, 1000


def _pope_fp_rate(folder: Path, probe: str, cfg) -> float:
    from .evaluate import evaluate_model
    from .model import load_model
    metrics, _ = evaluate_model(load_model(folder), probe, cfg)
    return metrics["pope"]["fp_rate"]


def run_preference_stages(out: Path, sft_dir: Path, con, quick: bool = False) -> tuple[dict, dict, dict]:
    """(metrics, seconds per stage, artifacts) of synth-preferences -> reward -> dpo -> ppo from an sft folder."""
    import time

    from .dpo import run_dpo
    from .ppo import run_ppo
    from .reward import run_reward
    from .synth import synth_preferences

    for sub in ("prefs", "reward", "dpo", "ppo"):
        shutil.rmtree(out / sub, ignore_errors=True)
    seconds, t = {}, time.time()
    files = synth_preferences(out / "prefs", n=24 if quick else N_PAIRS, n_eval=8 if quick else N_PAIRS_EVAL,
                              n_probe=8 if quick else N_PROBE)
    common = [f"model.init_from={sft_dir}", f"data.train={files['train']}", f"data.eval={files['eval']}"]
    short = ["train.max_steps=3", "train.batch_size=4"] if quick else []
    seconds["prefs"] = time.time() - t

    t = time.time()
    with ui.training_bar(con, "reward") as bar:
        reward = run_reward(load_config("tiny_reward", common + short), out / "reward", progress=bar)
    seconds["reward"] = time.time() - t

    t = time.time()
    dpo_cfg = load_config("tiny_dpo", common + short)
    with ui.training_bar(con, "dpo") as bar:
        dpo = run_dpo(dpo_cfg, out / "dpo", progress=bar)
    fp_sft = _pope_fp_rate(sft_dir, files["pope_probe"], dpo_cfg)
    fp_dpo = _pope_fp_rate(out / "dpo", files["pope_probe"], dpo_cfg)
    seconds["dpo"] = time.time() - t

    t = time.time()
    ppo_cfg = load_config("tiny_ppo", common + (["ppo.rollouts=2", "ppo.rollout_size=8", "ppo.minibatch=4"] if quick else []))
    with ui.training_bar(con, "ppo") as bar:
        ppo = run_ppo(ppo_cfg, out / "ppo", progress=bar)
    seconds["ppo"] = time.time() - t

    d, p = dpo["metrics"], ppo["metrics"]
    metrics = {"reward_accuracy": reward["metrics"]["eval_accuracy"], "reward_margin": reward["metrics"]["eval_margin"],
               "pref_accuracy_sft": d["eval_pref_accuracy_before"], "pref_accuracy_dpo": d["eval_pref_accuracy"],
               "dpo_rewards_margin": d["eval_rewards_margin"], "pope_fp_rate_sft": fp_sft, "pope_fp_rate_dpo": fp_dpo,
               "ppo_score_first": p["score_first"], "ppo_score_last": p["score_last"], "ppo_kl_last": p["kl_last"],
               "ppo_kl_max": p["kl_max"]}
    artifacts = {"prefs": str(out / "prefs"), "reward": str(out / "reward"), "dpo": str(out / "dpo"), "ppo": str(out / "ppo")}
    return metrics, seconds, artifacts

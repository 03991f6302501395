"""The online methods' weighted rewards."""

import pytest
import torch

from tinyml_cli import UserError
from tinyml_cli.core.rollout import Scorer
from tinyml_cli.records.preferences import Prompt


def test_scorer_sums_weighted_rule_rewards():
    s = Scorer(["exact_match", "format"], [1.0, 0.5], collate=None, format_pattern="yes|no")
    prompts = [Prompt(None, {"answer": "yes"}), Prompt(None, {"answer": "no"}), Prompt(None, {"answer": "no"})]
    total, each = s(prompts, ["yes", "yes", "maybe"], None, "cpu")
    assert each.tolist() == [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]
    assert total.tolist() == pytest.approx([1.5, 0.5, 0.0])
    assert s.needs_answers == ["exact_match"] and Scorer(["format"], [], None).needs_answers == []


def test_scorer_refuses_bad_specs():
    with pytest.raises(UserError, match="2 reward weights for 1 rewards"):
        Scorer(["exact_match"], [1.0, 2.0], None)
    with pytest.raises(UserError, match="not a reward model folder"):
        Scorer(["exact_match", "no/such/folder"], [], None)
    assert torch.is_tensor(Scorer(["exact_match"], [], None)([Prompt(None, {})], ["x"], None, "cpu")[0])


def test_repeated_answers_share_the_prompt_pass(tiny_model, prefs):
    """generate(repeats=G) runs each prompt once and repeats its KV cache: the same tokens as G copies of the prompt
    (left padding of prompts of different lengths included), sampled from the same RNG draws."""
    from tinyml_cli.core.batching import Collator, ImageLoader
    from tinyml_cli.records.encoder import Encoder
    from tinyml_cli.records.preferences import load_prompts
    m = tiny_model.eval()
    prompts, _ = load_prompts(prefs / "pref_train.jsonl", Encoder(m.tokenizer, m.num_image_tokens, 160))
    uniq = sorted(prompts, key=lambda p: len(p.prompt.input_ids))[::7][:3]
    assert len({len(p.prompt.input_ids) for p in uniq}) > 1  # padding differs between rows
    gc = Collator(m.tokenizer.pad_token_id, ImageLoader(m.image_processor), left_pad=True)
    b = gc([p.prompt for p in uniq])
    b.pop("labels")
    rows = {k: v.repeat_interleave(4, 0) for k, v in b.items()}
    for temperature in (0.0, 1.5):
        torch.manual_seed(0)
        want = m.generate(**rows, max_new_tokens=6, temperature=temperature)
        torch.manual_seed(0)
        got = m.generate(**b, max_new_tokens=6, temperature=temperature, repeats=4)
        assert torch.equal(got, want), temperature
    assert len({tuple(r) for r in want.tolist()}) > 3  # sampled answers differ within a group

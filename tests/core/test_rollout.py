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

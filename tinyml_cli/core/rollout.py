"""What the online methods (ppo, grpo, rloo) share: sampling responses to prompts, scoring them with weighted
rewards, and the batch source that serves each rollout to the training loop as micro-batches.

A rollout draws prompts with a seeded sampler, samples responses, scores them and computes what the method's
loss needs (the `make` of a subclass); the source then yields `epochs` shuffled passes of `minibatch` rows of it.
Its state (sampler, the rollout in progress, the order of its micro-batches, history) goes into checkpoints, so a
resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
import random

import torch

from .. import UserError


def response_example(prompt, resp: list[int]):
    """A prompt record followed by a sampled response, labelled on the response."""
    from ..records.conversations import Example
    return Example(prompt.prompt.input_ids + resp, [-100] * len(prompt.prompt.input_ids) + resp, prompt.prompt.images)


@torch.no_grad()
def sample(model, prompts: list, gen_collate, max_new_tokens: int, temperature: float, repeats: int = 1):
    """Sampled responses to each prompt (`repeats` per prompt, consecutive): (texts, examples of prompt + response
    with labels on the response). Generation stops at the end-of-turn token, which stays in the response. Each
    prompt runs through the model once, however many answers it gets (`generate`'s repeats)."""
    eos_id = model.tokenizer.eos_token_id
    rows = [p for p in prompts for _ in range(repeats)]
    b = {k: v.to(model.device) for k, v in gen_collate([p.prompt for p in prompts]).items()}
    b.pop("labels")
    new = model.generate(**b, max_new_tokens=max_new_tokens, temperature=temperature, repeats=repeats)
    texts, examples = [], []
    for p, seq in zip(rows, new.tolist()):
        resp = seq[:seq.index(eos_id) + 1] if eos_id in seq else seq
        texts.append(model.tokenizer.decode(resp, skip_special_tokens=True).strip())
        examples.append(response_example(p, resp))
    return texts, examples


class Scorer:
    """The weighted sum of several rewards of a response: rule scorers (`records.scoring.RULES`: exact_match,
    answer_tags, format) and reward model folders (`tinyml reward`), each loaded once, here, before training
    (loading one later would draw from the random state a resumed run restores).

    `scorer(prompts, texts, examples, device)` -> (total (N,), per reward (N, R)).
    """

    def __init__(self, specs: list[str], weights: list[float], collate, format_pattern: str = ""):
        from ..records.scoring import RULES
        if not specs:
            raise UserError("no reward to score responses with (name exact_match, answer_tags, format or a reward "
                            "model folder)")
        if weights and len(weights) != len(specs):
            raise UserError(f"{len(weights)} reward weights for {len(specs)} rewards")
        self.names, self.weights, self.collate = list(specs), list(weights or [1.0] * len(specs)), collate
        self.fns = []
        for spec in specs:
            if spec in RULES:
                self.fns.append(self._rule(RULES[spec], format_pattern))
            else:
                from .reward_model import load_reward_model
                self.fns.append(self._model(load_reward_model(spec)))

    @property
    def needs_answers(self) -> list[str]:
        """The rule scorers that compare with a record's reference answer."""
        from ..records.scoring import NEEDS_ANSWER
        return [n for n in self.names if n in NEEDS_ANSWER]

    @staticmethod
    def _rule(fn, pattern):
        def score(prompts, texts, examples, device):
            return torch.tensor([fn(t, p.meta.get("answer"), pattern) for p, t in zip(prompts, texts)],
                                dtype=torch.float32)
        return score

    def _model(self, rm):
        @torch.no_grad()
        def score(prompts, texts, examples, device):
            b = {k: v.to(device) for k, v in self.collate(examples).items()}
            return rm.to(device)(**b).float().cpu()
        return score

    def __call__(self, prompts, texts, examples, device):
        each = torch.stack([fn(prompts, texts, examples, device) for fn in self.fns], -1)
        return (each * torch.tensor(self.weights)).sum(-1), each


def load_online_prompts(data, model, scorer, command: str) -> list:
    """The prompts of `data.train` (a recipe's data section) for an online method, checked before training: a
    reference answer wherever a rule scorer compares with one."""
    from ..records.encoder import encoder_for
    from ..records.preferences import load_prompts
    prompts, _ = load_prompts(data.train, encoder_for(model, data), data.on_error, data.columns)
    if scorer.needs_answers:
        bare = next((p for p in prompts if not p.meta.get("answer")), None)
        if bare is not None:
            raise UserError(f"{bare.meta['where']}: no reference answer ('answer' or 'solution') for the "
                            f"{scorer.needs_answers[0]} reward")
    return prompts


class Rollouts:
    """The batch source of the online methods (see the module docstring). A subclass implements
    `make(prompts, device) -> (examples, tensors by name, history row)`: the rollout's responses as prompt + response
    examples, and per response (N,) or per response token (N, T-1, at the rollout's padded length) tensors.

    A rollout keeps its responses as (prompt index, response tokens), and each micro-batch is collated afresh from
    those records: image inputs of any model family (any number of images, variable image-token counts) never have
    to be sliced by row, and a checkpoint holds token lists rather than pixels."""

    def __init__(self, prompts: list, n_prompts: int, rows_per_prompt: int, rollouts: int, epochs: int,
                 minibatch: int, seed: int, section: str):
        self.prompts, self.n_prompts, self.per_prompt = prompts, min(n_prompts, len(prompts)), rows_per_prompt
        self.rollouts, self.epochs, self.minibatch, self.seed, self.section = rollouts, epochs, minibatch, seed, section
        self.collate = None  # set by the subclass: records -> a micro-batch
        self.rng, self.responses, self.buffer, self.queue, self.history = None, [], {}, [], []

    @property
    def rows(self) -> int:
        return self.n_prompts * self.per_prompt

    def micro_batches(self) -> int:
        """Micro-batches per rollout."""
        return self.epochs * math.ceil(self.rows / self.minibatch)

    def steps(self, tcfg, world: int) -> int:
        per_rollout = self.micro_batches()
        if per_rollout % tcfg.grad_accum:
            raise UserError(f"{self.section}: a rollout has {per_rollout} micro-batches ({self.section}.epochs x "
                            f"minibatches of {self.rows} responses), not a multiple of train.grad_accum={tcfg.grad_accum}")
        return self.rollouts * per_rollout // tcfg.grad_accum

    def make(self, prompts: list, device) -> tuple[dict, dict]:
        raise NotImplementedError

    def _rollout(self, device) -> None:
        chosen = self.rng.sample(range(len(self.prompts)), self.n_prompts)
        examples, values, row = self.make([self.prompts[i] for i in chosen], device)
        self.history.append({"rollout": len(self.history) + 1, **row})
        at = [i for i in chosen for _ in range(self.per_prompt)]  # responses are prompt-major
        self.responses = [[i, ex.input_ids[len(self.prompts[i].prompt.input_ids):]] for i, ex in zip(at, examples)]
        self.buffer = {k: v.detach().cpu() for k, v in values.items() if v is not None}
        n = len(self.responses)
        self.queue = [order[s:s + self.minibatch] for _ in range(self.epochs)
                      for order in [torch.randperm(n).tolist()] for s in range(0, n, self.minibatch)]

    def batches(self, acc, tcfg, model):
        if self.rng is None:  # a fresh run (a resumed one has its sampler back from the checkpoint)
            self.rng = random.Random(self.seed + 7919 * acc.process_index)
        while True:
            if not self.queue:
                self._rollout(acc.device)
            idx = self.queue.pop(0)
            batch = self.collate([response_example(self.prompts[self.responses[i][0]], self.responses[i][1]) for i in idx])
            n = batch["input_ids"].shape[1] - 1  # right padding: the rollout's positions, less its extra padding
            at = torch.tensor(idx)
            yield self.history[-1], {**batch, **{k: v[at][:, :n] if v.dim() > 1 else v[at]
                                                 for k, v in self.buffer.items()}}

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "responses": self.responses, "buffer": self.buffer, "queue": self.queue,
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.rng = random.Random()
        self.rng.setstate(state["rng"])
        self.responses, self.buffer, self.queue, self.history = state["responses"], state["buffer"], state["queue"], state["history"]

    def window(self, k: int | None = None) -> tuple[float, float, int]:
        """Mean score over the first and the last quarter of the rollouts (one rollout's mean is noisy)."""
        k = k or max(1, len(self.history) // 4)
        first, last = (sum(h["score"] for h in hs) / len(hs) for hs in (self.history[:k], self.history[-k:]))
        return first, last, k

"""Who judges stage 06's head-to-head and benchmark: a model loaded here (M<t>, or eval.judge_model), read
from its next-token probabilities of "A" and "B"; or an outside judge behind an OpenAI-compatible endpoint
(eval.judge_endpoint), read from its reply. Both answer the same question, picks in both orders."""

from __future__ import annotations

from pathlib import Path

from selfreward.judge.endpoint import Endpoint, ReplyCache, picks_in_both_orders
from selfreward.judge.tournament import compare
from selfreward.model.models import prompt_budget


class ModelPicker:
    """A loaded model (a Backend) as the pairwise judge."""

    def __init__(self, backend, config, name: str):
        self.backend, self.config, self.name = backend, config, name

    def picks(self, rows: list[tuple[str, str, str]], template: str) -> tuple[list[str], list[str]]:
        """The picks, "A" or "B", for each (question, X, Y): with X shown first, then with Y first.
        ValueError when the model's tokenizer cannot read the letters after the template."""
        budget = prompt_budget(self.backend.context_length, self.config.model, 1)
        found = compare(self.backend, rows, template=template, budget=budget, batch_size=self.config.eval.batch_size)
        x_first = ["A" if c["p_a_first"] >= 0.5 else "B" for c in found]
        x_second = ["A" if c["p_a_second"] <= 0.5 else "B" for c in found]  # "A" is then Y
        return x_first, x_second

    def report(self) -> dict:
        return {}

    def close(self) -> None:
        self.backend.close()


class EndpointPicker:
    """An outside judge: picks are None where its reply names neither letter (counted, never guessed)."""

    def __init__(self, endpoint: Endpoint, cache: Path):
        self.endpoint, self.cache = endpoint, ReplyCache(cache)
        self.name = f"{endpoint.model} at {endpoint.base_url}"
        self.asked = self.sent = 0

    def picks(self, rows: list[tuple[str, str, str]], template: str) -> tuple[list, list]:
        """As ModelPicker.picks; EndpointError when the endpoint refuses or stays down."""
        first, second, sent = picks_in_both_orders(self.endpoint, rows, template, self.cache)
        self.asked, self.sent = self.asked + 2 * len(rows), self.sent + sent
        return first, second

    def report(self) -> dict:
        """How the endpoint was used: requests asked, sent (the others came from the cache)."""
        return {"endpoint": {"model": self.endpoint.model, "requests": self.asked, "sent": self.sent}}

    def close(self) -> None:
        pass

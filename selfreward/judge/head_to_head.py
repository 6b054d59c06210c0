"""Who judges stage 06's head-to-head and benchmark: a model loaded here (M<t>, or eval.judge_model), read
from its next-token probabilities of "A" and "B"; or an outside judge behind an OpenAI-compatible endpoint
(eval.judge_endpoint), read from its reply. Both answer the same question, picks in both orders. With
eval.head_to_head scores, the loaded model instead grades each answer of the head-to-head alone with the loop's
rubric (ScorePicker); the benchmark, compared with references, stays pairwise."""

from __future__ import annotations

from pathlib import Path

from selfreward.judge.endpoint import Endpoint, ReplyCache, picks_in_both_orders
from selfreward.judge.judges import judge_for
from selfreward.judge.tournament import compare
from selfreward.model.models import prompt_budget
from selfreward.run.metrics import head_to_head, head_to_head_by_scores


def model_picker(config, backend, path, name: str):
    """The head-to-head judge for a loaded model (`backend`, loaded from `path`): eval.head_to_head's kind."""
    if config.eval.head_to_head == "scores":
        return ScorePicker(backend, config, name, path)
    return ModelPicker(backend, config, name)


class PairPicker:
    """A judge shown both answers at once, in both orders: subclasses give picks()."""

    config = None

    def picks(self, rows: list[tuple[str, str, str]], template: str) -> tuple[list, list]:
        raise NotImplementedError

    def compare(self, rows: list[tuple[str, str, str]], template: str) -> dict:
        """X against Y for each (question, X, Y): run.metrics.head_to_head's figures."""
        samples, seed = self.config.eval.bootstrap_samples, self.config.seed
        return head_to_head(*self.picks(rows, template), samples=samples, seed=seed)

    def report(self) -> dict:
        """What eval.json records about how the head-to-head was judged."""
        return {"head_to_head_by": "pairs"}

    def close(self) -> None:
        pass


class ModelPicker(PairPicker):
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

    def close(self) -> None:
        self.backend.close()


class EndpointPicker(PairPicker):
    """An outside judge: picks are None where its reply names neither letter (counted, never guessed)."""

    def __init__(self, endpoint: Endpoint, cache: Path, config):
        self.endpoint, self.cache, self.config = endpoint, ReplyCache(cache), config
        self.name = f"{endpoint.model} at {endpoint.base_url}"
        self.asked = self.sent = 0

    def picks(self, rows: list[tuple[str, str, str]], template: str) -> tuple[list, list]:
        """As ModelPicker.picks; EndpointError when the endpoint refuses or stays down."""
        first, second, sent = picks_in_both_orders(self.endpoint, rows, template, self.cache)
        self.asked, self.sent = self.asked + 2 * len(rows), self.sent + sent
        return first, second

    def report(self) -> dict:
        """How the endpoint was used: requests asked, sent (the others came from the cache)."""
        requests = {"model": self.endpoint.model, "requests": self.asked, "sent": self.sent}
        return {**super().report(), "endpoint": requests}


class ScorePicker(ModelPicker):
    """A loaded model grading each answer alone with the loop's rubric, as stage 03 grades (judge.mode logits or
    sample): X wins a prompt when its score is above Y's by more than eval.score_margin."""

    def __init__(self, backend, config, name: str, path):
        super().__init__(backend, config, name)
        self.judge = judge_for(config, path, name, model=backend)

    def compare(self, rows: list[tuple[str, str, str]], template: str) -> dict:
        answers = [
            {"response_id": f"{k}:{side}", "prompt": question, "response": answer}
            for k, (question, *pair) in enumerate(rows)
            for side, answer in zip("xy", pair, strict=True)
        ]
        score = {r["response_id"]: r["score"] for r in self.judge.score_rows(answers, seed=self.config.seed)}
        return head_to_head_by_scores(
            [score[f"{k}:x"] for k in range(len(rows))],
            [score[f"{k}:y"] for k in range(len(rows))],
            margin=self.config.eval.score_margin,
            samples=self.config.eval.bootstrap_samples,
            seed=self.config.seed,
        )

    def report(self) -> dict:
        """Judged by scores, and how the scores were read (judge.mode)."""
        return {"head_to_head_by": "scores", "head_to_head_reading": self.judge.mode}

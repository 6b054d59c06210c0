"""Which judge runs and what it is asked: one Judge per judge.mode, chosen once from the config (judge_for),
that scores stage 03's rows, measures itself against human scores on held-out rows (quality) and on
answers judged twice (noise), and says what the stages need to know about it.

Stages 03 and 06 and the dry run ask the Judge and never which mode runs, so stage 06 measures the judge
the loop uses; adding a mode is adding a class here (and its name to the config's choices).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from selfreward.judge.rubric import (
    fit_judge_prompt,
    logit_judgments,
    mean_score,
    pairwise_template,
    rubric_of,
    sample_judgments,
    score_token_ids,
)
from selfreward.judge.tournament import compare, pairwise_scores, picked_same_letter, position_bias, preference
from selfreward.model.chat import packaged_template
from selfreward.model.models import prompt_budget
from selfreward.run.metrics import bootstrap_intervals, draw_key, kendall_tau_b, pairwise_agreement, spearman

log = logging.getLogger("selfreward")
SaveChunk = Callable[[int, list[dict]], None]
# Answers judged again for the noise figure draw another sampling seed than the first judging.
NOISE_SEED_OFFSET = 7919


class Judge(ABC):
    """A judge of judge.mode's kind and the model it judges with, loaded when first asked (a stage that
    finds its work complete loads nothing) unless it was given loaded."""

    mode: ClassVar[str]  # the judge.mode it serves
    fixed: ClassVar[bool] = False  # the same model judges in every iteration (stage 06 measures it once)

    def __init__(self, config, path: str | Path | None, name: str, model=None):
        self.config, self.cfg = config, config.judge
        self.path = path  # what it loads (a stage fingerprints it)
        self.name = name  # what manifests and eval.json call it: "M<t-1>" or "reward model"
        self._model, self._lent = model, model is not None

    @property
    def model(self):
        if self._model is None:
            self._model = self._load()
        return self._model

    def _load(self):
        from selfreward.model.backends import load_backend  # torch

        return load_backend(self.path, self.config.model, self.config.generation)

    def close(self) -> None:
        """Let the model go, so that the next one can load; a model it was lent is its lender's to close."""
        if self._model is not None and not self._lent:
            self._model.close()

    @property
    def backend(self) -> str:
        """The backend that ran it (hf, vllm, reward_model), as stage 03's manifest records it."""
        return self.model.name

    @property
    def budget(self) -> int:
        """Prompt tokens the judge may read: what it writes or reads after its prompt must fit its context too."""
        return prompt_budget(self.model.context_length, self.config.model, self._reserve())

    def _reserve(self) -> int:
        return 1  # the one token it reads after its prompt

    @property
    def tokens_written(self) -> int:
        """Tokens it writes per judgment (the dry run's memory estimate)."""
        return 1

    @property
    def judgments_per_answer(self) -> int:
        return 1

    @property
    def label(self) -> str:
        """What it is, for people: "judge (logits)"."""
        return f"judge ({self.mode})"

    def score_rows(
        self, responses: list[dict], *, seed: int, skip: Collection[int] = (), save: SaveChunk | None = None
    ) -> list[dict]:
        """Stage 03's rows: every response row with "score", "judgments" and "judge_input_truncated" (and
        what the mode adds). Each chunk of rows goes to save(k, rows) as soon as it is done; the chunks in
        `skip` are not judged again (their rows are not returned)."""
        return self._rows(responses, self.cfg, seed=seed, skip=skip, save=save)

    @abstractmethod
    def _rows(self, responses, cfg, *, seed, skip=(), save=None) -> list[dict]:
        """score_rows with other judge settings `cfg` (noise judges answers again alone)."""

    @abstractmethod
    def measure(self, eft: list[dict], *, samples: int, seed: int) -> dict:
        """The judge against the human scores of held-out EFT rows, judged as stage 03 judges: judge_quality's
        figures with their 95% bootstrap intervals (`samples` draws)."""

    @abstractmethod
    def noise(self, responses: list[dict], rows: list[dict], *, seed: int) -> dict:
        """The largest change of a score in `rows` (scored from `responses`) when judge.noise_samples answers
        drawn by hash are judged again, alone: differences of scores smaller than this say nothing about
        the answers."""

    def _alone(self):
        """The judge settings for judging answers again alone: a batch of one."""
        return replace(self.cfg, batch_size=1)

    def _again(self, again_of: list[dict], rows: list[dict], seed: int) -> dict:
        """noise() by scoring the rows of `again_of` again, alone."""
        score = {r["response_id"]: r["score"] for r in rows}
        again = self._rows(again_of, self._alone(), seed=seed + NOISE_SEED_OFFSET)
        changes = [
            abs(r["score"] - score[r["response_id"]])
            for r in again
            if r["score"] is not None and score[r["response_id"]] is not None
        ]
        return _largest_change(changes)

    def report(self, rows: list[dict]) -> dict:
        """What stage 03's manifest adds about its rows for this mode (logged too)."""
        return {}

    def score_canaries(
        self, canaries: list[dict], rows: list[dict], *, seed: int, skip: Collection[int] = (), save=None
    ) -> list[dict]:
        """Planted answers (selfreward.loop.canaries) judged as the real answers `rows` were: each canary row
        with "score" (and what the mode adds); chunks go to save(k, rows) and those in `skip` are not judged
        again, as in score_rows. Each canary is judged alone, so no real answer's score changes."""
        return self._rows(canaries, self.cfg, seed=seed, skip=skip, save=save)

    def outscores(self, canary: dict, real: list[dict]) -> bool | None:
        """Whether a judged canary scored strictly above every real answer of its prompt; None when the canary
        or all the real answers have no score."""
        scores = [r["score"] for r in real if r["score"] is not None]
        if canary["score"] is None or not scores:
            return None
        return canary["score"] > max(scores)


class RubricJudge(Judge):
    """The policy grading each answer alone with the 0-5 rubric (judge.template)."""

    def judgments(
        self, judge_prompts: list[str], *, seed: int, skip: Collection[int] = (), on_batch=None
    ) -> list[list[dict] | None]:
        """Every judgment of every rendered judge prompt (see rubric.fit_judge_prompt), a list per prompt;
        `skip` and `on_batch` work as in `Backend.generate`."""
        return self._judge(judge_prompts, self.cfg, seed=seed, skip=skip, on_batch=on_batch)

    @abstractmethod
    def _judge(self, judge_prompts, cfg, *, seed, skip=(), on_batch=None) -> list[list[dict] | None]:
        """judgments with other judge settings `cfg`."""

    def _fitted(self, rows: list[dict]) -> list[tuple[str, bool]]:
        """Each row's judge prompt within the budget, and whether it was cut."""
        rubric, budget = rubric_of(self.cfg), self.budget
        return [fit_judge_prompt(self.model.chat, r["prompt"], r["response"], budget, rubric) for r in rows]

    def _rows(self, responses, cfg, *, seed, skip=(), save=None) -> list[dict]:
        fitted = self._fitted(responses)
        rows: list[dict] = []

        def judged(k: int, idx: list[int], judgments: list[list[dict]]) -> None:
            new = [
                {
                    **responses[i],
                    "score": mean_score([j["score"] for j in js]),
                    "judgments": js,
                    "judge_input_truncated": fitted[i][1],
                }
                for i, js in zip(idx, judgments, strict=True)
            ]
            rows.extend(new)
            if save:
                save(k, new)

        self._judge([text for text, _ in fitted], cfg, seed=seed, skip=skip, on_batch=judged)
        return rows

    def measure(self, eft: list[dict], *, samples: int, seed: int) -> dict:
        judged = self.judgments([text for text, _ in self._fitted(eft)], seed=seed)
        return judge_quality(eft, [mean_score([j["score"] for j in js]) for js in judged], samples=samples, seed=seed)

    def noise(self, responses: list[dict], rows: list[dict], *, seed: int) -> dict:
        # answers drawn by their judge prompt, judged again with another sampling seed
        prompts = [text for text, _ in self._fitted(rows)]
        drawn = sorted(range(len(prompts)), key=lambda i: draw_key(prompts[i], seed))[: self.cfg.noise_samples]
        drawn = [i for i in drawn if rows[i]["score"] is not None]
        again = self._judge([prompts[i] for i in drawn], self._alone(), seed=seed + NOISE_SEED_OFFSET)
        changes = [
            abs(s - rows[i]["score"])
            for i, js in zip(drawn, again, strict=True)
            if (s := mean_score([j["score"] for j in js])) is not None
        ]
        return _largest_change(changes)


class SampleJudge(RubricJudge):
    """judge.num_samples sampled judgments per answer, the mean of the scores that parse (the paper's way)."""

    mode = "sample"

    def _judge(self, judge_prompts, cfg, *, seed, skip=(), on_batch=None):
        return sample_judgments(self.model, judge_prompts, cfg, seed=seed, skip=skip, on_batch=on_batch)

    def _reserve(self) -> int:
        return self.cfg.max_new_tokens + 2

    def _alone(self):
        return replace(self.cfg, batch_size=self.cfg.num_samples)  # one answer's samples

    @property
    def tokens_written(self) -> int:
        return self.cfg.max_new_tokens

    @property
    def judgments_per_answer(self) -> int:
        return self.cfg.num_samples


class LogitJudge(RubricJudge):
    """The expected digit after "Score:" under the next-token distribution, where judge.format puts it."""

    mode = "logits"

    def _judge(self, judge_prompts, cfg, *, seed, skip=(), on_batch=None):
        return logit_judgments(self.model, judge_prompts, cfg, seed=seed, skip=skip, on_batch=on_batch)

    def _reserve(self) -> int:
        # The digit after the prompt and "Score: " (score_last: after its justification and "\nScore: ")
        # needs a position of its own: vLLM fails a whole call when one prompt is as long as its context.
        prefix, _ = score_token_ids(self.model.chat, rubric_of(self.cfg))
        last = self.cfg.format == "score_last"
        return (
            (self.cfg.max_new_tokens if last else 0) + len(self.model.chat.encode(("\n" if last else "") + prefix)) + 1
        )


class PairwiseJudge(Judge):
    """The policy comparing a prompt's answers two at a time (judge.ranking), each comparison in both orders;
    an answer's score is 5 x its win share."""

    mode = "pairwise"

    def _rows(self, responses, cfg, *, seed, skip=(), save=None) -> list[dict]:
        return pairwise_scores(
            self.model,
            responses,
            cfg,
            template=pairwise_template(cfg),
            budget=self.budget,
            prompts_per_chunk=max(1, cfg.batch_size // 2),
            skip=skip,
            on_chunk=save,
        )

    def measure(self, eft: list[dict], *, samples: int, seed: int) -> dict:
        """measure_pairwise_judge's figures: pairwise accuracy and position bias."""
        return measure_pairwise_judge(
            self.model,
            eft,
            template=pairwise_template(self.cfg),
            batch_size=self.cfg.batch_size,
            budget=self.budget,
            samples=samples,
            seed=seed,
        )

    def noise(self, responses: list[dict], rows: list[dict], *, seed: int) -> dict:
        # whole prompts are judged again: an answer's score is its place among its prompt's answers
        drawn = set(
            sorted({r["prompt_id"] for r in responses}, key=lambda p: draw_key(p, seed))[: self.cfg.noise_samples]
        )
        return self._again([r for r in responses if r["prompt_id"] in drawn], rows, seed)

    def _alone(self):
        return replace(self.cfg, batch_size=2)  # one comparison, in both orders

    def report(self, rows: list[dict]) -> dict:
        comparisons = sum(len(r["comparisons"]) for r in rows) / 2  # each one is in both answers' rows
        prompts = len({r["prompt_id"] for r in rows})
        bias = position_bias(rows)
        log.info("%d comparisons (%.2f per prompt), position bias %s", comparisons, comparisons / prompts, bias)
        return {
            "comparisons": int(comparisons),
            "comparisons_per_prompt": round(comparisons / prompts, 4),
            "position_bias": bias,
        }

    def score_canaries(self, canaries, rows, *, seed, skip=(), save=None) -> list[dict]:
        """Each canary compared with every real answer of its prompt, in both orders, apart from the
        tournament (which it would change); its score is 5 x its win share of those comparisons."""
        real: dict[str, list[dict]] = {}
        for r in rows:
            real.setdefault(r["prompt_id"], []).append(r)
        per_chunk, template, out = max(1, self.cfg.batch_size // 2), pairwise_template(self.cfg), []
        for k, start in enumerate(range(0, len(canaries), per_chunk)):
            if k in skip:
                continue
            chunk = canaries[start : start + per_chunk]
            against = [(c, r) for c in chunk for r in real[c["prompt_id"]]]
            matches = [(c["prompt"], c["response"], r["response"]) for c, r in against]
            results = compare(
                self.model, matches, template=template, budget=self.budget, batch_size=self.cfg.batch_size
            )
            played: dict[str, list[dict]] = {c["response_id"]: [] for c in chunk}
            for (c, r), result in zip(against, results, strict=True):
                played[c["response_id"]].append({"b": r["sample_index"], **result})
            new = [_canary_comparisons(c, played[c["response_id"]]) for c in chunk]
            out.extend(new)
            if save:
                save(k, new)
        return out

    def outscores(self, canary: dict, real: list[dict]) -> bool | None:
        # it won every comparison with a real answer of its prompt, over both orders
        played = canary["comparisons"]
        return all(preference(c["p_a_first"], c["p_a_second"]) > 0.5 for c in played) if played else None


class RewardModelJudge(Judge):
    """judge.reward_model, a sequence classifier, reading each answer in its own chat template; the score is
    its reward. It does not change between iterations: the fixed-judge baseline."""

    mode = "reward_model"
    fixed = True

    def __init__(self, config, path, name, model=None):
        super().__init__(config, config.judge.reward_model, "reward model", model)  # it judges in the policy's place

    def _load(self):
        from selfreward.judge.reward_model import load_reward_model  # torch

        return load_reward_model(self.cfg.reward_model, self.config.model)

    def _rows(self, responses, cfg, *, seed, skip=(), save=None) -> list[dict]:
        budget = self.budget
        fitted = [self.model.render(r["prompt"], r["response"], budget) for r in responses]
        rows: list[dict] = []

        def rewarded(k: int, idx: list[int], rewards: list[float | None]) -> None:
            scores = [None if reward is None else round(reward, 4) for reward in rewards]  # None: it was not finite
            new = [
                {**responses[i], "score": score, "judgments": [], "judge_input_truncated": fitted[i][1]}
                for i, score in zip(idx, scores, strict=True)
            ]
            rows.extend(new)
            if save:
                save(k, new)

        self.model.score([text for text, _ in fitted], cfg.batch_size, skip=skip, on_batch=rewarded)
        return rows

    def measure(self, eft: list[dict], *, samples: int, seed: int) -> dict:
        budget = self.budget
        rewards = self.model.score(
            [self.model.render(r["prompt"], r["response"], budget)[0] for r in eft], self.cfg.batch_size
        )
        # its rewards are on no 0-5 scale: only the figures that compare ranks mean anything
        return {**judge_quality(eft, rewards, samples=samples, seed=seed), "exact_match": None}

    def noise(self, responses: list[dict], rows: list[dict], *, seed: int) -> dict:
        drawn = sorted(responses, key=lambda r: draw_key(r["response_id"], seed))[: self.cfg.noise_samples]
        return self._again(drawn, rows, seed)

    def report(self, rows: list[dict]) -> dict:
        return {"non_finite_rewards": self.model.non_finite}  # NaN or inf (see RewardModel.score), given as no score


JUDGES = {kind.mode: kind for kind in (SampleJudge, LogitJudge, PairwiseJudge, RewardModelJudge)}


def judge_for(config, path: str | Path | None = None, name: str = "the judge", *, model=None) -> Judge:
    """The judge judge.mode names: the one place that asks which mode runs.

    `path` and `name`: the policy that judges when the policy judges (stage 03: M<t-1>'s folder and
    "M<t-1>"); the reward model judges in its place, under its own name. `model`: the judge's model already
    loaded (a generation backend, or a RewardModel), which its lender closes; else the judge loads its
    model when first asked."""
    return JUDGES[config.judge.mode](config, path, name, model)


def _largest_change(changes: list[float]) -> dict:
    return {"answers": len(changes), "max_change": round(max(changes), 4) if changes else None}


def judge_quality(rows: list[dict], scores: list[float | None], *, samples: int = 1000, seed: int = 0) -> dict:
    """The judge against human scores on held-out EFT rows (the paper's Table 4), each figure with a
    95% bootstrap interval that resamples questions (`samples` draws; 0 for none).

    Pairwise accuracy is over pairs of answers to the same question with different human scores (a
    judge tie counts half); exact match rounds the judge's score to the nearest point.
    """
    keep = [i for i, s in enumerate(scores) if s is not None]
    questions = [rows[i]["prompt"] for i in keep]
    human = [float(rows[i]["score"]) for i in keep]
    judged = [float(scores[i]) for i in keep]

    def figures(idx: list[int], group_of: list[str]) -> dict[str, float | None]:
        h, j = [human[i] for i in idx], [judged[i] for i in idx]
        return {
            "pairwise_accuracy": pairwise_agreement(group_of, h, j)[0],
            "exact_match": sum(round(b) == a for a, b in zip(h, j, strict=True)) / len(idx) if idx else None,
            "spearman": spearman(h, j),
            "kendall_tau": kendall_tau_b(h, j),
        }

    point = figures(list(range(len(keep))), questions)
    pairs = pairwise_agreement(questions, human, judged)[1]
    result = {"rows": len(rows), "scored": len(keep), "pairs": pairs}
    result.update({k: None if v is None else round(v, 4) for k, v in point.items()})
    found = bootstrap_intervals(questions, figures, samples=samples, seed=seed) if samples else {}
    result["intervals"] = {k: [round(found[k][0], 4), round(found[k][1], 4)] if found.get(k) else None for k in point}
    return result


def measure_pairwise_judge(
    backend, rows: list[dict], *, template: str | None, batch_size: int, budget: int, samples: int, seed: int
) -> dict:
    """The judge comparing two answers instead of grading one: for every two held-out answers to the same
    question with different human scores, P("A") with each answer first, averaged over both orders
    (which cancels a preference for a position). Pairwise accuracy counts a pair right when the judge's
    averaged preference points to the answer humans scored higher (exactly 0.5 counts half); position
    bias is the share of pairs where the letter picked did not change with the order."""
    template = template if template is not None else packaged_template("pairwise_judge.txt")
    pairs = [
        (i, j)
        for i in range(len(rows))
        for j in range(i + 1, len(rows))
        if rows[i]["prompt"] == rows[j]["prompt"] and rows[i]["score"] != rows[j]["score"]
    ]
    matches = [(rows[i]["prompt"], rows[i]["response"], rows[j]["response"]) for i, j in pairs]
    results = compare(backend, matches, template=template, budget=budget, batch_size=batch_size)
    right, same_letter = [], []
    for (i, j), r in zip(pairs, results, strict=True):
        p_i = preference(r["p_a_first"], r["p_a_second"])  # i is answer a
        humans_pick_i = rows[i]["score"] > rows[j]["score"]
        right.append(0.5 if p_i == 0.5 else float((p_i > 0.5) == humans_pick_i))
        same_letter.append(float(picked_same_letter(r)))
    questions = [rows[i]["prompt"] for i, _ in pairs]

    def figures(idx: list[int], group_of: list[str]) -> dict[str, float | None]:
        return {
            "pairwise_accuracy": sum(right[i] for i in idx) / len(idx) if idx else None,
            "position_bias": sum(same_letter[i] for i in idx) / len(idx) if idx else None,
        }

    point = figures(list(range(len(pairs))), questions)
    result = {"rows": len(rows), "pairs": len(pairs), "comparisons": 2 * len(pairs)}
    result.update({k: None if v is None else round(v, 4) for k, v in point.items()})
    found = bootstrap_intervals(questions, figures, samples=samples, seed=seed) if samples else {}
    result["intervals"] = {k: [round(found[k][0], 4), round(found[k][1], 4)] if found.get(k) else None for k in point}
    return result


def _canary_comparisons(canary: dict, played: list[dict]) -> dict:
    """A canary's row after its comparisons with the real answers (the canary is always a)."""
    wins = [preference(c["p_a_first"], c["p_a_second"]) for c in played]
    share = sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in wins) / len(wins) if wins else None
    return {
        **canary,
        "score": None if share is None else round(5 * share, 4),
        "win_share": share,
        "comparisons": played,
        "judgments": [],
        "judge_input_truncated": any(c["cut"] for c in played),
    }

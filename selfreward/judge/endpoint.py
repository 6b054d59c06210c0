"""An outside judge behind an OpenAI-compatible chat-completions endpoint (`eval.judge_endpoint`).

Any server that speaks POST {base_url}/chat/completions: `vllm serve` of a strong open model on the same
box, a hosted model, or OpenAI itself. The judge is asked the pairwise question (templates/pairwise_judge.txt)
and its reply is read for one letter, A or B; a reply that names neither or both is counted as unreadable,
never guessed.

Requests run concurrently (at most `concurrency` at once), each with a timeout, and are retried with
exponential backoff on 429, 5xx and lost connections. Every reply is appended to a cache file keyed by
(endpoint, model, request) as soon as it arrives, so a rerun after a kill, or after the server died and
came back, pays for nothing twice. Standard library only: no client package to install.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from selfreward.judge.rubric import fill_template
from selfreward.run import failpoints
from selfreward.run.config import ConfigError

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint refused a request, or kept failing after every retry."""


@dataclass
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str  # the model name the server knows
    api_key_env: str | None = None  # the environment variable holding the key; unset or empty: no key sent
    concurrency: int = 8
    timeout_seconds: float = 120.0
    retries: int = 5
    backoff_seconds: float = 1.0  # doubled after every failed try
    max_tokens: int = 16  # a verdict is one letter; room for "Answer: A"
    body: dict | None = None  # more request fields, e.g. vLLM's {"structured_outputs": {"choice": ["A", "B"]}}

    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env or "", "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers


class ReplyCache:
    """Replies by request, in a JSONL file appended to as each arrives (a torn last line is ignored)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.replies: dict[str, str] = {}
        self._lock = threading.Lock()
        if path and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill cut short
                self.replies[row["key"]] = row["reply"]

    def add(self, key: str, reply: str) -> None:
        with self._lock:
            self.replies[key] = reply
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"key": key, "reply": reply}) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())


def endpoint_from_config(cfg) -> Endpoint | None:
    """The outside judge that config.eval names, or None."""
    if not cfg.judge_endpoint:
        return None
    return Endpoint(
        cfg.judge_endpoint,
        cfg.judge_endpoint_model,
        api_key_env=cfg.judge_endpoint_key_env,
        concurrency=cfg.judge_endpoint_concurrency,
        timeout_seconds=cfg.judge_endpoint_timeout_seconds,
        retries=cfg.judge_endpoint_retries,
        body=json.loads(cfg.judge_endpoint_body) if cfg.judge_endpoint_body else None,
    )


def check_endpoint_settings(cfg) -> None:
    """ConfigError for eval settings of the outside judge that cannot work, found before any stage runs."""
    if not cfg.judge_endpoint:
        return
    if not cfg.judge_endpoint.startswith(("http://", "https://")):
        raise ConfigError(
            f"config key 'eval.judge_endpoint': a base URL such as http://127.0.0.1:8000/v1, got {cfg.judge_endpoint!r}"
        )
    if not cfg.judge_endpoint_model:
        raise ConfigError(
            "config key 'eval.judge_endpoint_model': eval.judge_endpoint needs the name of the model the server serves"
        )
    if cfg.judge_model:
        raise ConfigError(
            "config keys 'eval.judge_endpoint' and 'eval.judge_model' are both set: one judge "
            "judges the head-to-head; set the other to null"
        )
    for key in ("judge_endpoint_concurrency", "judge_endpoint_timeout_seconds"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"config key 'eval.{key}' must be more than 0, got {getattr(cfg, key)}")
    if cfg.judge_endpoint_retries < 0:
        raise ConfigError(
            f"config key 'eval.judge_endpoint_retries' must be 0 or more, got {cfg.judge_endpoint_retries}"
        )


def request_key(endpoint: Endpoint, body: dict) -> str:
    payload = json.dumps([endpoint.base_url.rstrip("/"), body], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def complete(endpoint: Endpoint, prompts: list[str], cache: ReplyCache) -> tuple[list[str], int]:
    """The endpoint's reply to each prompt (one user turn, greedy), and how many requests were sent; cached
    replies are not asked again. EndpointError when a request cannot be answered: the requests not yet
    started are then dropped, so a server that is down stops the stage after one request's retries, not
    after every request's."""
    bodies = [_body(endpoint, p) for p in prompts]
    keys = [request_key(endpoint, b) for b in bodies]
    missing = {k: b for k, b in zip(keys, bodies, strict=True) if k not in cache.replies}

    def ask(key: str, body: dict) -> None:
        cache.add(key, _post(endpoint, body))
        failpoints.reach("after_endpoint_reply")

    with ThreadPoolExecutor(max_workers=max(1, endpoint.concurrency)) as pool:
        # map re-raises the first failure and cancels the requests not yet started
        for _ in pool.map(ask, missing.keys(), missing.values()):
            pass
    return [cache.replies[k] for k in keys], len(missing)


def read_letter(reply: str) -> str | None:
    """ "A" or "B" when the reply names exactly one of them as a standalone letter, else None."""
    letters = set(re.findall(r"(?<![A-Za-z])([AB])(?![A-Za-z])", reply))
    return letters.pop() if len(letters) == 1 else None


def picks_in_both_orders(
    endpoint: Endpoint, rows: list[tuple[str, str, str]], template: str, cache: ReplyCache
) -> tuple[list[str | None], list[str | None], int]:
    """The judge's picks, "A", "B" or None (unreadable), for each (question, X, Y): with X shown first, then
    with Y first; and how many requests were sent (the rest came from the cache)."""
    prompts = []
    for question, x, y in rows:
        prompts.append(fill_template(template, question=question, answer_a=x, answer_b=y))
        prompts.append(fill_template(template, question=question, answer_a=y, answer_b=x))
    replies, sent = complete(endpoint, prompts, cache)
    letters = [read_letter(r) for r in replies]
    return letters[0::2], letters[1::2], sent


def _body(endpoint: Endpoint, prompt: str) -> dict:
    return {
        "model": endpoint.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": endpoint.max_tokens,
        "temperature": 0,
        **(endpoint.body or {}),
    }


def _post(endpoint: Endpoint, body: dict) -> str:
    data = json.dumps(body).encode()
    wait, last = endpoint.backoff_seconds, ""
    for attempt in range(endpoint.retries + 1):
        request = urllib.request.Request(endpoint.url(), data=data, headers=endpoint.headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=endpoint.timeout_seconds) as response:
                return _reply_text(json.loads(response.read().decode("utf-8")), endpoint)
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")[:300]
            if error.code not in RETRYABLE:
                raise EndpointError(f"{endpoint.url()} refused the request: HTTP {error.code}: {detail}") from None
            last = f"HTTP {error.code}: {detail}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as error:
            last = str(getattr(error, "reason", error))
        if attempt < endpoint.retries:
            time.sleep(wait)
            wait *= 2
    raise EndpointError(f"{endpoint.url()} did not answer after {endpoint.retries + 1} tries: {last}")


def _reply_text(answer: dict, endpoint: Endpoint) -> str:
    try:
        return answer["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"{endpoint.url()} answered without choices[0].message.content: {answer!r:.300}") from None

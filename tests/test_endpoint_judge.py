"""The outside judge behind an OpenAI-compatible endpoint (selfreward/judge/endpoint.py): against vLLM's own
OpenAI server serving the tiny model on 127.0.0.1, and the retry rules against urlopen's failures."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from selfreward.judge import endpoint as ep
from selfreward.judge.rubric import PAIRWISE
from selfreward.model.chat import packaged_template

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.mark.parametrize(
    ("reply", "letter"),
    [("A", "A"), (" B.\n", "B"), ("Answer: A", "A"), ("[[B]]", "B"), ("A or B", None), ("", None), ("Bob", None)],
)
def test_a_verdict_is_one_letter_or_unreadable(reply, letter):
    assert ep.read_letter(reply) == letter


class _Reply(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _answer(text: str) -> _Reply:
    return _Reply(json.dumps({"choices": [{"message": {"content": text}}]}).encode())


def _http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://x/v1/chat/completions", code, "error", {}, io.BytesIO(b'{"error": "no"}'))


def test_busy_and_failing_servers_are_retried_and_a_refusal_is_not(monkeypatch, tmp_path):
    failures = [_http_error(429), _http_error(503), urllib.error.URLError("connection refused")]
    sent = []

    def urlopen(request, timeout):
        sent.append(json.loads(request.data))
        if failures:
            raise failures.pop(0)
        return _answer("A")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("JUDGE_KEY", "secret")
    endpoint = ep.Endpoint("http://x/v1", "judge", api_key_env="JUDGE_KEY", retries=3, backoff_seconds=0.001)
    assert endpoint.headers()["Authorization"] == "Bearer secret"
    replies, asked = ep.complete(endpoint, ["which?"], ep.ReplyCache(tmp_path / "cache.jsonl"))
    assert replies == ["A"] and asked == 1 and len(sent) == 4

    failures[:] = [_http_error(401)]
    with pytest.raises(ep.EndpointError, match="refused the request: HTTP 401"):
        ep.complete(endpoint, ["another?"], ep.ReplyCache(None))
    failures[:] = [_http_error(503)] * 5
    with pytest.raises(ep.EndpointError, match="did not answer after 4 tries: HTTP 503"):
        ep.complete(endpoint, ["a third?"], ep.ReplyCache(None))


def test_a_server_that_is_down_stops_the_requests_not_yet_started(monkeypatch):
    """Were every request retried on its own, 805 AlpacaEval prompts to a dead server would take an hour of
    backoff before the stage said so: the first request that gives up stops the others."""
    tries = []

    def urlopen(request, timeout):
        tries.append(1)
        raise urllib.error.URLError("connection refused")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    endpoint = ep.Endpoint("http://x/v1", "judge", concurrency=2, retries=1, backoff_seconds=0.01)
    with pytest.raises(ep.EndpointError, match="did not answer after 2 tries"):
        ep.complete(endpoint, [f"question {i}?" for i in range(40)], ep.ReplyCache(None))
    assert len(tries) < 20  # the 2 in flight finish their tries; the other requests never start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: str, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        "judge",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--gpu-memory-utilization",
        "0.3",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--dtype",
        "float32",
    ]
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", VLLM_WORKER_MULTIPROC_METHOD="spawn")
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 600
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the vLLM server exited: {server.stderr.read().decode()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).close()
            return server
        except OSError:
            time.sleep(1)
    os.killpg(server.pid, signal.SIGKILL)
    raise RuntimeError("the vLLM server did not start within 600 s")


@pytest.fixture(scope="module")
def judge_server(tiny_model):
    """vLLM's OpenAI server serving the tiny model on 127.0.0.1, for this module's tests."""
    _, _, path = tiny_model
    port = _free_port()
    server = _start_server(path, port)
    yield f"http://127.0.0.1:{port}/v1", server
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


# vLLM's structured outputs hold the random model's replies to the two letters.
CHOICE = {"structured_outputs": {"choice": ["A", "B"]}}


def test_vllms_openai_server_judges_pairs_concurrently_and_a_rerun_asks_nothing_twice(judge_server, tmp_path):
    """Twelve comparisons (24 requests, 8 at a time) against vLLM's OpenAI server; every reply is cached as it
    comes, so the same comparisons come back from the cache with no request; a server that is not there
    fails with one clear error after its retries."""
    url, _ = judge_server
    endpoint = ep.Endpoint(url, "judge", concurrency=8, body=CHOICE, retries=1, backoff_seconds=0.01)
    rows = [(f"Name a colour ({i}).", f"Red {i}.", f"Blue {i}.") for i in range(12)]
    template = packaged_template(PAIRWISE["default"])
    cache = tmp_path / "cache.jsonl"
    first, second, sent = ep.picks_in_both_orders(endpoint, rows, template, ep.ReplyCache(cache))
    assert sent == 24 and len(cache.read_text().splitlines()) == 24
    assert set(first) | set(second) <= {"A", "B"}

    again = ep.picks_in_both_orders(endpoint, rows, template, ep.ReplyCache(cache))
    assert again == (first, second, 0)  # no request sent: all 24 from the cache
    nobody = ep.Endpoint("http://127.0.0.1:9/v1", "judge", body=CHOICE, retries=1, backoff_seconds=0.01)
    with pytest.raises(ep.EndpointError, match="did not answer after 2 tries"):
        ep.picks_in_both_orders(nobody, [("New?", "x", "y")], template, ep.ReplyCache(cache))


def test_a_run_judged_from_outside_gets_benchmark_figures_for_m1_and_m2_and_a_kill_mid_judging_loses_nothing(
    judge_server, tiny_run, run_stage, tmp_path, monkeypatch
):
    """Stage 06 with eval.benchmark and the outside judge: killed right after its first reply, the rerun asks
    only what was not answered; from an empty cache the figures come out the same; M1 and M2 in the report."""
    import shutil

    from selfreward.loop.benchmark import from_alpaca_eval
    from selfreward.run.layout import RunLayout

    url, _ = judge_server
    run = tmp_path / "run"  # a copy: other tests read the shared run's own evaluation
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    layout = RunLayout(run)
    rows = from_alpaca_eval(json.loads((FIXTURES / "alpaca_eval_rows.json").read_text()), "alpaca")
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outside = [
        "--no-oxen",
        "--eval.benchmark",
        str(bench),
        "--eval.judge_endpoint",
        url,
        "--eval.judge_endpoint_model",
        "judge",
        "--eval.judge_endpoint_body",
        json.dumps(CHOICE),
    ]

    def evaluate(t: int) -> dict:
        run_stage("06_eval", "--run-dir", str(run), "--iteration", str(t), *outside)
        return json.loads(layout.eval_result(t).read_text())

    monkeypatch.setenv("SELFREWARD_CRASH_AT", "06_eval:1:after_endpoint_reply")
    killed = run_stage("06_eval", "--run-dir", str(run), "--iteration", "1", *outside, check=False)
    assert killed.returncode == -9 and layout.endpoint_cache.is_file()
    monkeypatch.delenv("SELFREWARD_CRASH_AT")
    resumed = evaluate(1)
    asked = resumed["endpoint"]["requests"]
    assert asked == 2 * (8 + 3) and 1 <= asked - resumed["endpoint"]["sent"] < asked  # 8 held-out, 3 benchmark
    assert resumed["judge_model"] == f"judge at {url}"

    layout.endpoint_cache.rename(tmp_path / "first-cache.jsonl")
    fresh = evaluate(1)
    assert fresh["endpoint"]["sent"] == asked
    assert fresh["benchmark"] == resumed["benchmark"] and fresh["head_to_head"] == resumed["head_to_head"]
    assert evaluate(2)["benchmark"]["prompts"] == 3
    for t in (1, 2):
        figures = json.loads(layout.eval_result(t).read_text())["benchmark"]
        assert set(figures["intervals"]) == {"win_rate", "lc_win_rate"} and figures["lc_win_rate"] is not None
        assert layout.alpaca_eval_outputs(t).is_file() and layout.mt_bench_answers(t).is_file()
    report = layout.report.read_text()
    assert "## Against a fixed benchmark" in report and "| 1 | 3 |" in report and "| 2 | 3 |" in report
    assert (layout.report_dir / "benchmark.png").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eval.judge_endpoint": "127.0.0.1:8000"}, "a base URL such as http://"),
        ({"eval.judge_endpoint": "http://127.0.0.1:8000/v1"}, "needs the name of the model"),
        (
            {"eval.judge_endpoint": "http://h/v1", "eval.judge_endpoint_model": "m", "eval.judge_model": "x"},
            "are both set",
        ),
        ({"eval.judge_endpoint_body": "{structured: 1}"}, "'eval.judge_endpoint_body' is not JSON"),
        ({"eval.judge_endpoint_body": "[1]"}, "must be a JSON object"),
        (
            {
                "eval.judge_endpoint": "http://h/v1",
                "eval.judge_endpoint_model": "m",
                "eval.judge_endpoint_concurrency": 0,
            },
            "'eval.judge_endpoint_concurrency' must be more than 0",
        ),
    ],
)
def test_outside_judge_settings_that_cannot_work_are_refused_with_the_key_named(overrides, message):
    from selfreward.run.config import Config, ConfigError, apply_overrides

    with pytest.raises(ConfigError, match=message):
        ep.check_endpoint_settings(apply_overrides(Config(), overrides, "test").eval)


def test_the_config_builds_the_endpoint_and_a_dry_run_never_calls_it(monkeypatch):
    from selfreward import dryrun
    from selfreward.run.config import Config, apply_overrides

    body = '{"structured_outputs": {"choice": ["A", "B"]}}'
    settings = {
        "eval.judge_endpoint": "http://127.0.0.1:8000/v1",
        "eval.judge_endpoint_model": "judge",
        "eval.judge_endpoint_body": body,
    }
    config = apply_overrides(Config(), settings, "test")
    ep.check_endpoint_settings(config.eval)
    built = ep.endpoint_from_config(config.eval)
    assert built.url() == "http://127.0.0.1:8000/v1/chat/completions" and built.model == "judge"
    assert built.body == {"structured_outputs": {"choice": ["A", "B"]}} and built.concurrency == 8
    monkeypatch.setattr(dryrun, "stand_in", lambda name: f"stand-in of {name}")  # not built: not needed here
    assert ep.endpoint_from_config(dryrun.dry_config(config).eval) is None

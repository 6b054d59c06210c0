"""The outside judge's client against vLLM's OpenAI server on this machine: concurrency, and no lost request
when the server is killed and restarted mid-evaluation.

    python bench/endpoint_judge.py [--comparisons 64] [--concurrency 8] [--model PATH]

Starts `vllm.entrypoints.openai.api_server` with the tiny random model (or --model), asks --comparisons
pairwise questions in both orders through selfreward.judge.endpoint (structured outputs hold the replies to
A or B), and reports requests per second and the most requests in flight at once. Then it judges a new set,
kills the server (SIGKILL) once a third of the replies are in, sees the client stop with one error, restarts
the server and reruns: the rerun must send exactly the requests that had no cached reply, and every
comparison must end with a reply. Prints one JSON line per part.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfreward.judge import endpoint as ep  # noqa: E402
from selfreward.judge.rubric import PAIRWISE  # noqa: E402
from selfreward.model.chat import packaged_template  # noqa: E402

CHOICE = {"structured_outputs": {"choice": ["A", "B"]}}


def start_server(model: str, port: int) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
               "judge", "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", "0.3",
               "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32"]  # fmt: skip
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", VLLM_WORKER_MULTIPROC_METHOD="spawn")
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    while True:
        if server.poll() is not None:
            raise SystemExit("the vLLM server exited while starting")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).close()
            return server, time.perf_counter() - started
        except OSError:
            time.sleep(0.5)


def kill(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


class InFlight:
    """Counts the requests in flight inside the client's own POST, and the most at once."""

    def __init__(self):
        self.now = self.most = self.done = 0
        self.lock = threading.Lock()
        self.post = ep._post
        ep._post = self

    def __call__(self, endpoint, body):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            return self.post(endpoint, body)
        finally:
            with self.lock:
                self.now -= 1
                self.done += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comparisons", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--port", type=int, default=18391)
    parser.add_argument("--model", help="a model folder (default: the tiny random model)")
    args = parser.parse_args()
    if args.model:
        model = args.model
    else:
        from selfreward.model.models import TINY, resolve_model_path

        model = str(resolve_model_path(TINY))
    template = packaged_template(PAIRWISE["default"])
    endpoint = ep.Endpoint(f"http://127.0.0.1:{args.port}/v1", "judge", concurrency=args.concurrency, body=CHOICE,
                           retries=2, backoff_seconds=0.2)  # fmt: skip
    counter = InFlight()
    server, start_s = start_server(model, args.port)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(f"Question {i}: name a colour.", f"Red, {i}.", f"Blue, {i}.") for i in range(args.comparisons)]
        started = time.perf_counter()
        first, second, sent = ep.picks_in_both_orders(endpoint, rows, template, ep.ReplyCache(Path(tmp) / "a.jsonl"))
        took = time.perf_counter() - started
        print(json.dumps({"part": "throughput", "requests": sent, "seconds": round(took, 2),
                          "requests_per_second": round(sent / took, 2), "most_in_flight": counter.most,
                          "concurrency": args.concurrency, "server_start_seconds": round(start_s, 1),
                          "readable": sum(x is not None for x in first + second)}), flush=True)  # fmt: skip

        rows = [(f"Question {i}: name a fruit.", f"Apple, {i}.", f"Pear, {i}.") for i in range(args.comparisons)]
        cache = Path(tmp) / "b.jsonl"
        counter.done, total = 0, 2 * len(rows)

        def killer() -> None:
            while counter.done < total // 3:
                time.sleep(0.01)
            kill(server)

        watcher = threading.Thread(target=killer)
        watcher.start()
        try:
            ep.picks_in_both_orders(endpoint, rows, template, ep.ReplyCache(cache))
            stopped = "no error (the kill came too late)"
        except ep.EndpointError as exc:
            stopped = str(exc)[:160]
        watcher.join()
        cached = len(ep.ReplyCache(cache).replies)
        server, restart_s = start_server(model, args.port)
        try:
            first, second, sent = ep.picks_in_both_orders(endpoint, rows, template, ep.ReplyCache(cache))
        finally:
            kill(server)
        print(json.dumps({"part": "kill and restart", "requests": total, "cached_before_kill": cached,
                          "client_stopped_with": stopped, "sent_after_restart": sent,
                          "lost": total - cached - sent, "answered": len(first) + len(second),
                          "restart_seconds": round(restart_s, 1)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

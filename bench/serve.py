"""Serving throughput and multi-turn latency, each against its peer measured in the same run.

1. `mlxq serve` (a subprocess) and the official `openai` client, streaming: aggregate completion tokens/s with
   8 concurrent clients against 1 client (continuous batching lets the 8 share each model step).
2. The Python game API: time to first token of a `Session` turn N with its cache kept between turns, against
   the same turn run on a fresh session holding the same conversation (the whole prompt prefilled).

    python bench/serve.py [--model smollm2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "umigame"))

from common import median, parse_args, write_result  # noqa: E402

ROOT = Path(__file__).parent.parent


# ------------------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch: int) -> subprocess.Popen:
    env = {**os.environ, "MLXQ_NO_REEXEC": "1"}  # LD_PRELOAD (OpenBLAS) is inherited as it is
    cmd = [
        sys.executable,
        "-m",
        "mlxq.cli",
        "serve",
        model,
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--log-level",
        "warning",
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, client, timeout: float = 300) -> None:
    import openai

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"mlxq serve exited: {proc.stderr.read()[-2000:]}")
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise SystemExit("mlxq serve did not come up") from None
            time.sleep(0.25)


def stream_one(client, model: str, i: int, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first content) of one streamed chat request."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Tell me story number {i} about a lighthouse."}],
        max_tokens=max_tokens,
        temperature=0.7,
        seed=i,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, first if first is not None else time.perf_counter() - t0


def run_clients(client, model: str, clients: int, requests: int, max_tokens: int, offset: int) -> dict:
    """`clients` threads, each sending `requests` streamed requests one after another."""
    results: list[list[tuple[int, float]]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def worker(c: int) -> None:
        try:
            for r in range(requests):
                results[c].append(stream_one(client, model, offset + c * requests + r, max_tokens))
        except BaseException as e:  # reported below, not swallowed
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    tokens = sum(n for res in results for n, _ in res)
    return {
        "clients": clients,
        "requests": clients * requests,
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "median_ttft_s": round(median([f for res in results for _, f in res]), 3),
    }


def bench_server(model: str, quick: bool, clients: int, max_tokens: int, requests: int, rounds: int) -> dict:
    import openai

    port = free_port()
    proc = start_server(model, port, max_batch=clients)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600)
    try:
        t0 = time.perf_counter()
        wait_ready(proc, client)
        startup = time.perf_counter() - t0
        served = client.models.list().data[0].id
        stream_one(client, served, -1, 4)  # warm-up
        runs: dict[str, list[dict]] = {"1": [], str(clients): []}
        for r in range(rounds):  # interleaved, so load from elsewhere on the machine hits both alike
            runs["1"].append(run_clients(client, served, 1, requests, max_tokens, 1000 * r))
            runs[str(clients)].append(run_clients(client, served, clients, requests, max_tokens, 1000 * r + 100))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    agg = {k: median([x["tokens_per_s"] for x in v]) for k, v in runs.items()}
    return {
        "startup_s": round(startup, 2),
        "max_tokens": max_tokens,
        "requests_per_client": requests,
        "rounds": rounds,
        "runs": runs,
        "median_tokens_per_s": agg,
        "ratio": round(agg[str(clients)] / agg["1"], 3),
    }


# ------------------------------------------------------------------------------------------------ session
def bench_session(model_name: str, turns: int, max_tokens: int) -> dict:
    from puzzle import SCRIPT, SYSTEM

    import mlxq
    from mlxq.session import Session

    model = mlxq.load(model_name)
    questions = (SCRIPT * (turns // len(SCRIPT) + 1))[:turns]
    kept = Session(model, system=SYSTEM, max_tokens=max_tokens)  # greedy: both sessions see the same conversation
    Session(model, system=SYSTEM, max_tokens=4).ask("こんにちは")  # warm-up
    per_turn = []
    for n, q in enumerate(questions, 1):
        history = list(kept.messages)
        kept.ask(q)
        cached = kept.stats[-1]
        fresh = Session(model, system=SYSTEM, max_tokens=max_tokens)
        fresh.messages = history
        fresh.ask(q)
        uncached = fresh.stats[-1]
        per_turn.append(
            {
                "turn": n,
                "prompt_tokens": cached.prompt_tokens,
                "processed_cached": cached.processed_tokens,
                "ttft_cached_s": round(cached.first_token_s, 4),
                "ttft_uncached_s": round(uncached.first_token_s, 4),
            }
        )
    later = [t for t in per_turn if t["turn"] >= 2]  # turn 1 has nothing to reuse
    med_cached = median([t["ttft_cached_s"] for t in later])
    med_uncached = median([t["ttft_uncached_s"] for t in later])
    return {
        "turns": per_turn,
        "median_ttft_cached_s": med_cached,
        "median_ttft_uncached_s": med_uncached,
        "ratio": round(med_uncached / med_cached, 3) if med_cached else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=None, help="completion tokens per request")
    ap.add_argument("--requests", type=int, default=None, help="requests per client")
    ap.add_argument("--turns", type=int, default=None, help="session turns")
    args = parse_args(ap)
    max_tokens = args.max_tokens or (48 if args.quick else 128)
    requests = args.requests or (1 if args.quick else 3)
    rounds = 1 if args.quick else 2
    turns = args.turns or (3 if args.quick else 8)

    server = bench_server(args.model, args.quick, args.clients, max_tokens, requests, rounds)
    session = bench_session(args.model, turns, max_tokens=8)
    write_result(
        "serve",
        {
            "model": args.model,
            "quick": args.quick,
            "server": server,
            "session": session,
            "ratios": {
                f"concurrency_{args.clients}_vs_1": server["ratio"],
                "session_ttft_uncached_vs_cached": session["ratio"],
            },
        },
    )


if __name__ == "__main__":
    main()

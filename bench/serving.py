#!/usr/bin/env python3
"""Serving: tokens/s and time to first token through the API vs direct ``model.generate``.

    .venv/bin/python bench/serving.py [--hidden 512] [--layers 8] [--tokens 128] [--threads 2]

Builds a random Llama-architecture model (no download; the tests' builder), starts the
real service on it (``python -m tdxvm.guest.serve`` in a child process) and, in turns,
times the same greedy generation of the same prompt:

* ``generate``           — ``model.generate`` in this process, the peer (TTFT from a streamer);
* ``generate+HF-text``   — the same with transformers' ``TextIteratorStreamer``;
* ``generate+tdxvm-text``— the same with the engine's per-token hook (incremental text, stops);
* ``API (raw SSE)``      — ``stream: true`` to the service, read with ``http.client``;
* ``API (streamed)``     — the same through the ``openai`` client (which costs CPU per chunk).

TTFT is from the call (or the HTTP request) to the first generated token's text;
tokens/s is completion tokens over the whole request. Medians over --runs. The server
and this process use the same torch thread count. Targets: API >= 0.97x the tokens/s of
``generate`` and <= 20 ms extra TTFT. Not part of the test run.

Every torch call in this process runs on the main thread: with libgomp (torch's OpenMP),
each thread that runs parallel torch ops keeps a team of its own, and once two teams
exist on a 2-core machine libgomp throttles its spin-waits and every team runs at about
half speed. The service has the same property: all its torch work runs on the engine's
single worker thread.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdxvm.emulate.tinyllama import SENTENCES, build_tiny_model  # noqa: E402

Timing = tuple[float, float, int]  # TTFT seconds, total seconds, completion tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: Path, port: int, threads: int, dtype: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "tdxvm.guest.serve",
        "--model",
        str(model),
        "--name",
        "bench",
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--dtype",
        dtype,
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become healthy in 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128, help="tokens to generate")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--runs", type=int, default=12)
    args = ap.parse_args()

    import openai
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList, TextIteratorStreamer
    from transformers.generation.streamers import BaseStreamer

    from tdxvm.guest.engine import Job, SamplingParams, Token, _hook_class

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tdxvm-bench-") as tmp:
        model_dir = build_tiny_model(
            Path(tmp) / "model",
            hidden=args.hidden,
            layers=args.layers,
            heads=args.hidden // 64,
            intermediate=args.hidden * 8 // 3,
            context=4096,
            vocab=1000,
        )
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, dtype=getattr(torch, args.dtype)
        ).eval()
        params = sum(p.numel() for p in model.parameters())

        def generate(ids: list[int], streamer: object = None) -> list[int]:
            t = torch.tensor([ids])
            with torch.inference_mode():
                out = model.generate(
                    t, attention_mask=torch.ones_like(t), max_new_tokens=args.tokens, do_sample=False, streamer=streamer
                )
            return list(out[0, len(ids) :].tolist())

        # a prompt of about --prompt-tokens whose greedy output runs the full length and whose
        # first token is whole text (so no side waits for the rest of a UTF-8 sequence)
        for shift in range(50):
            words = " ".join(SENTENCES * 20).split()[shift:]
            prompt = " ".join(words[: args.prompt_tokens])
            while len(tok(prompt)["input_ids"]) > args.prompt_tokens:
                prompt = prompt.rsplit(" ", 1)[0]
            ids = tok(prompt)["input_ids"]
            out = generate(ids)
            first = str(tok.decode(out[:1]))
            if len(out) == args.tokens and first and not first.endswith("\ufffd"):
                break

        class Clock(BaseStreamer):
            def __init__(self) -> None:
                self.puts: list[float] = []

            def put(self, value: object) -> None:
                self.puts.append(time.perf_counter())

            def end(self) -> None:
                pass

        def run_generate() -> Timing:
            clock, t0 = Clock(), time.perf_counter()
            n = len(generate(tok(prompt)["input_ids"], clock))
            return clock.puts[1] - t0, time.perf_counter() - t0, n  # puts[0] is the prompt

        def run_hf_text() -> Timing:
            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
            marks = {"first": 0.0}

            def consume() -> None:  # the consumer thread runs no torch ops (see the docstring)
                for text in streamer:
                    marks["first"] = marks["first"] or (time.perf_counter() if text else 0.0)

            consumer = threading.Thread(target=consume)
            consumer.start()
            t0 = time.perf_counter()
            n = len(generate(tok(prompt)["input_ids"], streamer))
            consumer.join()
            return marks["first"] - t0, time.perf_counter() - t0, n

        def run_hook() -> Timing:
            marks = {"first": 0.0, "n": 0}

            def sink(ev: object) -> None:
                if isinstance(ev, Token) and ev.text and not marks["first"]:
                    marks["first"] = time.perf_counter()

            t0 = time.perf_counter()
            ids = tok(prompt)["input_ids"]
            hook = _hook_class()(Job(ids, SamplingParams(max_tokens=args.tokens, temperature=0), sink), tok)
            t = torch.tensor([ids])
            with torch.inference_mode():
                out = model.generate(
                    t,
                    attention_mask=torch.ones_like(t),
                    max_new_tokens=args.tokens,
                    do_sample=False,
                    stopping_criteria=StoppingCriteriaList([hook]),
                )
            return marks["first"] - t0, time.perf_counter() - t0, out.shape[1] - len(ids)

        port = free_port()
        server = start_server(model_dir, port, args.threads, args.dtype)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)

        def run_api() -> Timing:
            t0, first, n = time.perf_counter(), 0.0, 0
            stream = client.completions.create(
                model="bench",
                prompt=prompt,
                max_tokens=args.tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text and not first:
                    first = time.perf_counter()
                if chunk.usage:
                    n = chunk.usage.completion_tokens
            return first - t0, time.perf_counter() - t0, n

        def run_sse() -> Timing:
            body = json.dumps(
                {
                    "model": "bench",
                    "prompt": prompt,
                    "max_tokens": args.tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            )
            t0, first, n = time.perf_counter(), 0.0, 0
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            for line in conn.getresponse():
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    first = first or (time.perf_counter() if chunk["choices"] and chunk["choices"][0]["text"] else 0.0)
                    n = chunk["usage"]["completion_tokens"] if chunk.get("usage") else n
            conn.close()
            return first - t0, time.perf_counter() - t0, n

        runners: dict[str, Callable[[], Timing]] = {
            "generate": run_generate,
            "generate+HF-text": run_hf_text,
            "generate+tdxvm-text": run_hook,
            "API (raw SSE)": run_sse,
            "API (streamed)": run_api,
        }
        try:
            results: dict[str, list[Timing]] = {k: [] for k in runners}
            cpus: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
            for fn in runners.values():
                fn()  # warm-up
            for i in range(args.runs):
                names = list(runners)[i % len(runners) :] + list(runners)[: i % len(runners)]  # rotate the order
                for k in names:
                    time.sleep(0.3)  # let the other process's OpenMP threads stop spinning
                    before = self_cpu(), process_cpu(server.pid)
                    results[k].append(runners[k]())
                    cpus[k].append((self_cpu() - before[0], process_cpu(server.pid) - before[1]))
        finally:
            server.terminate()
            server.wait(timeout=30)

    report(results, cpus, args, params, len(ids))


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds of the live threads of ``pid`` (nanosecond schedstat counters)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def report(
    results: dict[str, list[Timing]],
    cpus: dict[str, list[tuple[float, float]]],
    args: argparse.Namespace,
    params: int,
    prompt_tokens: int,
) -> None:
    """Medians per path; the ratios to ``generate`` are medians of per-round ratios, so that
    load from other processes, which moves both runs of a round alike, cancels out. CPU
    per token is that of the process that generates (this one, or the server) and, for the
    API, of the client; it is less sensitive than wall time to other load on the machine."""
    import importlib.util

    fast = [m for m in ("uvloop", "httptools") if importlib.util.find_spec(m)]
    print(
        f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {params / 1e6:.1f} M parameters, "
        f"{args.dtype}, {args.threads} torch threads"
    )
    print(
        f"prompt {prompt_tokens} tokens, {args.tokens} tokens generated (greedy), {args.runs} rounds; "
        f"server uses {', '.join(fast) or 'asyncio and h11'}"
    )
    print(
        f"{'path':<20} {'TTFT ms':>8} {'tokens/s':>9} {'best tok/s':>11} {'vs generate':>12} "
        f"{'extra TTFT ms':>14} {'CPU ms/token':>13} {'client':>7}"
    )
    gen, rows = results["generate"], {}
    for k, v in results.items():
        ratio = statistics.median((r[2] / r[1]) / (g[2] / g[1]) for r, g in zip(v, gen, strict=True))
        extra = statistics.median(r[0] - g[0] for r, g in zip(v, gen, strict=True)) * 1e3
        tps = [t[2] / t[1] for t in v]
        rows[k] = ratio, extra
        api = k.startswith("API")
        gen_cpu = statistics.median((c[1] if api else c[0]) / t[2] for c, t in zip(cpus[k], v, strict=True)) * 1e3
        client = (
            f"{statistics.median(c[0] / t[2] for c, t in zip(cpus[k], v, strict=True)) * 1e3:7.2f}"
            if api
            else f"{'':7}"
        )
        print(
            f"{k:<20} {statistics.median(t[0] for t in v) * 1e3:8.1f} {statistics.median(tps):9.1f} {max(tps):11.1f} "
            f"{ratio:11.3f}x {extra:+14.1f} {gen_cpu:13.2f} {client}"
        )
    ratio, extra = rows["API (streamed)"]
    verdict = "OK" if ratio >= 0.97 and extra <= 20 else "MISSED"
    print(
        f"API vs generate: {ratio:.3f}x tokens/s (target >= 0.97), {extra:+.1f} ms TTFT (target <= 20): {verdict}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()

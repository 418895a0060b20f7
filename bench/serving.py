#!/usr/bin/env python3
"""Serving under load: tdxvm's service vs ``transformers serve`` at 1, 4 and 16 clients.

    .venv/bin/python bench/serving.py [--hidden 512] [--layers 8] [--tokens 128] [--threads 2]
                                      [--clients 1,4,16] [--servers tdxvm,transformers-cb,transformers]

Builds one random Llama-architecture model (no download; the tests' builder) and picks
prompts of about --prompt-tokens tokens whose greedy output runs the full --tokens (no
early EOS), so every request generates the same number of tokens. Then, one server at
a time in a child process with the same torch thread count (``OMP_NUM_THREADS``):

* ``tdxvm``            — ``python -m tdxvm.guest.serve`` (continuous batching, HTTP);
* ``transformers-cb``  — ``transformers serve --continuous-batching`` (the anchor);
* ``transformers``     — ``transformers serve`` in its default mode;

and in this process, for one client, ``model.generate`` itself. Each of N clients
(threads with their own connection) streams ``/v1/completions`` (greedy, ``stream:
true``) for its requests one after another; per server and N: aggregate tokens/s (all
completion tokens over the wall time), time to first token p50/p99, inter-token latency
p50/p99 (gaps between content chunks; a token whose text is held back, part of a UTF-8
character, widens a gap). Targets: at 16 clients tdxvm >= 1.0x the anchor's tokens/s and
>= 4x its own 1-client rate; at 1 client >= 0.97x ``model.generate``. For that last
ratio tdxvm's 1-client round is paired: each request follows ``model.generate`` on the
same prompt (the server idle meanwhile), and ``model.generate``'s figure is the median of
those runs, so both sides of the ratio see the machine at the same minute.
Not part of the test run.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchmodel  # noqa: E402

from tdxvm.emulate.tinyllama import SENTENCES  # noqa: E402

SERVERS = ("tdxvm", "transformers-cb", "transformers")
# OpenMP threads spin for some milliseconds after their last parallel region: the pause
# between a paired run in one process and the next in the other, so neither starts on
# cores the other's threads still hold (without it a request's TTFT grows by ~10 ms)
SETTLE = 0.1


@dataclass
class Sample:
    """One request: seconds to the first content chunk, the gaps after it, completion tokens."""

    ttft: float
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


@dataclass
class Round:
    clients: int
    wall: float
    samples: list[Sample]

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(kind: str, model: Path, port: int, threads: int, max_batch: int) -> list[str]:
    if kind == "tdxvm":
        return [
            sys.executable,
            *("-m", "tdxvm.guest.serve", "--model", str(model), "--name", "bench", "--port", str(port)),
            *("--threads", str(threads), "--max-batch", str(max_batch), "--log-level", "warning"),
        ]
    cli = str(Path(sys.executable).with_name("transformers"))
    mode = ["--continuous-batching"] if kind == "transformers-cb" else []
    return [cli, "serve", *mode, "--device", "cpu", "--dtype", "float32", "--port", str(port), str(model)]


def start_server(cmd: list[str], port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{' '.join(cmd)} did not become healthy in 300 s")


@dataclass(frozen=True)
class Target:
    """A service to load: where, the model name to ask for, and for HTTPS the SPKI SHA-256
    its TLS key must have (checked on every connection) and the API key to send."""

    host: str
    port: int
    model: str
    pin: bytes | None = None
    api_key: str | None = None

    def connect(self) -> http.client.HTTPConnection:
        if self.pin is None:
            plain = http.client.HTTPConnection(self.host, self.port, timeout=900)
            plain.connect()  # as for HTTPS: TTFT counts from the request, not the connection
            return plain
        from tdxvm.provision.pinning import spki_sha256, unverified_context

        conn = http.client.HTTPSConnection(self.host, self.port, timeout=900, context=unverified_context())
        conn.connect()
        der = conn.sock.getpeercert(binary_form=True) if isinstance(conn.sock, ssl.SSLSocket) else None
        if not der or spki_sha256(der) != self.pin:
            conn.close()
            raise SystemExit(f"{self.host}:{self.port} presented another TLS key than the pinned one")
        return conn


def stream(target: Target, prompt: str, tokens: int) -> Sample:
    body = json.dumps(
        {
            "model": target.model,
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    headers = {"Content-Type": "application/json"}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    conn = target.connect()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    sample, last, chunks = None, 0.0, 0
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            (sample or Sample(0.0)).tokens = chunk["usage"]["completion_tokens"]
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            now, chunks = time.perf_counter(), chunks + 1
            if sample is None:
                sample = Sample(now - t0)
            else:
                sample.gaps.append(now - last)
            last = now
    conn.close()
    if sample is None:
        raise SystemExit("a response streamed no text")
    sample.tokens = sample.tokens or chunks
    return sample


def load_round(target: Target, prompts: list[str], clients: int, per_client: int, tokens: int) -> Round:
    samples: list[Sample] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(per_client):
            s = stream(target, prompts[(i + j * clients) % len(prompts)], tokens)
            with lock:
                samples.append(s)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Round(clients, time.perf_counter() - t0, samples)


def paired_round(
    target: Target, prompts: list[str], requests: int, tokens: int, tok, generate
) -> tuple[Round, list[float]]:
    """One client, each request right after ``model.generate`` ran the same prompt in this
    process: the round (its wall time is the requests' own, from connecting to the end of
    the stream) and the generate times. Pairing keeps the machine's drift out of the
    ratio (a shared 2-core VM's speed moves by several percent within minutes)."""
    samples, walls, direct = [], [], []
    for j in range(requests):
        prompt = prompts[j % len(prompts)]
        time.sleep(SETTLE)
        direct.append(generate(tok(prompt)["input_ids"])[1])
        time.sleep(SETTLE)
        t0 = time.perf_counter()
        samples.append(stream(target, prompt, tokens))
        walls.append(time.perf_counter() - t0)
    return Round(1, sum(walls), samples), direct


def pick_prompts(tok, generate, prompt_tokens: int, tokens: int, count: int = 16) -> list[str]:
    """``count`` prompts of at most ``prompt_tokens`` tokens whose greedy output (``generate(ids)``
    -> (ids, seconds)) runs the full ``tokens`` and starts on a whole character."""
    words, prompts = " ".join(SENTENCES * 40).split(), []
    for shift in range(400):
        if len(prompts) == count:
            return prompts
        text = " ".join(words[shift * 5 : shift * 5 + prompt_tokens])
        while len(tok(text)["input_ids"]) > prompt_tokens:
            text = text.rsplit(" ", 1)[0]
        out, _ = generate(tok(text)["input_ids"])
        if len(out) == tokens and not str(tok.decode(out[:1])).endswith("\ufffd"):
            prompts.append(text)
    raise SystemExit(f"found only {len(prompts)} prompts whose greedy output runs {tokens} tokens")


def greedy_reference(model_dir: Path, tokens: int, threads: int) -> tuple[Any, Callable, int]:
    """The model loaded in this process (float32, ``threads`` torch threads): its tokenizer, a
    function running ``model.generate`` greedily for ``tokens`` tokens on prompt ids (the new
    ids and the seconds it took), and its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()

    def generate(ids: list[int]) -> tuple[list[int], float]:
        t = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=tokens, do_sample=False)
        return out[0, len(ids) :].tolist(), time.perf_counter() - t0

    return tok, generate, sum(p.numel() for p in model.parameters())


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] * 1e3 if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128, help="tokens to generate per request")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per round (at least one per client)")
    ap.add_argument("--servers", default=",".join(SERVERS))
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    servers = [s for s in args.servers.split(",") if s]
    if unknown := set(servers) - set(SERVERS):
        raise SystemExit(f"unknown servers {sorted(unknown)}; choose from {', '.join(SERVERS)}")
    if any(s.startswith("transformers") for s in servers) and importlib.util.find_spec("accelerate") is None:
        raise SystemExit("transformers serve needs accelerate: pip install -e '.[bench]' (or --servers tdxvm)")

    results: dict[str, list[Round]] = {}
    with tempfile.TemporaryDirectory(prefix="tdxvm-bench-") as tmp:
        model_dir = benchmodel.build(Path(tmp) / "model", hidden=args.hidden, layers=args.layers)
        tok, generate, params = greedy_reference(model_dir, args.tokens, args.threads)
        prompts = pick_prompts(tok, generate, args.prompt_tokens, args.tokens)
        if "tdxvm" not in servers or 1 not in levels:  # else timed beside tdxvm's 1-client requests
            runs = [generate(tok(p)["input_ids"])[1] for p in prompts[: max(4, args.requests // 4)]]
            direct = args.tokens / statistics.median(runs)

        for kind in servers:
            port = free_port()
            proc = start_server(server_command(kind, model_dir, port, args.threads, max(levels)), port, args.threads)
            target = Target("127.0.0.1", port, "bench" if kind == "tdxvm" else str(model_dir))
            try:
                load_round(target, prompts, 2, 1, 8)  # warm-up
                rounds = []
                for n in levels:
                    if n == 1 and kind == "tdxvm":
                        paired, runs = paired_round(target, prompts, args.requests, args.tokens, tok, generate)
                        rounds.append(paired)
                        direct = args.tokens / statistics.median(runs)
                    else:
                        rounds.append(load_round(target, prompts, n, max(1, args.requests // n), args.tokens))
                results[kind] = rounds
                print(f"  {kind}: done", file=sys.stderr)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    report(results, direct, args, params, levels)


def report(results: dict[str, list[Round]], direct: float, args: argparse.Namespace, params: int, levels: list) -> None:
    print(
        f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {params / 1e6:.1f} M parameters, float32, "
        f"{args.threads} torch threads; prompts ~{args.prompt_tokens} tokens, {args.tokens} greedy tokens each, "
        f"{args.requests} requests per round; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'server':<18} {'clients':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}"
    )
    print(f"{'model.generate':<18} {1:>7} {direct:9.1f}")
    for kind, rounds in results.items():
        for r in rounds:
            ttft, gaps = [s.ttft for s in r.samples], [g for s in r.samples for g in s.gaps]
            print(
                f"{kind:<18} {r.clients:>7} {r.tokens_per_s:9.1f} {pct(ttft, 0.5):9.1f} {pct(ttft, 0.99):9.1f} "
                f"{pct(gaps, 0.5):8.2f} {pct(gaps, 0.99):8.2f}"
            )
    print("(TTFT and ITL in ms)")
    if "tdxvm" not in results:
        return
    ours = {r.clients: r.tokens_per_s for r in results["tdxvm"]}
    lines = []
    if 1 in ours:
        lines.append(f"tdxvm at 1 client vs model.generate: {ours[1] / direct:.2f}x (target >= 0.97)")
    top = max(ours)
    if 1 in ours and top > 1:
        lines.append(f"tdxvm at {top} clients vs its own 1-client rate: {ours[top] / ours[1]:.2f}x (target >= 4)")
    if "transformers-cb" in results:
        anchor = {r.clients: r.tokens_per_s for r in results["transformers-cb"]}
        for n in sorted(set(ours) & set(anchor)):
            lines.append(
                f"tdxvm at {n} clients vs transformers serve --continuous-batching: {ours[n] / anchor[n]:.2f}x"
                + (" (target >= 1.0)" if n == top else "")
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

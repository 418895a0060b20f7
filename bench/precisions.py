#!/usr/bin/env python3
"""Precisions: float32, bfloat16 and INT8 weights on the same model, through the engine.

    .venv/bin/python bench/precisions.py [--hidden 1024] [--layers 8] [--tokens 128] [--threads 2]

Builds one random Llama-architecture model (no download) and, for each precision, loads
it into the service's engine in a child process of its own (so peak RSS is that
precision's alone) and times the same greedy generation: one request alone, then 16
at once. Printed per precision: tokens/s at 1 and 16 clients, peak RSS, and the greedy
outputs' agreement with float32 (tokens equal up to the first difference, over all
prompts). Besides tdxvm's INT8 (per-channel weights, per-token activations on torch's
integer GEMM) it measures the peer the choice was made against: torch's dynamic
quantization (``quantize_dynamic``, one activation scale per batch) on the same engine.
Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchmodel  # noqa: E402

from tdxvm.emulate.tinyllama import SENTENCES  # noqa: E402

CHILD = r"""
import json, resource, sys, threading, time, warnings
from pathlib import Path
from tdxvm.guest import engine as eng
from tdxvm.guest.engine import Engine, EngineConfig, SamplingParams, Token

model_dir, dtype, threads, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prompts = json.loads(sys.argv[5])
if dtype == "torch-ao-dynamic":  # the peer: the engine's float32 model, then torch's dynamic quantization
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    load = eng._load
    def ao(config):
        model, tok = load(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8), tok
    eng._load = ao
    dtype = "float32"
e = Engine.load(EngineConfig(model_dir=Path(model_dir), name="bench", dtype=dtype, threads=threads))

def run(batch):
    outs, left, done = [[] for _ in batch], [len(batch)], threading.Event()
    def sink_for(i):
        def sink(ev):
            if isinstance(ev, Token):
                outs[i].append(ev.text)
            else:
                left[0] -= 1
                if not left[0]:
                    done.set()
        return sink
    t0 = time.perf_counter()
    for i, p in enumerate(batch):
        e.submit(p, SamplingParams(max_tokens=tokens, temperature=0), sink_for(i))
    done.wait()
    return sum(len(o) for o in outs) / (time.perf_counter() - t0), outs

run(prompts[:2])  # warm-up
one = max(run(prompts[:1])[0] for _ in range(3))
sixteen, outs = run(prompts[:16])
e.close()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"one": one, "sixteen": sixteen, "rss_mib": rss, "outs": outs}))
"""

KINDS = ("float32", "bfloat16", "int8", "torch-ao-dynamic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tdxvm-bench-") as tmp:
        model = benchmodel.build(Path(tmp) / "model", hidden=args.hidden, layers=args.layers)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
        words = " ".join(SENTENCES * 20).split()
        prompts = [tok(" ".join(words[i * 7 : i * 7 + 40]))["input_ids"] for i in range(16)]
        results = {}
        for kind in KINDS:
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(model),
                    kind,
                    str(args.threads),
                    str(args.tokens),
                    json.dumps(prompts),
                ],
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            )
            results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {kind}: done", file=sys.stderr)
    params = args.layers * (4 * args.hidden**2 + 3 * args.hidden * (args.hidden * 8 // 3)) + 2 * 1000 * args.hidden
    print(
        f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {params / 1e6:.0f} M parameters; "
        f"{args.tokens} greedy tokens per request, {args.threads} torch threads"
    )
    print(f"{'weights':<18} {'1 client tok/s':>15} {'16 clients tok/s':>17} {'peak RSS MiB':>13} {'agreement':>10}")
    ref = [("".join(o)) for o in results["float32"]["outs"]]
    for kind, r in results.items():
        got = ["".join(o) for o in r["outs"]]
        same = sum(_common(a, b) for a, b in zip(got, ref, strict=True)) / sum(len(b) for b in ref)
        print(f"{kind:<18} {r['one']:15.1f} {r['sixteen']:17.1f} {r['rss_mib']:13.0f} {same:9.1%}")
    print("agreement: characters of each greedy output equal to float32's up to the first difference, over all")


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


if __name__ == "__main__":
    main()

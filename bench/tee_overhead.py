#!/usr/bin/env python3
"""The seed paper's Figure 5 for one VM spec: generation speed and latency in the VM
tdxvm launched, against the same service on this host ("bare metal").

    .venv/bin/python bench/tee_overhead.py VM.yaml --plain FOLDER [--clients 1,4] [--requests 8]
                                           [--tokens 32] [--prompt-tokens 32]

Before: ``tdxvm launch VM.yaml`` (the spec names a ``model:``; the VM is attested and
serving it). FOLDER is the plain model folder that was encrypted for it; its digest
must be the one the controller recorded when it provisioned the VM, so both sides serve
the same weights. Then, with the serving benchmark's client (bench/serving.py: streamed
greedy completions, N clients each sending its requests one after another):

* bare metal: the guest's service on this host (bench/tlsservice.py: the same app,
  engine, TLS and API key check, without attestation), with the spec's dtype and as many
  torch threads as the VM has (``model.threads``, else ``vcpus``);
* the VM: its service, attested first against the policy it was launched with (the
  controller's record) and then reached only on the attested TLS key, with an API key
  it was provisioned with.

Printed as the paper's table: per client count, aggregate tokens/s and the generation
speed reduction against bare metal, request latency (p50, first request byte to last
token) and its overhead, TTFT and inter-token latency p50. On a TDX host with
``backend: tdx`` this is the paper's TD-versus-bare-metal measurement. With
``backend: emulated`` the guest runs under QEMU TCG (binary translation, no KVM, no
TDX): the figures are the cost of emulation, not TDX overhead, and the report says so.
A plain-VM column (KVM without TDX) needs a backend tdxvm does not have. Not part of the
test run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tlsservice  # noqa: E402
from serving import Round, Target, greedy_reference, load_round, pct, pick_prompts  # noqa: E402


def vm_target(spec) -> tuple[Target, str, bytes]:
    """The attested service of the VM ``spec`` names: its target, backend and recorded model digest."""
    from tdxvm.errors import TdxvmError
    from tdxvm.launch.connection import connection
    from tdxvm.launch.records import VmRecords
    from tdxvm.provision.apikeys import client_key
    from tdxvm.provision.attestation import trusted_vm
    from tdxvm.provision.model import attest_service, recorded_digest
    from tdxvm.secretstore import SecretStore

    store = SecretStore()
    try:
        with connection(spec.uri) as conn:
            record, trust = trusted_vm(conn, spec.name, VmRecords.beside(store))
        digest = recorded_digest(record)
        if digest is None or not record.model:
            raise SystemExit(f"VM {spec.name} has no provisioned model: run tdxvm launch on the spec first")
        endpoint = attest_service(record, trust, model_digest=digest)
        key = client_key(store, None, list(record.model.get("api_keys") or []))
    except TdxvmError as exc:
        raise SystemExit(f"VM {spec.name}: {exc} (launch it first: tdxvm launch SPEC)") from None
    url = urlsplit(endpoint.url)
    pin = hashlib.sha256(endpoint.tls_spki).digest()
    target = Target(url.hostname or "", url.port or 443, record.model["name"], pin=pin, api_key=key)
    return target, record.backend, digest


def reference_prompts(plain: Path, threads: int, args: argparse.Namespace) -> tuple[list[str], int]:
    """Prompts whose greedy output (float32, in this process) runs the full --tokens, and the
    model's parameter count; the model is freed on return, before either service loads it."""
    tok, generate, params = greedy_reference(plain, args.tokens, threads)
    return pick_prompts(tok, generate, args.prompt_tokens, args.tokens, count=8), params


def latencies(r: Round) -> list[float]:
    return [s.ttft + sum(s.gaps) for s in r.samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="the VM spec tdxvm launched (with a model:)")
    ap.add_argument("--plain", required=True, help="the plain model folder that was encrypted for the VM")
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--requests", type=int, default=8, help="requests per round (at least one per client)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens to generate per request")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    from tdxvm.guest.modeldigest import folder_digest, show
    from tdxvm.launch.spec import load_vm_spec

    spec = load_vm_spec(args.spec)
    if spec.model is None:
        raise SystemExit(f"{args.spec} names no model: to compare serving, the VM must serve one")
    threads, dtype = spec.model.threads or spec.vcpus, spec.model.dtype
    plain = Path(args.plain)
    vm, backend, digest = vm_target(spec)
    if folder_digest(plain) != digest:
        raise SystemExit(f"{plain} is not the model the VM serves (its recorded digest is {show(digest)})")

    prompts, params = reference_prompts(plain, threads, args)

    def measure(target: Target, where: str) -> list[Round]:
        load_round(target, prompts, 1, 1, 4)  # warm-up
        rounds = [load_round(target, prompts, n, max(1, args.requests // n), args.tokens) for n in levels]
        print(f"  {where}: done", file=sys.stderr)
        return rounds

    with tempfile.TemporaryDirectory(prefix="tdxvm-bench-") as tmp:
        service = tlsservice.start(plain, Path(tmp), name=vm.model, threads=threads, dtype=dtype)
        try:
            host = measure(Target("127.0.0.1", service.port, vm.model, service.pin, service.api_key), "bare metal")
        finally:
            service.stop()
    guest = measure(vm, f"VM {spec.name}")
    report(args, spec, backend, params, threads, dtype, host, guest)


def report(args, spec, backend: str, params: int, threads: int, dtype: str, host: list, guest: list) -> None:
    label = "TD" if backend == "tdx" else "emulated VM"
    print(
        f'Figure 5 of "Fortify Your Foundations" for VM {spec.name} ({backend} backend, {spec.vcpus} vCPUs, '
        f"{spec.memory} MiB): model {spec.model.name or spec.model.path.name}, {params / 1e6:.1f} M parameters, "
        f"{dtype}, {threads} torch threads on both sides; prompts <= {args.prompt_tokens} tokens, {args.tokens} "
        f"greedy tokens each, {args.requests} requests per round; host: {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'clients':>7} {'where':<12} {'tokens/s':>9} {'speed reduction':>15} {'latency p50':>11} "
        f"{'overhead':>9} {'TTFT p50':>9} {'ITL p50':>8}"
    )
    for h, g in zip(host, guest, strict=True):
        base = pct(latencies(h), 0.5)
        for where, r in (("bare metal", h), (label, g)):
            lat = pct(latencies(r), 0.5)
            reduction = f"{(1 - r.tokens_per_s / h.tokens_per_s) * 100:14.1f}%" if r is g else f"{'-':>15}"
            overhead = f"{(lat / base - 1) * 100:8.1f}%" if r is g else f"{'-':>9}"
            ttft, gaps = [s.ttft for s in r.samples], [x for s in r.samples for x in s.gaps]
            print(
                f"{r.clients:>7} {where:<12} {r.tokens_per_s:9.1f} {reduction} {lat:11.1f} {overhead} "
                f"{pct(ttft, 0.5):9.1f} {pct(gaps, 0.5):8.2f}"
            )
    print("(latencies in ms; the paper reports < 10% speed reduction for Llama 2 7B/13B INT8 in a TD)")
    mean = statistics.mean(1 - g.tokens_per_s / h.tokens_per_s for h, g in zip(host, guest, strict=True)) * 100
    if backend == "tdx":
        print(f"TD vs bare metal: {mean:.1f}% mean generation speed reduction")
    else:
        print(
            f"{mean:.1f}% mean speed reduction, but NOT TDX overhead: the emulated backend runs the guest under "
            "QEMU TCG (binary translation, no KVM, no TDX); run this on a TDX host with backend: tdx for the "
            "paper's measurement"
        )


if __name__ == "__main__":
    main()

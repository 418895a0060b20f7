#!/usr/bin/env python3
"""Weights transfer on loopback: tdxvm's upload path vs OpenSSH scp, in one run.

    .venv/bin/python bench/transfer.py [--size 1G] [--runs 3] [--dir /var/tmp] [--guest-python /usr/bin/python3]

Starts a private sshd on 127.0.0.1 (temporary host and client keys, its own config;
the system's sshd is left alone; as root, it creates /run/sshd if missing, as sshd's
systemd unit would), writes --size random bytes (default 1 GiB) as a one-file model,
encrypts it (``tdxvm weights encrypt``'s format), then moves it to a receiving folder
on this host through each path, one after the other:

* ``tdxvm tcp xN``   — :func:`tdxvm.provision.transfer.upload`: receiver started over
  SSH, N plain TCP bulk streams (the encrypted folder: the plaintext + 16 B per MiB);
* ``tdxvm ssh xN``   — the same with the bulk streams as SSH direct-tcpip channels;
* ``scp``            — OpenSSH ``scp`` of the plaintext file, default cipher;
* ``scp aes-gcm``    — the same with ``-c aes128-gcm@openssh.com`` (its fastest here);
* ``paramiko sftp``  — paramiko ``SFTPClient.put`` (pipelined), for reference.

Every figure is the wall time of the whole operation from a connected controller:
tdxvm's includes starting the receiver, the resume check and the commit (fsync and
rename into place); scp's includes its own SSH connection and, as scp does, no fsync
(the ``+fsync`` column adds the time to fsync what scp wrote). MB/s = 10^6 bytes of
payload per second; ratio = scp's time / this path's time (>= 0.8 is the target).
Each path runs --runs times, the paths taking turns (so that a slow spell of the
machine hits all of them), each run after --settle seconds of quiet so that every
path starts from the same state; the table shows the median and the best run. (On
this project's VMs, memory freed for a few seconds goes back to the host, and writing
into fresh page cache then runs at ~270 MiB/s: the receiver writes whole blocks with
O_DIRECT, scp and SFTP write through the page cache.) The
receiving side runs the receiver with --guest-python (default: this Python). Not part
of the test run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdxvm.guest.weights import encrypt_model, generate_model_key  # noqa: E402
from tdxvm.provision.transfer import upload  # noqa: E402
from tests.provision.sshd import LocalSshd, unavailable  # noqa: E402


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def fsync_tree(path: Path) -> None:
    for p in [path] if path.is_file() else path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G", help="payload size (K/M/G suffixes) [1G]")
    ap.add_argument("--runs", type=int, default=3, help="runs of each path, taking turns [3]")
    ap.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds of quiet after each run (disk idle, freed memory back to the host) [3]",
    )
    ap.add_argument("--dir", default="/var/tmp", help="folder for the source and received files [/var/tmp]")
    ap.add_argument("--guest-python", default=sys.executable, help="Python that runs the receiver [this one]")
    ap.add_argument("--skip", default="", help="comma-separated variant names to leave out")
    args = ap.parse_args()
    size = parse_size(args.size)
    why = unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="tdxvm-bench-transfer-", dir=args.dir))
    try:
        model, enc = work / "model", work / "enc"
        model.mkdir()
        plain = model / "model.safetensors"
        with plain.open("wb") as f:
            left = size
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n
        encrypt_model(model, enc, generate_model_key())
        os.sync()
        guest_python = ["env", f"PYTHONPATH={REPO}", args.guest_python]
        results: dict[str, list[tuple[float, float | None]]] = {}
        with LocalSshd() as sshd:
            client = sshd.client()
            user_host = f"{sshd.user}@127.0.0.1"

            def run(name: str, fn: Callable[[Path], str], durable: bool) -> None:
                if name in args.skip.split(","):
                    return
                out = work / "recv"
                out.mkdir()
                seconds, note = timed(lambda: fn(out))
                synced = None if durable else seconds + timed(lambda: fsync_tree(out))[0]
                results.setdefault(name, []).append((seconds, synced))
                print(f"  {name:<16} {seconds:7.2f} s  {note}", file=sys.stderr)
                shutil.rmtree(out)
                os.sync()
                time.sleep(args.settle)

            def tdxvm(via: str, streams: int) -> Callable[[Path], str]:
                def go(out: Path) -> str:
                    r = upload(
                        enc,
                        ssh_client=client,
                        guest_address="127.0.0.1",
                        via=via,
                        streams=streams,
                        dest=str(out),
                        python=guest_python,
                    )
                    assert r.sent_bytes == r.total_bytes, r
                    return (
                        f"setup {r.setup_seconds:.2f} s, bulk+commit {r.seconds:.2f} s = "
                        f"{r.bytes_per_second / 1e6:,.0f} MB/s"
                    )

                return go

            def scp(*opts: str) -> Callable[[Path], str]:
                def go(out: Path) -> str:
                    subprocess.run(
                        [
                            "scp",
                            "-q",
                            *sshd.ssh_options(),
                            *opts,
                            "-P",
                            str(sshd.port),
                            str(plain),
                            f"{user_host}:{out}/model.safetensors",
                        ],
                        check=True,
                    )
                    assert (out / "model.safetensors").stat().st_size == size
                    return " ".join(opts) or "default cipher"

                return go

            def sftp(out: Path) -> str:
                with client.open_sftp() as s:
                    s.put(str(plain), str(out / "model.safetensors"))
                return "put()"

            print(f"payload {size:,} bytes; receiver Python {args.guest_python}", file=sys.stderr)
            for i in range(args.runs):
                print(f"run {i + 1} of {args.runs}", file=sys.stderr)
                run("scp", scp(), durable=False)
                run("scp aes-gcm", scp("-c", "aes128-gcm@openssh.com"), durable=False)
                for n in (1, 2, 4):
                    run(f"tdxvm tcp x{n}", tdxvm("tcp", n), durable=True)
                for n in (1, 2):
                    run(f"tdxvm ssh x{n}", tdxvm("ssh", n), durable=True)
                run("paramiko sftp", sftp, durable=False)
            client.close()
        med = {name: statistics.median(s for s, _ in runs) for name, runs in results.items()}
        base = med.get("scp")
        print(f"\npayload {size:,} bytes, {args.runs} runs each; median (best) seconds")
        print(f"{'path':<16} {'seconds':>15} {'MB/s':>6} {'x scp':>6} {'+fsync s':>9}")
        for name, runs in results.items():
            seconds = med[name]
            ratio = f"{base / seconds:6.2f}" if base else "     -"
            synced = [y for _, y in runs if y is not None]
            extra = f"{statistics.median(synced):9.2f}" if synced else "  (fsync)"
            print(
                f"{name:<16} {seconds:7.2f} ({min(s for s, _ in runs):5.2f}) "
                f"{size / seconds / 1e6:6.0f} {ratio} {extra}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

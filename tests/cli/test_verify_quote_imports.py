"""``tdxvm verify-quote`` without ``--policy`` applies the strict default policy without
importing pydantic or PyYAML, and answers exactly as with a policy file that sets
nothing (Policy()'s defaults)."""

from __future__ import annotations

import json
import subprocess
import sys

V4_AT = "2025-06-20T00:00:00Z"


def _run(testdata, *extra: str) -> tuple[int, str, list[str]]:
    d = testdata / "dcap-qvl-v4"
    argv = [
        "verify-quote",
        str(d / "quote.bin"),
        "--collateral",
        str(d / "collateral.json"),
        "--at",
        V4_AT,
        "--no-cache",
        *extra,
    ]
    probe = (
        "import sys\nfrom tdxvm.cli import main\n"
        f"rc = main({argv!r})\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'yaml')), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    loaded = next(line for line in proc.stderr.splitlines() if line.startswith("LOADED"))
    return proc.returncode, proc.stdout, eval(loaded.removeprefix("LOADED "))  # a list literal printed above


def test_default_policy_needs_no_pydantic(testdata, tmp_path):
    empty = tmp_path / "policy.yaml"
    empty.write_text("{}\n")
    for output in ("json", "text"):
        code, out, loaded = _run(testdata, "-o", output)
        assert code == 0 and loaded == []
        with_file = _run(testdata, "-o", output, "--policy", str(empty))
        assert with_file[:2] == (code, out) and "pydantic" in with_file[2]
    assert json.loads(_run(testdata, "-o", "json")[1])["verdict"] == "accept"

"""Multi-process recipes in docs/ run as written: each ``<!-- recipe: NAME -->`` bash block of docs/deploy.md
is run by bash from the project checkout (on a free port, its files in a temporary directory), must exit 0,
produce the run's summary and leave none of its processes behind."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def recipes(doc: Path) -> dict[str, str]:
    """NAME -> the bash block that follows ``<!-- recipe: NAME -->``."""
    text = doc.read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"<!-- recipe: (\w+) -->\n```bash\n(.*?)```", text, re.S)}


def _free_port_block(n: int) -> int:
    """A port p such that p and p+10 .. p+10+n-1 are free on 127.0.0.1 now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10 + n >= 65535:
            continue
        try:
            for q in [p, *range(p + 10, p + 10 + n)]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port block")


def test_every_recipe_waits_for_its_superlink():
    """A recipe that starts a SuperLink in the background waits for its port before anything connects."""
    found = recipes(ROOT / "docs" / "deploy.md")
    assert "loopback" in found
    for name, block in found.items():
        if "flower-superlink" in block:
            start = block.index("flower-superlink")
            wait = block.find("create_connection")
            assert start < wait < block.index("flower-supernode") < block.index("flwr run"), name


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_loopback_recipe_runs_as_written(tmp_path):
    block = recipes(ROOT / "docs" / "deploy.md")["loopback"]
    port = _free_port_block(3)
    env = {**os.environ, "PORT": str(port), "NODES": "3", "WORK": str(tmp_path)}
    proc = subprocess.run(["bash", "-c", block], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((tmp_path / "runs" / "deployed" / "metrics.json").read_text())
    assert summary["rounds"] == 2 and summary["num_clients"] == 3
    assert [r["clients_ok"] for r in summary["rounds_detail"]] == [3, 3]
    deadline = time.time() + 20
    while time.time() < deadline and _ours(port):
        time.sleep(0.5)
    assert _ours(port) == []  # the recipe's trap stopped everything it started


def _ours(port: int) -> list[int]:
    """Live processes whose command line names the recipe's SuperLink port."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f"127.0.0.1:{port}" in cmd or f"--port {port} " in cmd + " ":
                out.append(int(d.name))
    return out

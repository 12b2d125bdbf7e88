"""The private SuperLink admits only the run's own processes: a real ``flower-superlink`` started in a private
network (:mod:`fedlowrank.runtime.private_net`) answers on its port inside, while a process outside (this test,
standing in for another local user or program) cannot connect to it, nor submit a run with ``flwr``."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedlowrank.runtime import private_net
from fedlowrank.runtime.superlink import BIN, stop

pytestmark = pytest.mark.skipif(private_net.unavailable() is not None,
                                reason="no unprivileged user+network namespaces on this kernel")

INSIDE = textwrap.dedent("""
    import json, socket, subprocess, sys, time, urllib.request
    out, bin_dir = sys.argv[1], sys.argv[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    link = subprocess.Popen([bin_dir + "/flower-superlink", "--insecure", "--simulation",
                             "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = None
    for _ in range(240):
        try:
            status = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status
            break
        except OSError:
            time.sleep(0.5)
    json.dump({"port": port, "inside_status": status}, open(out + ".tmp", "w"))
    import os; os.replace(out + ".tmp", out)
    try:
        link.wait()
    finally:
        link.terminate()
""")


@pytest.mark.timeout(240)
def test_a_superlink_in_a_private_network_refuses_every_other_local_process(tmp_path: Path):
    report = tmp_path / "inside.json"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # flower-superexec
    proc = subprocess.Popen(private_net.command([sys.executable, "-c", INSIDE, str(report), str(BIN)]),
                            start_new_session=True, env=env)
    try:
        deadline = time.time() + 180
        while not report.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        inside = json.loads(report.read_text())
        assert inside["inside_status"] == 200  # the SuperLink is up and answers inside its network
        port = inside["port"]
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing outside reaches it
        home = tmp_path / "flwr_home"
        home.mkdir()
        (home / "config.toml").write_text(f'[superlink.target]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        app = Path(__file__).resolve().parents[1]  # any app: the point is that the submission cannot land
        r = subprocess.run([str(BIN / "flwr"), "run", str(app), "target"], capture_output=True, text=True,
                           timeout=120, env={"PATH": str(BIN), "FLWR_HOME": str(home), "HOME": str(tmp_path)})
        assert r.returncode != 0 and "Successfully started run" not in r.stdout + r.stderr
    finally:
        stop([proc], grace=10)


def test_the_namespace_has_only_its_own_loopback():
    probe = "import socket; print(sorted(n for _, n in socket.if_nameindex()))"
    r = subprocess.run(private_net.command([sys.executable, "-c", probe]), capture_output=True, text=True,
                       timeout=60, check=True)
    assert r.stdout.strip() == "['lo']"
    host = sorted(n for _, n in socket.if_nameindex())
    assert host != ["lo"]  # a control: outside there is more than a loopback (else the check above shows nothing)


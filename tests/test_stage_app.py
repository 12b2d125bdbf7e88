"""The app ``flwr run`` submits for ``fed.runtime=superlink`` is a staged copy of the FAB's files."""
from __future__ import annotations

import subprocess

import pytest


def test_the_staged_app_builds_the_same_fab_as_the_checkout(tmp_path):
    """``flwr run`` gets a staged copy of the app (fedlowrank.runtime.superlink.stage_project) instead of the
    checkout, whose ``.venv`` Flower would walk file by file; both FABs hold the same files."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk, build_fab_from_files

    from fedlowrank.runtime.superlink import PROJECT, stage_project

    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    files = {p: PROJECT / p for p in tracked.stdout.split() if (PROJECT / p).is_file()}

    def names(fab: bytes) -> set[str]:
        return {n for n in zipfile.ZipFile(io.BytesIO(fab)).namelist() if not n.startswith(".info/")}

    want = names(build_fab_from_files(files)[0])
    got = names(build_fab_from_disk(stage_project(tmp_path / "app")))
    assert got == want and "server/server_app.py" in got and "conf/config.yaml" in got

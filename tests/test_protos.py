"""The committed generated modules match ``protos/`` (run scripts/gen-protos)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.daemon import REPO


def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    """Regenerating snet_daemon/_proto from protos/ changes nothing."""
    copy = tmp_path / "repo"
    (copy / "snet_daemon").mkdir(parents=True)
    shutil.copytree(REPO / "protos", copy / "protos")
    shutil.copytree(REPO / "snet_daemon" / "_proto", copy / "snet_daemon" / "_proto")
    (copy / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "gen-protos", copy / "scripts" / "gen-protos")
    subprocess.run(
        [str(copy / "scripts" / "gen-protos")],
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        timeout=120,
    )
    ours = {
        p.relative_to(REPO / "snet_daemon" / "_proto"): p.read_bytes()
        for p in (REPO / "snet_daemon" / "_proto").rglob("*.py*")
    }
    fresh = {
        p.relative_to(copy / "snet_daemon" / "_proto"): p.read_bytes()
        for p in (copy / "snet_daemon" / "_proto").rglob("*.py*")
    }
    stale = sorted(str(name) for name in ours.keys() | fresh.keys() if ours.get(name) != fresh.get(name))
    assert not stale, f"run scripts/gen-protos; out of date: {stale}"

"""docker/ci.sh builds from git's file list: untracked files never reach the image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docker" / "context-files.sh"


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_build_context_is_the_tracked_files_only(tmp_path):
    repo = tmp_path / "repo"
    (repo / "docker" / "wheelhouse").mkdir(parents=True)
    (repo / "service").mkdir()
    (repo / "service" / "app.py").write_text("tracked\n")
    (repo / "docker" / "wheelhouse" / "README.md").write_text("tracked\n")
    (repo / "docker" / "wheelhouse" / "torch-2.0-py3-none-any.whl").write_text("a tracked wheel: left to ci.sh\n")
    (repo / "gone.txt").write_text("tracked, then deleted\n")
    (repo / ".gitignore").write_text(".schemathesis/\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    (repo / "staged.py").write_text("new and staged\n")
    git(repo, "add", "staged.py")
    (repo / "gone.txt").unlink()
    (repo / "scratch.py").write_text("untracked, not ignored\n")
    (repo / ".schemathesis").mkdir()
    (repo / ".schemathesis" / "cache").write_text("ignored\n")
    (repo / "service" / "notes.txt").write_text("untracked\n")

    out = subprocess.run(["bash", str(SCRIPT), str(repo)], check=True, capture_output=True).stdout
    files = sorted(out.decode().split("\0")[:-1])
    assert files == [".gitignore", "docker/wheelhouse/README.md", "service/app.py", "staged.py"]


def test_ci_sh_builds_from_that_list():
    ci = (ROOT / "docker" / "ci.sh").read_text()
    assert 'bash docker/context-files.sh "$ROOT" >"$WORK/files"' in ci
    assert "-o --exclude-standard | while" not in ci  # untracked files are no longer listed into the context

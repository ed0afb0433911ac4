"""The commit a record names: HEAD, marked dirty when the code differs from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vlbench.results import git_sha


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_edited_code_marks_the_commit_dirty_and_results_do_not(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "results").mkdir()
    (repo / "pkg" / "code.py").write_text("x = 1\n")
    (repo / "models.py").write_text("y = 1\n")
    (repo / "results" / "history.jsonl").write_text("{}\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = _git(repo, "rev-parse", "HEAD")
    package = repo / "pkg"  # git_sha runs from inside the package, as vlbench does
    assert git_sha(package) == head
    (repo / "results" / "history.jsonl").write_text("{}\n{}\n")  # runs append here: still the commit's code
    (package / "untracked.py").write_text("")
    assert git_sha(package) == head
    (repo / "models.py").write_text("y = 2\n")  # code outside the package's folder counts too
    assert git_sha(package) == f"{head}-dirty"


def test_outside_a_repository_there_is_no_commit(tmp_path):
    assert git_sha(tmp_path) is None

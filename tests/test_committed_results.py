"""Committed results, reports and docs hold no absolute path of the machine that made them."""

from __future__ import annotations

import re
import subprocess

from .conftest import REPO

# An absolute path of a machine (home, temp, work or venv dirs), not a URL or a path inside a code example.
ABSOLUTE = re.compile(r"(?<![\w:/.])/(?:work|root|home|tmp|Users|private|mnt|opt|var/folders)/[\w.+-]+")
COMMITTED_OUTPUTS = ("docs", "benchmarks/results", "README.md", "pipelines")


def test_committed_outputs_hold_only_repo_relative_paths():
    files = subprocess.run(["git", "ls-files", *COMMITTED_OUTPUTS], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    texts = [f for f in files if f.endswith((".md", ".json", ".txt", ".csv"))]
    assert texts, "no committed results found: the test would check nothing"
    found = {}
    for name in texts:
        hits = ABSOLUTE.findall((REPO / name).read_text(errors="replace"))
        if hits:
            found[name] = sorted(set(hits))[:3]
    assert not found, f"absolute paths in committed outputs (make them repo-relative): {found}"

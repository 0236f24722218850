"""docs/support.md is what the tables say (scripts/support_matrix.py --check), and names every family."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_support_matrix_is_current():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "support_matrix.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_support_matrix_names_every_family():
    from trtconv.architectures import ARCHITECTURES

    text = (REPO / "docs" / "support.md").read_text(encoding="utf-8")
    assert all(f"| {a.hf_name} |" in text for a in ARCHITECTURES.values())

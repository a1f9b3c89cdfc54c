"""Paths the tests share: the repository root and the shared WikiText-2 files."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
WIKITEXT2_DIR = SHARED_DATA / "wikitext-2"

"""Paths the tests share: the repository root and the shared WikiText-2 files.

``BKEXP_TEST_DATA`` points at another folder holding ``wikitext-2/{valid,test}.txt`` (the Docker test service
sets it to the mounted ./data folder).
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BKEXP_TEST_DATA") or REPO_ROOT.parent / "shared" / "data").resolve()
WIKITEXT2_DIR = SHARED_DATA / "wikitext-2"

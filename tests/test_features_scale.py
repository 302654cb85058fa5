"""The scale benchmark, small: 20,000 x 64 rows written, SIGKILLed mid-way, resumed, read back."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` lives at the repo root, outside the installed package
    sys.path.insert(0, str(REPO))

from benchmarks import feature_cache_scale  # noqa: E402


@pytest.mark.slow  # a killed fresh process
def test_killed_fill_resumes_with_only_the_missing_rows_and_reads_back_exactly(tmp_path):
    rows = 20_000
    assert feature_cache_scale.main(["--rows", str(rows), "--dim", "64", "--batch", "500", "--tower-ms", "20",
                                     "--flush-every-s", "0", "--classes", "4", "--out", str(tmp_path),
                                     "--workdir", str(tmp_path / "cache"), "--name", "small"]) == 0
    r = json.loads((tmp_path / "small.json").read_text())
    killed = r["interrupted"]
    assert killed["exit_code"] == -9  # SIGKILL
    assert 0 < killed["rows_marked_filled"] < rows  # interrupted mid-way, with progress on disk
    assert r["resume"]["filled_before"] == killed["rows_marked_filled"]
    assert r["resume"]["computed"] == rows - killed["rows_marked_filled"] and r["resume"]["complete"]
    for order in ("sequential", "shuffled"):  # every row read through the loader, equal to its hash
        assert r["read"][order] == {**r["read"][order], "rows": rows, "rows_wrong": 0}
    assert r["array_file_bytes"] == rows * 64 * 2 + 128  # float16 rows + the .npy header
    assert (tmp_path / "small.md").is_file()

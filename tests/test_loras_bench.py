"""bench/loras runs its four rows on the tiny model and says what it did (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_the_four_rows_in_one_run() -> None:
    out = subprocess.run([sys.executable, str(BENCH / "loras"), "--json", "--repeat", "1", "--rank", "4"], cwd=BENCH,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    rows = {row["job"]: row for row in result["rows"]}
    assert list(rows) == ["no LoRA", "new LoRA (download + load)", "cached on disk (load)", "still loaded"]
    assert rows["no LoRA"]["lora_ms"] == 0 and all(r["lora_ms"] > 0 for r in result["rows"][1:])
    assert result["downloads"] == 2 and result["adapter loads"] == 3  # new, the other, and back from disk
    assert result["adapter bytes loaded now"] > 0

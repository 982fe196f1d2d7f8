"""The docs list exactly the settings and input fields the code reads, with its defaults."""

from __future__ import annotations

import re
from pathlib import Path

from qwen_edit_worker.schema import FIELDS
from qwen_edit_worker.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_DOC = ROOT / "docs" / "settings.md"  # the Settings table
API_DOC = ROOT / "docs" / "api.md"  # the Job input table


def table_rows(doc: Path, heading: str) -> dict[str, str]:
    section = doc.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Za-z_]+)`(?:, `[a-z]+`)? \| ([^|]*) \|", section, re.M)
    names = re.findall(r"^\| `([A-Za-z_]+)`, `([a-z]+)`", section, re.M)
    out = {name: default.strip() for name, default in rows}
    out.update({second: out[first] for first, second in names})
    return out


def test_settings_table_matches_code() -> None:
    rows = table_rows(SETTINGS_DOC, "# Settings")
    assert set(rows) == set(SETTINGS)
    for name, (default, _) in SETTINGS.items():
        if default:
            assert rows[name] == f"`{default}`", name


def test_input_table_matches_schema() -> None:
    assert set(table_rows(API_DOC, "## Job input")) == set(FIELDS)

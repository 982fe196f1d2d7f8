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


# Links: every relative link in the docs names a file that exists and, with an anchor, a heading in it.
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "client" / "README.md"]
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.M | re.S)  # fenced code: no links, no headings
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link's text only
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a markdown text; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", FENCE.sub("", text), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(f"{base}-{n}" if n else base)
    return out


def broken_links(doc: Path) -> list[str]:
    """The relative links in `doc` whose file or heading does not exist; http(s) links are not fetched."""
    text = FENCE.sub("", doc.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code: `[a](b)` there is not a link
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, http:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{doc.name}: {target} (no file {path})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{doc.name}: {target} (no heading #{anchor} in {file.name})")
    return broken


def test_every_relative_link_resolves() -> None:
    assert [doc for doc in DOCS if not doc.exists()] == []
    assert [b for doc in DOCS for b in broken_links(doc)] == []


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    twice = "## Step 1: build (the `image`)\n\n"
    (tmp_path / "other.md").write_text("# Other page\n\n" + twice + twice)
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Title\n\n## A heading\n\n"
        "[ok](other.md) [ok](other.md#step-1-build-the-image) [ok](other.md#step-1-build-the-image-1)\n"
        "[ok](#a-heading) [ok](./other.md)\n"
        "[web](https://example.com/none#x) `[code](missing.md)`\n\n```\n[fenced](missing.md)\n# not a heading\n```\n"
        "[bad](missing.md) [bad](other.md#step-1-build-the-image-2) [bad](#not-a-heading) [bad](other.md#Other-page)\n")
    assert broken_links(doc) == [
        "doc.md: missing.md (no file missing.md)",
        "doc.md: other.md#step-1-build-the-image-2 (no heading #step-1-build-the-image-2 in other.md)",
        "doc.md: #not-a-heading (no heading #not-a-heading in doc.md)",
        "doc.md: other.md#Other-page (no heading #Other-page in other.md)",
    ]

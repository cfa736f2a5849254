"""The documentation's relative links resolve: every linked file exists, every #anchor names a heading.

Pure text processing, no network: external links (http, https, mailto) are not followed. Anchors follow
GitHub's slug rule, so a link that passes here lands on its heading when the docs are read on GitHub.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Generated from the code by a separate step; links into it are checked once the folder exists.
REFERENCE = DOCS / "reference"
README_MAX_BYTES = 15_000
EXTERNAL = ("http://", "https://", "mailto:")

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), with an optional "title"; the text may hold code or nested brackets.
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)=["']([^"']+)["']""", re.IGNORECASE)
# ATX headings only: the docs use no setext (underlined) headings.
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md"]
    if (ROOT / "CONTRIBUTING.md").exists():
        files.append(ROOT / "CONTRIBUTING.md")
    files += sorted(DOCS.rglob("*.md"))
    return files


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks: a # or a [x](y) in a code block is code, not markdown."""
    lines, fence = [], ""
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if match:
            marker = match.group(1)
            if not fence:
                fence = marker
            elif marker[0] == fence[0] and len(marker) >= len(fence):
                fence = ""
            continue
        if not fence:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text, before duplicates are numbered."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text)
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page's headings make; a repeated slug gets -1, -2, … in order, as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link on a page, code spans and code blocks left out."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("", line)
        targets = INLINE_LINK.findall(line) + HTML_LINK.findall(line)
        definition = REFERENCE_DEF.match(line)
        if definition:
            targets.append(definition.group(1))
        out += [(number, target) for target in targets]
    return out


def broken_links() -> list[str]:
    problems = []
    anchor_cache: dict[Path, set[str]] = {}
    for page in markdown_files():
        where = page.relative_to(ROOT)
        for number, target in links(page):
            if not target or target.lower().startswith(EXTERNAL):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / unquote(file_part)).resolve() if file_part else page
            if not resolved.is_relative_to(ROOT):
                problems.append(f"{where}:{number}: {target} leaves the repository")
                continue
            if resolved.is_relative_to(REFERENCE) and not REFERENCE.exists():
                continue
            if not resolved.exists():
                problems.append(f"{where}:{number}: {target}: no such file")
                continue
            if not anchor:
                continue
            if resolved.suffix != ".md":
                problems.append(f"{where}:{number}: {target}: an anchor into a file that is not markdown")
                continue
            if resolved not in anchor_cache:
                anchor_cache[resolved] = anchors(resolved)
            if unquote(anchor) not in anchor_cache[resolved]:
                problems.append(f"{where}:{number}: {target}: no heading makes #{anchor}")
    return problems


def test_relative_links_resolve() -> None:
    problems = broken_links()
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_stays_short() -> None:
    # The README is the first screen a visitor reads; everything longer belongs on a page under docs/.
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail to docs/ (limit {README_MAX_BYTES})"


def test_slug_rule() -> None:
    assert slug("Reliability: no accepted job is lost, stuck or run twice") == (
        "reliability-no-accepted-job-is-lost-stuck-or-run-twice"
    )
    assert slug("Tiers: API, inference and training from one codebase") == (
        "tiers-api-inference-and-training-from-one-codebase"
    )
    assert slug("The `adaptery` command_line") == "the-adaptery-command_line"
    assert slug("A [linked](other.md#x) heading") == "a-linked-heading"


def test_duplicate_headings_are_numbered(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Limits\n\n```\n# Limits\n```\n\n## Limits\n\n## Limits\n", encoding="utf-8")
    assert anchors(page) == {"limits", "limits-1", "limits-2"}

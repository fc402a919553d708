"""The user documentation holds together: every relative link points at a file (and heading) that exists, and the
README stays a short page for users."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
        REPO / "benchmarks" / "experiments" / "README.md"]

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(text: str) -> str:
    """The text outside fenced code blocks (links there are examples, not links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text(encoding="utf-8")))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def dead_links(path: Path) -> list[str]:
    dead = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: …
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            dead.append(f"{target} (no such file: {dest})")
        elif anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
            dead.append(f"{target} (no heading '#{anchor}' in {dest.name})")
    return dead


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_at_an_existing_file(doc):
    assert doc.is_file(), f"{doc} is missing"
    assert links(doc), f"{doc} links to nothing: the link pattern no longer matches"
    assert dead_links(doc) == [], f"dead links in {doc.relative_to(REPO)}"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it ≤ {README_MAX_LINES} " \
                                           "and move detail to docs/"


def test_the_checker_finds_dead_links_and_anchors(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n\ntext\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](there.md) [ok](there.md#a-heading) [web](https://example.com/x)\n"
                   "[gone](missing.md) [bad anchor](there.md#nope) ![img](pic.png)\n"
                   "```\n[in code](also-missing.md)\n```\n", encoding="utf-8")
    dead = dead_links(doc)
    assert len(dead) == 3 and any("missing.md" in d for d in dead) and any("#nope" in d for d in dead) \
        and any("pic.png" in d for d in dead) and not any("also-missing" in d for d in dead)

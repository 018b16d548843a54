"""The README stays a short front page: at most 6 KB, and every relative link in it leads to a file
of the repository (the reference lives under docs/, which `mkdocs build --strict` checks)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_BYTES = 6 * 1024

# Inline links and images, [text](target "title") and ![alt](target), and reference definitions [id]: target.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INDENTED_CODE = re.compile(r"^(?: {4}|\t).*$", re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def prose(markdown: str) -> str:
    """The text outside code blocks and code spans, where a bracket is a link."""
    for pattern in (FENCE, INDENTED_CODE, CODE_SPAN):
        markdown = pattern.sub("", markdown)
    return markdown


def relative_links(markdown: str) -> list[str]:
    text = prose(markdown)
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [target for target in targets if not urlsplit(target).scheme and not target.startswith(("#", "//"))]


def test_readme_is_at_most_6_kb() -> None:
    size = len(README.read_bytes())
    assert size <= MAX_BYTES, f"README.md is {size} bytes, over {MAX_BYTES}: move reference material under docs/"


def test_every_relative_link_in_the_readme_leads_to_a_file() -> None:
    links = relative_links(README.read_text(encoding="utf-8"))
    assert links, "the README links into docs/"
    missing = [link for link in links if not (ROOT / unquote(urlsplit(link).path)).exists()]
    assert missing == [], f"README.md links to paths that do not exist: {missing}"


def test_the_link_finder_sees_links_and_skips_code_and_urls() -> None:
    sample = (
        "See [docs](docs/index.md#top), ![shot](docs/img/a%20b.png) and [site](https://example.org/x).\n"
        "[ref]: benchmarks/RESULTS.md\n"
        "`[not](a/link.md)`\n"
        "    [indented](code.md)\n"
        "```\n[fenced](code.md)\n```\n"
        "[anchor](#install)\n"
    )
    assert relative_links(sample) == ["docs/index.md#top", "docs/img/a%20b.png", "benchmarks/RESULTS.md"]

"""The README and docs/ stay usable: every relative link resolves, the README stays short, and its
set-up commands are the ones CI runs (``.ci/run`` installs exactly as the README says)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 300

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def link_targets(markdown: str) -> list[str]:
    """Targets of ``[text](target)`` and ``![alt](target)``, outside code blocks and code spans."""
    prose = CODE_SPAN.sub("", FENCE.sub("", markdown))
    return LINK.findall(prose)


def broken_links(markdown: str, base: Path) -> list[str]:
    """Relative targets (anchor dropped) that name no existing file or folder under ``base``."""
    broken = []
    for target in link_targets(markdown):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path = target.split("#", 1)[0]
        if not (base / path).exists():
            broken.append(target)
    return broken


def test_broken_links_finds_a_missing_file_and_skips_anchors_urls_and_code(tmp_path):
    (tmp_path / "there.md").write_text("x")
    text = ("[ok](there.md#a-section) [gone](missing.md) [anchor](#top) [web](https://example.org)\n"
            "`[span](nope.md)`\n```\n[fenced](nope2.md)\n```\n![img](missing.png)\n")
    assert broken_links(text, tmp_path) == ["missing.md", "missing.png"]


@pytest.mark.parametrize("page", [README] + DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(page):
    assert broken_links(page.read_text(), page.parent) == []


def test_docs_has_an_index_linking_every_page():
    index = ROOT / "docs" / "README.md"
    linked = {t.split("#", 1)[0] for t in link_targets(index.read_text())}
    assert {p.name for p in DOCS if p != index} <= linked


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= MAX_README_LINES


def test_readme_setup_commands_are_the_ones_ci_runs():
    readme = README.read_text()
    first_block = FENCE.search(readme).group(0).splitlines()
    commands = [line.split("#", 1)[0].strip() for line in first_block[1:-1]]
    assert commands == ["make train", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M), ".ci/run must run the README's test command"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^train:", makefile, re.M) and re.search(r"^test:", makefile, re.M)

"""The documentation a user needs ships in the repository: every `docs/<page>.md` that a file
cites exists, with the section it names; links between the pages resolve; and no file cites the
design notes by their old bare names (ALGORITHM.md, DESIGN.md, STYLE.md), which are not in the
repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".yaml", ".yml"}
SKIP_DIRS = {"demo", "runs", "data", "build", "dist", "__pycache__"}
# docs/<page>.md, optionally followed by the section it points to: docs/design.md "Loader"
REFERENCE = re.compile(r'docs/([A-Za-z0-9_-]+\.md)(?:,? "([^"]+)")?')
OLD_NAMES = re.compile(r"(?<![\w/.-])(ALGORITHM|DESIGN|STYLE)(\.md|'s\b|\))")
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")


def text_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name == "Makefile"):
            found.append(path)
    return found


def headings(page: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]


def references() -> list[tuple[Path, str, str | None]]:
    return [(path, page, section) for path in text_files()
            for page, section in REFERENCE.findall(path.read_text(errors="replace"))
            if path.name != "test_docs.py"]


def test_the_user_pages_exist():
    for page in ("algorithm.md", "design.md", "hardware.md", "contributing.md"):
        assert (ROOT / "docs" / page).is_file(), page


def test_every_docs_reference_names_a_page_and_section_that_exist():
    refs = references()
    assert len(refs) >= 20  # the code cites the pages throughout
    missing = []
    for path, page, section in refs:
        target = ROOT / "docs" / page
        where = path.relative_to(ROOT)
        if not target.is_file():
            missing.append(f"{where}: docs/{page} does not exist")
        elif section and not any(h.startswith(section) for h in headings(target)):
            missing.append(f'{where}: docs/{page} has no section "{section}"')
    assert not missing, "\n".join(missing)


def test_no_file_cites_the_old_bare_names():
    found = [f"{path.relative_to(ROOT)}: {match.group(0)}" for path in text_files()
             if path.name != "test_docs.py"
             for match in OLD_NAMES.finditer(path.read_text(errors="replace"))]
    assert not found, "cite docs/algorithm.md, docs/design.md or docs/contributing.md instead:\n" + "\n".join(found)


@pytest.mark.parametrize("page", ["README.md", *[f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))]])
def test_markdown_links_between_pages_resolve(page):
    source = ROOT / page
    broken = [link for link in LINK.findall(source.read_text()) if not (source.parent / link).is_file()]
    assert not broken, f"{page}: broken links {broken}"

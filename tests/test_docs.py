"""The documentation holds together: a short README, links that resolve, every docs page reachable
from the README, and a command table that names only commands `sfd --help` lists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)   # code is not a link
    return LINK.findall(text)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_readme_is_a_front_door():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 300, f"README.md has {n} lines; move detail into docs/ (limit 300)"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):        # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    assert DOCS, "docs/ holds no pages"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def _help_subcommands(capsys) -> set[str]:
    from sfd.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    section = out.split("COMMAND", 2)[-1].split("options:")[0]      # the listing under 'positional arguments'
    return set(re.findall(r"^ {4}([a-z][a-z0-9-]*)", section, flags=re.M))


def test_cli_page_names_only_real_subcommands_and_all_of_them(capsys):
    real = _help_subcommands(capsys)
    assert {"forget", "sample", "evaluate"} <= real, f"could not read the subcommands from sfd --help: {real}"
    named = set(re.findall(r"`sfd ([a-z][a-z0-9-]*)", (REPO / "docs" / "cli.md").read_text(encoding="utf-8")))
    assert named - real == set(), f"docs/cli.md names commands sfd --help does not list: {sorted(named - real)}"
    assert real - named == set(), f"sfd --help lists commands docs/cli.md does not describe: {sorted(real - named)}"

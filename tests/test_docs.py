"""The docs cannot drift from the code: docs/configuration.md lists every config key with the dataclass's
default, every docs page is reachable from the README, and every relative link points to a file."""

import functools
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from selfreward.run.config import Config, all_keys

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"```.*?```", re.DOTALL)
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)  # code is shown, not followed


def _generator():
    spec = importlib.util.spec_from_file_location("make_configuration", DOCS / "make_configuration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _links(page: Path) -> list[str]:
    return LINK.findall(CODE.sub("", page.read_text(encoding="utf-8")))


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#+ (.+)$", FENCED.sub("", page.read_text(encoding="utf-8")), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _relative(target: str) -> bool:
    return not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")


def test_configuration_page_lists_every_key_with_its_default():
    generator = _generator()
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    reference = text.split(generator.BEGIN, 1)[1].split(generator.END, 1)[0]
    rows = []
    for line in reference.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0].startswith("`"):
            rows.append((cells[0].strip("`"), cells[1].strip("`").replace("\\|", "|")))
    page = dict(rows)
    assert len(page) == len(rows), "a key is listed twice"
    assert sorted(set(all_keys()) - set(page)) == [], "keys missing from docs/configuration.md"
    assert sorted(set(page) - set(all_keys())) == [], "keys in docs/configuration.md that the config lacks"
    for key, written in page.items():
        assert yaml.safe_load(written) == functools.reduce(getattr, key.split("."), Config()), key


def test_configuration_page_is_what_its_generator_writes():
    generator = _generator()
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert generator.page_with(text, generator.reference()) == text, "run: python docs/make_configuration.py"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / target.split("#")[0]).resolve() for target in _links(REPO / "README.md") if _relative(target)}
    assert [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_a_file(page):
    broken = []
    for target in filter(_relative, _links(page)):
        path, _, anchor = target.partition("#")
        file = page.parent / path
        if not file.exists() or (anchor and anchor not in _anchors(file)):
            broken.append(target)
    assert broken == []

"""The docs cannot drift from the code: docs/configuration.md lists every config key with the dataclass's
default."""

import functools
import importlib.util
import re
from pathlib import Path

import yaml

from selfreward.config import Config, all_keys

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("make_configuration", DOCS / "make_configuration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

"""The docs stay true without anyone remembering to check: docs/recipes.md is what the schema generates, and
every relative link in the README and docs/ reaches a file (and heading) that exists."""

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from longtune.train.recipe import Recipe
from longtune.train.recipe_docs import recipe_docs_markdown

ROOT = Path(__file__).resolve().parent.parent
LINKED_PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_recipes_md_is_generated_from_the_schema():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    assert doc == recipe_docs_markdown(), "docs/recipes.md is out of date with the schema: run `make docs`"


def test_every_recipe_key_is_listed_once():
    doc = recipe_docs_markdown()

    def keys(cls, prefix=""):
        for name, field in cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from keys(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    for key in keys(Recipe):
        assert doc.count(f"| `{key}` |") == 1, key


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}"

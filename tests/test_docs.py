"""The docs name code that exists: every `acrl.x.y` reference in README.md and docs/ resolves."""

import importlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
REF = re.compile(r"`(acrl(?:\.\w+)+)")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_dotted_acrl_reference_in_the_docs_resolves():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("research/*.md"))]
    refs = {(p.name, m) for p in docs for m in REF.findall(p.read_text(encoding="utf-8"))}
    assert len(refs) > 20
    assert sorted(r for r in refs if not _resolves(r[1])) == []


def test_every_source_path_in_the_docs_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("research/*.md"))]
    paths = {(p.name, m) for p in docs for m in re.findall(r"(?:src|tests|benchmarks)/[\w/.-]+\.py", p.read_text())}
    assert paths
    assert sorted(r for r in paths if not (ROOT / r[1]).exists()) == []

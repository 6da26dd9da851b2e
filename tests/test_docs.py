"""The math the code cites lives in the repository: every ``docs/algorithms.md §n`` citation names a section that
exists, and nothing cites a document the repository does not contain."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = [
    *ROOT.glob("kldwrm_fast/**/*.py"), *ROOT.glob("csrc/*"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py"),
    *ROOT.glob("tools/*.py"), ROOT / "README.md",
]  # fmt: skip
TEXT = {".py", ".md", ".h", ".cu", ".cpp"}
CITATION = re.compile(r"docs/algorithms\.md §(\d+(?:\.\d+)?)(?:[–-]§?(\d+(?:\.\d+)?))?")


def sections() -> set[str]:
    text = (ROOT / "docs" / "algorithms.md").read_text()
    numbers = set(re.findall(r"^## (\d+)\.", text, flags=re.MULTILINE))
    return numbers | set(re.findall(r"^\*\*(\d+\.\d+) ", text, flags=re.MULTILINE))


def citations() -> list[tuple[str, str]]:
    found = []
    for path in SOURCES:
        if path.is_file() and path.suffix in TEXT:
            for match in CITATION.finditer(path.read_text()):
                found += [(path.name, number) for number in match.groups() if number]
    return found


def test_every_cited_section_exists():
    known, cited = sections(), citations()
    assert {"1", "2", "3", "4", "5", "6", "6.1", "6.4", "7"} <= known
    assert len(cited) > 30
    missing = [(name, number) for name, number in cited if number not in known]
    assert not missing, missing


def test_no_file_cites_the_external_spec():
    texts = [path for path in SOURCES if path.is_file() and path.suffix in TEXT and path != pathlib.Path(__file__)]
    offenders = [path.name for path in texts if "SPEC " + "§" in path.read_text()]
    assert not offenders, offenders

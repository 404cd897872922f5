"""Every measured figure in the docs cites the benchmark record it comes from, and holds its number.

Citation syntax: the figure is a Markdown link to the record, the JSON key path after `#`:

    [5.28x](results/bench_throughput-20250301T120000Z-0123456789.json#results.policies.0.speedups.ours_vs_one_by_one)

The path is relative to the Markdown file (as any link); the key path walks dicts by key and
lists by index, separated by dots (a key that holds dots itself, such as a policy string with
`ratio=0.5`, is matched whole). The link text starts with the number as shown (thousands
commas allowed); it must equal the recorded value rounded to the decimals shown. A `%` right
after the number compares against the value x 100; an explicit `*N` at the end of the key
path (e.g. `...ttft_mean_s*1000` for a figure in ms) scales by N instead. The record must be
committed in a clean tree's commit, so the figure can be re-measured from it.

Measured figures written without a citation (a number with tok/s, GB/s, GFLOP/s or ms, or
"N x faster/slower") fail the test too, outside code blocks; so does diary text (a numbered
"session N" or "round N": the docs describe the project, not the story of its making).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CITING_DOCS = ("README.md", "benchmarks/README.md")  # figures allowed, each cited
NO_TIMING_DOCS = ("docs/architecture.md",)  # the design: no timings at all
DIARY_DOCS = CITING_DOCS + NO_TIMING_DOCS  # plus every other file under docs/

LINK = re.compile(r"\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+\.json(?:#[^)\s]*)?)\)")
NUMBER = re.compile(r"\s*[~≈]?\s*(?P<sign>[+\-−]?)(?P<num>\d[\d,]*(?:\.\d+)?)(?P<pct>\s*%)?")
UNCITED = re.compile(r"\d[\d,]*(?:\.\d+)?\s*(?:tok/s|tokens/s|GB/s|GFLOP/s|ms\b|x (?:faster|slower))")
DIARY = re.compile(r"\bsessions? \d+|\bthis (?:round|session)\b|\bround \d+", re.IGNORECASE)


class CitationError(AssertionError):
    pass


def strip_code(markdown: str) -> str:
    """The text outside fenced code blocks and inline code (commands may hold any number)."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def citations(markdown: str) -> list[tuple[str, str]]:
    """(link text, target) of every link to a .json file."""
    return [(m["text"], m["target"]) for m in LINK.finditer(strip_code(markdown))]


def lookup(record: dict, key_path: str):
    """The value at `key_path`: list indices and dict keys between dots, the longest key first
    where a key itself holds dots."""
    value, parts = record, key_path.split(".")
    while parts:
        if isinstance(value, list):
            part = parts.pop(0)
            if not part.isdigit() or int(part) >= len(value):
                raise CitationError(f"no index {part!r} in a list of {len(value)} (key path {key_path})")
            value = value[int(part)]
        elif isinstance(value, dict):
            n = next((n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in value), 0)
            if n == 0:
                raise CitationError(f"no key {parts[0]!r} (key path {key_path}); there are {sorted(value)[:12]}")
            value, parts = value[".".join(parts[:n])], parts[n:]
        else:
            raise CitationError(f"{parts[0]!r} goes into a {type(value).__name__} (key path {key_path})")
    return value


def check_citation(text: str, target: str, base: Path) -> None:
    """One citation: the record exists, is a clean commit's record, and holds the number shown."""
    path, _, fragment = target.partition("#")
    file = (base / path).resolve()
    if not file.is_file():
        raise CitationError(f"cited record {path} does not exist")
    record = json.loads(file.read_text())
    for key in ("benchmark", "command", "date", "machine", "threads", "timings", "baseline_timings"):
        if key not in record:
            raise CitationError(f"{path} is not a benchmark record (no {key!r})")
    git = record.get("git") or {}
    if not git.get("commit") or git.get("dirty") is not False:
        raise CitationError(f"{path} was not measured on a clean commit (git {git}), so it cannot be re-run")
    if not fragment:
        return  # a link to the record as a whole, not a figure
    key_path, _, scale_text = fragment.partition("*")
    m = NUMBER.match(text)
    if m is None:
        raise CitationError(f"the text of [{text}]({target}) does not start with a number")
    scale = float(scale_text) if scale_text else (100.0 if m["pct"] else 1.0)
    value = lookup(record, key_path)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CitationError(f"{path}#{key_path} is {value!r}, not a number")
    decimals = len(m["num"].partition(".")[2])
    shown = float(m["num"].replace(",", "")) * (-1 if m["sign"] in "-−" and m["sign"] else 1)
    if float(f"{value * scale:.{decimals}f}") != shown:
        raise CitationError(f"[{text}] shows {shown:.{decimals}f} but {path}#{fragment} holds {value * scale!r} "
                            f"({value * scale:.{decimals}f} at {decimals} decimals)")


def check_document(markdown: str, base: Path) -> int:
    """Every citation in `markdown` (links relative to `base`); the number checked."""
    found = citations(markdown)
    for text, target in found:
        check_citation(text, target, base)
    return len(found)


def uncited_figures(markdown: str) -> list[str]:
    """Measured-looking figures outside code and outside citation links."""
    text = LINK.sub("", strip_code(markdown))
    return [m.group(0) for m in UNCITED.finditer(text)]


# ---- the real documents --------------------------------------------------------------------


@pytest.mark.parametrize("doc", CITING_DOCS)
def test_every_cited_record_exists_and_holds_the_quoted_number(doc):
    path = ROOT / doc
    check_document(path.read_text(), path.parent)  # zero citations is fine: nothing quoted, nothing to trace


@pytest.mark.parametrize("doc", CITING_DOCS + NO_TIMING_DOCS)
def test_no_measured_figure_goes_uncited(doc):
    text = (ROOT / doc).read_text()
    if doc in NO_TIMING_DOCS:
        text = LINK.sub("", text)  # the design documents cite nothing: every timing is uncited
    assert uncited_figures(text) == [], f"{doc}: cite a record for these (or move them to benchmarks/README.md)"


def test_no_document_reads_as_a_diary():
    docs = sorted({*DIARY_DOCS, *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))})
    hits = [(d, m.group(0)) for d in docs for m in DIARY.finditer((ROOT / d).read_text())]
    assert hits == []


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


# ---- the checker itself, on temporary markdown ---------------------------------------------


def write_record(folder: Path, name: str = "bench_x-20250101T000000Z-0123456789.json", **over) -> str:
    record = {"benchmark": "bench_x", "command": "python benchmarks/bench_x.py", "date": "2025-01-01T00:00:00Z",
              "machine": {"cpu": "Test CPU"}, "threads": 2, "timings": {}, "baseline_timings": {},
              "git": {"commit": "0123456789" * 4, "dirty": False},
              "results": {"rows": [{"tok_s": 1543.21, "ratio": 5.2849, "waste": 0.02293, "ttft_s": 0.1234}],
                          "evict:ratio=0.5": {"kept": 0.5}}}
    record.update(over)
    (folder / "results").mkdir(exist_ok=True)
    (folder / "results" / name).write_text(json.dumps(record))
    return f"results/{name}"


def test_a_correct_citation_passes_in_each_form(tmp_path):
    rec = write_record(tmp_path)
    md = (f"2a ran [1,543 tok/s]({rec}#results.rows.0.tok_s), [5.28x]({rec}#results.rows.0.ratio) one by one;"
          f" [2.29%]({rec}#results.rows.0.waste) idle; TTFT [123 ms]({rec}#results.rows.0.ttft_s*1000);"
          f" keeps [50%]({rec}#results.evict:ratio=0.5.kept); [the record]({rec})."
          "\n```\nkvcache bench 99 tok/s [9](missing.json#x)\n```\n")
    assert check_document(md, tmp_path) == 6
    assert uncited_figures(md) == []


@pytest.mark.parametrize("figure, key, message", [
    ("1,544 tok/s", "results.rows.0.tok_s", "shows 1544 but"),  # a wrong number
    ("5.29x", "results.rows.0.ratio", "shows 5.29 but"),  # rounded the wrong way
    ("2.3", "results.rows.0.waste", "shows 2.3 but"),  # a percentage without its %
    ("1,543 tok/s", "results.rows.0.speed", "no key 'speed'"),
    ("1,543 tok/s", "results.rows.1.tok_s", "no index '1'"),
    ("fast", "results.rows.0.tok_s", "does not start with a number"),
])
def test_a_wrong_citation_fails(tmp_path, figure, key, message):
    rec = write_record(tmp_path)
    with pytest.raises(CitationError, match=re.escape(message)):
        check_document(f"It ran [{figure}]({rec}#{key}).", tmp_path)


def test_a_missing_or_unclean_record_fails(tmp_path):
    with pytest.raises(CitationError, match="does not exist"):
        check_document("[5.3x](results/nowhere.json#results.ratio)", tmp_path)
    dirty = write_record(tmp_path, "dirty.json", git={"commit": "0123456789" * 4, "dirty": True})
    with pytest.raises(CitationError, match="clean commit"):
        check_document(f"[1,543]({dirty}#results.rows.0.tok_s)", tmp_path)
    other = write_record(tmp_path, "other.json")
    (tmp_path / other).write_text(json.dumps({"rows": [1.0]}))
    with pytest.raises(CitationError, match="not a benchmark record"):
        check_document(f"[1.0]({other}#rows.0)", tmp_path)


def test_figures_without_a_citation_and_diary_text_are_found():
    assert uncited_figures("Batched it runs 1,543 tok/s and 5.3x faster; a step takes 10.5 ms.") == [
        "1,543 tok/s", "5.3x faster", "10.5 ms"]
    assert uncited_figures("Run `bench --x  # 99 tok/s` and see\n```\n99 tok/s\n```\n") == []
    work = "sess" + "ion"  # spelled in parts so this file does not itself read as a diary
    assert DIARY.search(f"Before {work} 10's kernels") and DIARY.search("measured this " + "round")
    assert not DIARY.search("a chat session keeps its cache")

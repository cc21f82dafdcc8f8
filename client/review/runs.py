"""A run folder as the review station sees it: the results of `inspect-dir`, the explanation
reports beside them, and the reviewers' decisions."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_FILE = "results.jsonl"


@dataclass
class Run:
    folder: Path
    rows: list[dict]  # one per cell: the Inspection's fields, or an error
    reports: dict[str, Path] = field(default_factory=dict)  # cell_id -> report.json of its explanation
    agreement: dict | None = None  # the explanation index's three-way agreement over the run

    @property
    def answered(self) -> list[dict]:
        return [r for r in self.rows if "verdict" in r]


def find_results(folder: Path) -> Path:
    """The results JSONL of a run folder (results.jsonl, else the only *.jsonl that is not the reviews)."""
    if folder.is_file():
        return folder
    if (folder / RESULTS_FILE).exists():
        return folder / RESULTS_FILE
    found = [p for p in folder.glob("*.jsonl") if p.name != "reviewed_labels.jsonl"]
    if len(found) != 1:
        raise FileNotFoundError(
            f"{folder} holds no {RESULTS_FILE} (write one with 'python -m client inspect-dir DIR --out "
            f"{folder}/{RESULTS_FILE} --explain')"
        )
    return found[0]


def load_run(folder: str | Path) -> Run:
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist")
    results = find_results(folder)
    rows = []
    for n, line in enumerate(results.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{results}:{n} is not JSON ({e})") from None
    reports, agreement = {}, None
    index = results.parent / "explain" / "index.json"
    if index.exists():
        held = json.loads(index.read_text())
        for entry in held.get("entries", []):
            reports[entry["cell_id"]] = index.parent / entry["json"]
        agreement = held.get("agreement")
    return Run(results.parent, rows, reports, agreement)


def filter_rows(
    rows: list[dict], verdicts=None, ct_classes=None, score_range=None, flagged_only: bool = False
) -> list[dict]:
    out = []
    for r in rows:
        if "verdict" not in r:
            continue
        if flagged_only and r["verdict"] == "normal":
            continue
        if verdicts and r["verdict"] not in verdicts:
            continue
        if ct_classes and r["ct_class"] not in ct_classes:
            continue
        if score_range and not score_range[0] <= r["rgb_score"] <= score_range[1]:
            continue
        out.append(r)
    return out


def refused_rows(rows: list[dict]) -> list[dict]:
    """The cells refused as not inspectable, answered (verdict 4) or refused by the preprocessing."""
    return [r for r in rows if r.get("refusal")]


def placement_table(placement: dict) -> dict[str, list]:
    """A refused row's placement facts as table columns: input, fact, value, the range the model
    accepts, and whether the value lies outside it."""
    table: dict[str, list] = {"input": [], "fact": [], "value": [], "accepted": [], "outside": []}
    for side, seen in placement.items():
        facts, ranges = seen.get("facts"), seen.get("ranges") or {}
        if facts is None:
            table["input"].append(side)
            table["fact"].append("battery")
            table["value"].append("not found")
            table["accepted"].append("")
            table["outside"].append(True)
            continue
        for fact, value in facts.items():
            lo, hi = ranges.get(fact, (None, None))
            table["input"].append(side)
            table["fact"].append(fact)
            table["value"].append(round(value, 3))
            table["accepted"].append("" if lo is None else f"{lo:.3f} to {hi:.3f}")
            table["outside"].append(fact in (seen.get("outside_facts") or []))
    return table

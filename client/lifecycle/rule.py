"""The promotion rule: may a staged release go live, and if not, why (client/lifecycle/promotion.yaml)."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

RULE_FILE = Path(__file__).with_name("promotion.yaml")


def load_rule(path: str | Path | None = None) -> dict:
    path = Path(path or RULE_FILE)
    try:
        rule = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the promotion rule {path}: {e}") from None
    if not isinstance(rule, dict) or "test" not in rule:
        raise ValueError(f"{path}: a promotion rule needs at least a test section (margins, min_cells)")
    return rule


def decide(comparison: dict, rule: dict) -> dict:
    """{"promote": bool, "reasons": [why not, ...], "checked": [what was checked, ...]}."""
    reasons, checked = [], []
    test = comparison.get("sets", {}).get("test")
    if test is None:
        reasons.append("no labelled test set was compared (--test): the rule needs one")
    else:
        _margins("test", test, rule["test"], reasons, checked, required=True)
    for name in ("reviewed",):
        part, spec = comparison.get("sets", {}).get(name), rule.get(name)
        if part is not None and spec:
            _margins(name, part, spec, reasons, checked, required=False)
    replay, spec = comparison.get("sets", {}).get("replay"), rule.get("replay") or {}
    if replay is not None and spec:
        c = replay["counts"]
        if c["cells"]:
            limit = float(spec.get("max_flip_rate", 1.0))
            checked.append(
                f"replay: {c['flips']} of {c['cells']} verdicts change ({c['flip_rate']:.1%}, limit {limit:.0%})"
            )
            if c["flip_rate"] > limit:
                reasons.append(f"replay: {c['flip_rate']:.1%} of recent line cells change verdict, over {limit:.0%}")
            more = (c["staged"]["refused"] - c["serving"]["refused"]) / c["cells"]
            limit = float(spec.get("max_refusal_increase", 1.0))
            checked.append(f"replay: refused share {more:+.1%} (limit +{limit:.0%})")
            if more > limit:
                reasons.append(
                    f"replay: the staged release refuses {more:+.1%} more recent line cells, over +{limit:.0%}"
                )
    return {"promote": not reasons, "reasons": reasons, "checked": checked}


def _margins(name: str, part: dict, spec: dict, reasons: list, checked: list, required: bool) -> None:
    cells, least = part["counts"]["cells"], int(spec.get("min_cells", 0))
    if cells < least:
        if required:
            reasons.append(f"{name}: {cells} cells, fewer than the {least} the rule needs")
        else:
            checked.append(f"{name}: {cells} cells, fewer than {least}: reported, not ruled on")
        return
    for metric, margin in (spec.get("margins") or {}).items():
        row = part["figures"].get(metric)
        if row is None:
            continue
        low, high = row["difference_ci95"]
        if row["higher_is_better"]:
            bound, ok, sign = low, low >= -margin, "lower"
        else:
            bound, ok, sign = high, high <= margin, "upper"
        if math.isnan(bound):
            checked.append(f"{name} {metric}: not defined on these cells")
            continue
        text = (
            f"{name} {metric}: staged {row['staged']:.3f} vs serving {row['serving']:.3f}, difference "
            f"{row['difference']:+.3f} [{low:+.3f}, {high:+.3f}]; {sign} bound {bound:+.3f}, margin {margin}"
        )
        checked.append(text)
        if not ok:
            reasons.append(text + " (may be worse than the margin allows)")

"""Why a cell was refused, in a line engineer's words, and what the battery search saw.

A cell is refused (not inspectable) in two places: the preprocessing refuses an image whose
battery the search did not find, or found placed as no training image had it (the server
answers that cell with INVALID_ARGUMENT and a sentence such as "photo: not inspectable as
placed: the battery touches 75% of the frame's sides, where the model knows 0%-50% ..."), and
the networks refuse an image that does not look like their training data (verdict 4,
`CT_OOD` / `RGB_OOD` >= 1). `inspect-dir` writes both as a `refusal` in the result row, with
the five placement facts of each image (`placement`) and the ranges the served models accept,
so that a row says what to look at on the station.
"""

from __future__ import annotations

import math

from core.decode import ImageError
from core.preprocess import FRAME_FACTS, FRAME_WORDS, encoded_ct_input, encoded_rgb_input


def _facts(data: bytes, side: str, size: int) -> dict | None:
    found: list = []
    try:
        if side == "ct":
            encoded_ct_input(data, size, facts_out=found)
        else:
            encoded_rgb_input(data, size, facts_out=found)
    except (ImageError, ValueError):
        return None
    return found[0] if found else None


def why(row: dict) -> str:
    """A short key of a refused row's cause, to count refusals by: "photo: placement (edge)",
    "CT slice: out of distribution", "photo: no battery found"."""
    text, keys = row.get("refusal", ""), []
    for what, name in (("CT slice", "ct"), ("photo", "photo")):
        if f"{what} out of distribution" in text:
            keys.append(f"{what}: out of distribution")
        elif text.startswith(what) or f"; {what}:" in text:
            facts = ((row.get("placement") or {}).get(name) or {}).get("outside_facts") or ["?"]
            cause = "no battery found" if "no battery found" in text else "blank" if "is blank" in text else None
            keys.append(f"{what}: {cause or 'placement (' + ', '.join(facts) + ')'}")
    return "; ".join(keys) or "other"


def placement(ct: bytes, rgb: bytes, info: dict | None) -> dict:
    """What the served battery search sees in each image of a cell: {"ct": {...}, "photo": {...}},
    each with the five facts (None: nothing found), the ranges the served model accepts (from its
    serving facts `info`, when known) and the facts outside them, in words."""
    out = {}
    for side, name, data in (("ct", "ct", ct), ("rgb", "photo", rgb)):
        facts = info.get(side) if info else None
        size = getattr(facts, "input_size", None) or 128
        frame = getattr(facts, "frame", None) or {}
        ranges = frame.get("ranges") or {}
        seen = _facts(data, side, size)
        outside, names = [], []
        if seen is not None:
            for fact in FRAME_FACTS:
                lo, hi = ranges.get(fact, (None, None))
                if lo is not None and not lo <= seen[fact] <= hi:
                    sentence, number = FRAME_WORDS[fact]
                    value = math.exp(seen[fact]) if fact == "aspect" else seen[fact]  # shown as width : height
                    outside.append(sentence.format(number.format(value)))
                    names.append(fact)
        out[name] = {
            "facts": None if seen is None else {k: round(float(v), 4) for k, v in seen.items()},
            "ranges": {k: [round(float(lo), 4), round(float(hi), 4)] for k, (lo, hi) in ranges.items()},
            "outside": outside if seen is not None else ["no battery found"],
            "outside_facts": names,
        }
    return out

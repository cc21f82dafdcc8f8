"""Contact sheet of a data set: every CT class and both RGB defect kinds, polygons outlined."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from core.aihub import CTRecord, Dataset, RGBRecord
from core.labels import CT_CLASSES

TILE = 256
COLOURS = {
    "Porosity": (255, 40, 40),
    "Resin overflow": (255, 160, 0),
    "Damaged": (255, 40, 40),
    "Pollution": (255, 220, 0),
}


def _tile(record: CTRecord | RGBRecord, caption: str, crop_to_defect: bool = False) -> Image.Image:
    with Image.open(record.path) as im:
        im = im.convert("RGB")
    draw = ImageDraw.Draw(im)
    width = max(1, im.width // 400)
    for d in record.defects:
        draw.polygon(d.xy(), outline=COLOURS[d.name], width=width)
    if crop_to_defect and record.defects:
        xs = [x for d in record.defects for x, _ in d.xy()]
        ys = [y for d in record.defects for _, y in d.xy()]
        cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
        half = max(max(xs) - min(xs), max(ys) - min(ys), im.width / 8) * 0.9
        im = im.crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half)))
    im.thumbnail((TILE, TILE))
    tile = Image.new("RGB", (TILE, TILE + 18), (20, 20, 20))
    tile.paste(im, ((TILE - im.width) // 2, (TILE - im.height) // 2))
    ImageDraw.Draw(tile).text((4, TILE + 3), caption[:42], fill=(230, 230, 230), font=ImageFont.load_default())
    return tile


def _pick(records, n):
    """Spread the picks over forms and axes rather than taking the first n."""
    by_kind: dict = {}
    for r in records:
        by_kind.setdefault((r.form, getattr(r, "axis", "")), []).append(r)
    groups = [by_kind[k] for k in sorted(by_kind)]
    out = []
    while len(out) < n and any(groups):
        for g in groups:
            if g and len(out) < n:
                out.append(g.pop(0))
    return out


def contact_sheet(ds: Dataset, out: str | Path, per_row: int = 6) -> Path:
    rows: list[tuple[str, list[Image.Image]]] = []
    for name in CT_CLASSES:
        members = [r for r in ds.ct if r.label == name]
        shown = [r for r in members if r.defects] if not name.endswith("normal") else members
        tiles = [
            _tile(r, f"{r.path.stem}") for r in _pick(shown, per_row // 2 if not name.endswith("normal") else per_row)
        ]
        if not name.endswith("normal"):  # full slice, then a zoom on its defect
            tiles = [
                t
                for r in _pick(shown, per_row // 2)
                for t in (
                    _tile(r, r.path.stem),
                    _tile(r, "zoom: " + ", ".join(sorted({d.name for d in r.defects})), True),
                )
            ]
        rows.append((f"CT {name}", tiles))
    rows.append(("RGB normal", [_tile(r, r.path.stem) for r in _pick([r for r in ds.rgb if r.is_normal], per_row)]))
    for kind in ("Damaged", "Pollution"):
        chosen = _pick([r for r in ds.rgb if any(d.name == kind for d in r.defects)], per_row // 2)
        tiles = [t for r in chosen for t in (_tile(r, r.path.stem), _tile(r, f"zoom: {kind}", True))]
        rows.append((f"RGB {kind}", tiles))
    label_w = 190
    sheet = Image.new("RGB", (label_w + per_row * (TILE + 4), len(rows) * (TILE + 22) + 4), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, (title, tiles) in enumerate(rows):
        y = 4 + i * (TILE + 22)
        draw.text(
            (6, y + TILE // 2),
            title if tiles else f"{title}\n(none in data set)",
            fill=(255, 255, 255),
            font=ImageFont.load_default(),
        )
        for j, t in enumerate(tiles[:per_row]):
            sheet.paste(t, (label_w + j * (TILE + 4), y))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out

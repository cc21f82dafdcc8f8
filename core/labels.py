"""The label vocabulary of the project: one definition, imported everywhere.

CT class order is part of the public interface (docs/interface.md): the classifier's
logits, `CT_PROBS` and every evaluation use this order.
"""

from __future__ import annotations

CT_CLASSES: tuple[str, ...] = (
    "cell_normal",
    "cell_porosity",
    "module_normal",
    "module_porosity",
    "module_resin_overflow",
)
CT_CLASS_INDEX = {name: i for i, name in enumerate(CT_CLASSES)}

BATTERY_TYPES: tuple[str, ...] = ("cell", "module")  # metadata value = index
SLICE_AXES: tuple[str, ...] = ("x", "y", "z")  # metadata value = index
FORMS: tuple[str, ...] = ("pouch", "cylindrical")

# Defect names as they appear in AI Hub label JSON.
CT_DEFECT_NAMES: tuple[str, ...] = ("Porosity", "Resin overflow")
RGB_DEFECT_NAMES: tuple[str, ...] = ("Damaged", "Pollution")

# A module takes the worst finding of all its slices: resin > porosity > normal.
_SEVERITY = {"normal": 0, "porosity": 1, "resin_overflow": 2}
_DEFECT_TO_FINDING = {"Porosity": "porosity", "Resin overflow": "resin_overflow"}


def finding_of(defect_name: str) -> str:
    """Map an AI Hub CT defect name to a class suffix ('porosity', 'resin_overflow')."""
    return _DEFECT_TO_FINDING[defect_name]


def worst_finding(findings) -> str:
    """The most severe of some findings; 'normal' for none."""
    return max(findings, key=_SEVERITY.__getitem__, default="normal")


def ct_class_name(battery_type: str, finding: str) -> str:
    """The 5-class label of a battery from its type and worst finding.

    A cell with resin overflow does not exist in the taxonomy (cells have no potting
    resin), so it is rejected rather than silently relabelled.
    """
    name = f"{battery_type}_{finding}"
    if name not in CT_CLASS_INDEX:
        raise ValueError(f"no CT class for a {battery_type} with {finding}")
    return name


def class_type(class_name: str) -> str:
    """'cell' or 'module' for a CT class name."""
    return class_name.split("_", 1)[0]


def class_finding(class_name: str) -> str:
    """'normal', 'porosity' or 'resin_overflow' for a CT class name."""
    return class_name.split("_", 1)[1]


# The CT classes that make a slice "defective" in the binary view the verdict uses.
CT_DEFECT_CLASSES: tuple[str, ...] = ("cell_porosity", "module_porosity", "module_resin_overflow")

"""The verdict rule and the public tensor interface: pure Python, no Triton import.

Used by the Triton `verdict` model, the client and offline evaluation alike, so the
server and every report decide a cell the same way.
"""

from core.interface import VERDICT_CODES, VERDICT_NAMES  # noqa: F401
from ensemble.rule import Decision, VerdictRule, decide, load_rule, verdict_code  # noqa: F401

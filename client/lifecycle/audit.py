"""The audit trail of a repository's releases: `audit.jsonl` beside its manifest, one JSON line
per stage, comparison, promotion, rollback or discard: when, who or what, which releases and
their checkpoints, what they were trained on, the comparison's figures and the rule's
decision, and how long the switch took. Appended only; a rebuild of the repository keeps it."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
from pathlib import Path

AUDIT_FILE = "audit.jsonl"


def actor(given: str | None = None) -> str:
    """Who acts: --by, else $BATTERY_ACTOR (a CI job, say), else user@host."""
    if given:
        return given
    if os.environ.get("BATTERY_ACTOR"):
        return os.environ["BATTERY_ACTOR"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def record(repository: str | Path, action: str, by: str, **fields) -> dict:
    entry = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "action": action, "by": by} | fields
    with open(Path(repository) / AUDIT_FILE, "a") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


def read(repository: str | Path) -> list[dict]:
    path = Path(repository) / AUDIT_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""The gateway's durable outbox (SQLite): every trigger is recorded before anything else happens.

A cell moves through

    pending   recorded from the PLC's trigger, not yet answered by the service
    answered  the service's verdict (or its refusal) is known, not yet on the PLC
    writing   being written to the PLC as ResultCounter = `counter`
    written   on the PLC

and survives a restart of the gateway in any of them: pending cells are sent to the service
again, answered ones written, and a `writing` cell is checked against the PLC (ResultCellId
and ResultCounter) so that a result the PLC already has is not written twice. A station's
cells are written in trigger order. One row per (station, cell id): a trigger for a cell the
outbox already holds is a repeat, answered from the outbox, never inspected or counted
again. Commits are synchronous (WAL, fsync) so that a power cut loses no recorded trigger.

A flagged cell to be explained is marked with its answer (`explain` = 1) and keeps its images
until its report is written (`explained`), so a restart explains the cells it had not yet.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    station TEXT NOT NULL,
    cell_id TEXT NOT NULL,
    battery_type REAL,
    slice_axis REAL,
    ct_path TEXT,
    rgb_path TEXT,
    ct_image BLOB,
    rgb_image BLOB,
    triggered_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'answered', 'writing', 'written')),
    verdict INTEGER,
    confidence REAL,
    error TEXT,
    answer TEXT,
    answered_at REAL,
    counter INTEGER,
    written_at REAL,
    repeats INTEGER NOT NULL DEFAULT 0,
    acked INTEGER NOT NULL DEFAULT 0,
    explain INTEGER NOT NULL DEFAULT 0,
    UNIQUE (station, cell_id)
);
CREATE INDEX IF NOT EXISTS cells_state ON cells (state, station, id);
"""
EXPLAIN_INDEX = "CREATE INDEX IF NOT EXISTS cells_to_explain ON cells (id) WHERE explain = 1"
STATES = ("pending", "answered", "writing", "written")


@dataclass
class Row:
    id: int
    station: str
    cell_id: str
    battery_type: float | None
    slice_axis: float | None
    ct_path: str | None
    rgb_path: str | None
    ct_image: bytes | None
    rgb_image: bytes | None
    triggered_at: float
    state: str
    verdict: int | None
    confidence: float | None
    error: str | None
    answer: str | None
    answered_at: float | None
    counter: int | None
    written_at: float | None
    repeats: int
    acked: int
    explain: int

    @property
    def meta(self) -> tuple[float, float]:
        return float(self.battery_type), float(self.slice_axis)

    @property
    def answer_dict(self) -> dict:
        return json.loads(self.answer) if self.answer else {}


class Outbox:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions below
        self.closed = False
        self.db.row_factory = lambda cur, row: Row(*row)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        if "explain" not in self._columns():  # an outbox from before explanations were kept in it
            self.db.execute("ALTER TABLE cells ADD COLUMN explain INTEGER NOT NULL DEFAULT 0")
        self.db.execute(EXPLAIN_INDEX)

    def _columns(self) -> set[str]:
        return {c[1] for c in self._plain("PRAGMA table_info(cells)")}

    def _plain(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows of a query that are not cells (counts, schema), as tuples."""
        cur = self.db.cursor()
        cur.row_factory = None
        return cur.execute(sql, args).fetchall()

    def close(self) -> None:
        self.db.close()
        self.closed = True

    def record(
        self,
        station: str,
        cell_id: str,
        meta: tuple[float, float],
        ct_path: str | None = None,
        rgb_path: str | None = None,
        ct_image: bytes | None = None,
        rgb_image: bytes | None = None,
        now: float | None = None,
    ) -> tuple[Row, bool]:
        """(row, new): the trigger recorded as a pending cell, or the row already held for this
        (station, cell id) with new False. Held but never acknowledged: the same trigger, seen
        again after a restart. Acknowledged and already written: the PLC asks again, and the
        stored answer is queued to be written again, without inspecting the cell again."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self._find(station, cell_id)
            if row is not None:
                if row.acked and row.state == "written":
                    self.db.execute("UPDATE cells SET state='answered', repeats=repeats+1 WHERE id=?", (row.id,))
                    row = self._find(station, cell_id)
                return row, False
            cur = self.db.execute(
                "INSERT INTO cells (station, cell_id, battery_type, slice_axis, ct_path, rgb_path, ct_image, "
                "rgb_image, "
                "triggered_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                (
                    station,
                    cell_id,
                    float(meta[0]),
                    float(meta[1]),
                    ct_path,
                    rgb_path,
                    ct_image,
                    rgb_image,
                    time.time() if now is None else now,
                ),
            )
            return self.get(cur.lastrowid), True

    def _find(self, station: str, cell_id: str) -> Row | None:
        return self.db.execute("SELECT * FROM cells WHERE station=? AND cell_id=?", (station, cell_id)).fetchone()

    def get(self, row_id: int) -> Row:
        return self.db.execute("SELECT * FROM cells WHERE id=?", (row_id,)).fetchone()

    def acknowledged(self, row_id: int) -> None:
        """The PLC's trigger for this cell was reset: a later trigger for it is a new request."""
        self.db.execute("UPDATE cells SET acked=1 WHERE id=?", (row_id,))

    def pending(self) -> list[Row]:
        """Cells still to be sent to the service, oldest first."""
        return self.db.execute("SELECT * FROM cells WHERE state='pending' ORDER BY id").fetchall()

    def answer(
        self,
        row_id: int,
        verdict: int,
        confidence: float,
        error: str | None = None,
        answer: dict | None = None,
        explain: bool = False,
    ) -> None:
        """The service's answer; `explain`: the cell waits to be explained (see `to_explain`)."""
        with self.db:
            self.db.execute(
                "UPDATE cells SET state='answered', verdict=?, confidence=?, error=?, answer=?, answered_at=?, "
                "explain=? WHERE id=? AND state='pending'",
                (
                    int(verdict),
                    float(confidence),
                    error,
                    json.dumps(answer) if answer else None,
                    time.time(),
                    int(explain),
                    row_id,
                ),
            )

    def to_explain(self, limit: int = 64) -> list[Row]:
        """Answered cells waiting to be explained, oldest first."""
        return self.db.execute("SELECT * FROM cells WHERE explain=1 ORDER BY id LIMIT ?", (limit,)).fetchall()

    def waiting_explanation(self) -> int:
        return self._plain("SELECT COUNT(*) FROM cells WHERE explain=1")[0][0]

    def explained(self, row_id: int) -> None:
        """The cell's report is written (or it cannot be explained): its images go once it is on the PLC."""
        with self.db:
            self.db.execute(
                "UPDATE cells SET explain=0, ct_image=CASE WHEN state='written' THEN NULL ELSE ct_image END, "
                "rgb_image=CASE WHEN state='written' THEN NULL ELSE rgb_image END WHERE id=?",
                (row_id,),
            )

    def next_to_write(self, station: str) -> Row | None:
        """The station's oldest cell not yet on the PLC (results go out in trigger order); it may
        still be pending, in which case the writer waits for it."""
        return self.db.execute(
            "SELECT * FROM cells WHERE station=? AND state != 'written' ORDER BY id LIMIT 1", (station,)
        ).fetchone()

    def writing(self, row_id: int, counter: int) -> None:
        with self.db:
            self.db.execute("UPDATE cells SET state='writing', counter=? WHERE id=?", (int(counter), row_id))

    def written(self, row_id: int) -> None:
        with self.db:
            self.db.execute(
                "UPDATE cells SET state='written', written_at=?, ct_image=CASE WHEN explain=1 THEN ct_image END, "
                "rgb_image=CASE WHEN explain=1 THEN rgb_image END WHERE id=?",
                (time.time(), row_id),
            )

    def depth(self) -> dict[str, int]:
        """Cells per state."""
        return dict.fromkeys(STATES, 0) | dict(self._plain("SELECT state, COUNT(*) FROM cells GROUP BY state"))

    def prune(self, older_than_s: float) -> int:
        """Forget written cells triggered more than `older_than_s` ago; how many."""
        with self.db:
            cur = self.db.execute(
                "DELETE FROM cells WHERE state='written' AND triggered_at < ?", (time.time() - older_than_s,)
            )
        return cur.rowcount

    def rows(self, station: str | None = None) -> list[Row]:
        if station is None:
            return self.db.execute("SELECT * FROM cells ORDER BY id").fetchall()
        return self.db.execute("SELECT * FROM cells WHERE station=? ORDER BY id", (station,)).fetchall()

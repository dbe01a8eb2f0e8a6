"""The unit of work that flows through the stages, and its Arrow row form for Ray Data.

A record is either a *source* (one input video, before it is cut) or a *clip* (one future sample). Failures and
drop decisions are data on the record: a stage never raises for a bad input.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("kind", pa.string()),
        ("source_path", pa.string()),
        ("source_id", pa.string()),
        ("clips_planned", pa.int64()),
        ("meta", pa.string()),
        ("errors", pa.string()),
        ("drop", pa.string()),
        ("blobs", pa.binary()),
    ]
)


@dataclass
class Record:
    kind: str  # "source" | "clip"
    source_path: str
    key: str = ""
    source_id: str = ""
    # How many clip records this record's source produces (-1 until known). The writer uses it to know when
    # every record of a source has arrived, so the source can be committed as a whole.
    clips_planned: int = -1
    meta: dict = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    drop: dict | None = None
    blobs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def local_path(self) -> str:
        """Where the stages that decode a source open it: the input itself, or a worker's scratch copy of an input
        in object storage (pipeline/run/worker.py `local_sources`). `source_path` stays the input's name."""
        return self.meta.get("local_path") or self.source_path

    @property
    def alive(self) -> bool:
        return not self.errors and self.drop is None

    def fail(self, stage: str, reason: str, message: str) -> None:
        """Record an error: the record stops here and lands in errors.parquet."""
        self.errors.append({"stage": stage, "reason": reason, "message": message})

    def drop_by(self, stage: str, reason: str) -> None:
        """Record a filter decision: the record stops here and is counted in the funnel."""
        self.drop = {"stage": stage, "reason": reason}

    def warn(self, stage: str, message: str) -> None:
        self.meta.setdefault("warnings", []).append({"stage": stage, "message": message})

    def put_bytes(self, name: str, data: bytes) -> None:
        self.blobs[name] = np.frombuffer(data, dtype=np.uint8)

    def get_bytes(self, name: str) -> bytes:
        return self.blobs[name].tobytes()

    # --- Arrow row form -------------------------------------------------------------------------------------
    def to_row(self) -> dict:
        buf = io.BytesIO()
        if self.blobs:
            np.savez(buf, **self.blobs)
        return {
            "key": self.key,
            "kind": self.kind,
            "source_path": self.source_path,
            "source_id": self.source_id,
            "clips_planned": self.clips_planned,
            "meta": json.dumps(self.meta),
            "errors": json.dumps(self.errors),
            "drop": json.dumps(self.drop),
            "blobs": buf.getvalue(),
        }

    @classmethod
    def from_row(cls, row: dict) -> Record:
        blobs = {}
        if row["blobs"]:
            # allow_pickle=False: blobs are plain arrays; nothing from a row is ever unpickled.
            with np.load(io.BytesIO(row["blobs"]), allow_pickle=False) as npz:
                blobs = {name: npz[name] for name in npz.files}
        return cls(
            kind=row["kind"],
            source_path=row["source_path"],
            key=row["key"],
            source_id=row["source_id"],
            clips_planned=int(row["clips_planned"]),
            meta=json.loads(row["meta"]),
            errors=json.loads(row["errors"]),
            drop=json.loads(row["drop"]),
            blobs=blobs,
        )


def records_to_table(records: list[Record]) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in records], schema=ROW_SCHEMA)


def table_to_records(table: pa.Table) -> list[Record]:
    return [Record.from_row(row) for row in table.to_pylist()]


def clip_rng(seed: int, key: str, salt: str = "") -> random.Random:
    """A random generator that depends only on the seed and the clip (and an optional salt), not on the run."""
    digest = hashlib.sha256(f"{seed}:{key}:{salt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))

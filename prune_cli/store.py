"""Run records: one JSON file per cell of an experiment, keyed by the hash of its resolved config.

A record is written once, atomically (temporary name, then rename), when its cell has finished; so a kill or
Ctrl-C loses at most the cells in flight and never leaves a half-written record. A record that does not parse,
whose key does not match its config, or that lacks a field is reported as corrupt and its cell is run again:
a leaderboard is built only from records that can be trusted.

Layout: `<out>/records/<key>.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prune_cli.experiment import config_key
from prune_cli.io import write_text

SCHEMA = 1
REQUIRED = ("schema", "key", "config", "criterion", "target", "seed", "before", "after", "timings", "versions")


class CorruptRecord(Exception):
    """A record file that cannot be trusted (the message says why)."""


class Store:
    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir) / "records"

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def save(self, record: dict[str, Any]) -> Path:
        record = {"schema": SCHEMA, **record}
        check(record, record["key"])
        path = self.path(record["key"])
        write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
        return path

    def load(self, key: str) -> dict[str, Any] | None:
        """The finished record of `key`, None if there is none; CorruptRecord if the file cannot be trusted."""
        path = self.path(key)
        if not path.exists():
            return None
        return read(path, key)

    def records(self) -> Iterator[tuple[Path, dict[str, Any] | CorruptRecord]]:
        """Every record file in the store (sorted by name), each read or the reason it cannot be trusted."""
        for path in sorted(self.dir.glob("*.json")):
            try:
                yield path, read(path, path.stem)
            except CorruptRecord as exc:
                yield path, exc


def read(path: Path, key: str) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"{path.name}: not readable JSON ({exc})") from None
    check(record, key)
    return record


def check(record: Any, key: str) -> None:
    if not isinstance(record, dict):
        raise CorruptRecord(f"{key}: a record must be a JSON object")
    missing = [f for f in REQUIRED if f not in record]
    if missing:
        raise CorruptRecord(f"{key}: fields missing: {', '.join(missing)}")
    if record["schema"] != SCHEMA:
        raise CorruptRecord(f"{key}: schema {record['schema']!r}, expected {SCHEMA}")
    if record["key"] != key or config_key(record["config"]) != key:
        raise CorruptRecord(f"{key}: the key does not match the hash of the stored config")
    for side in ("before", "after"):
        if not isinstance(record[side], dict) or not isinstance(record[side].get("top1"), (int, float)):
            raise CorruptRecord(f"{key}: `{side}` lacks a numeric top1")

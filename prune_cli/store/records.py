"""Run records: one JSON file per cell of an experiment, keyed by the hash of its resolved config.

A record is written once, atomically (temporary name, then rename), when its cell has finished; so a kill or
Ctrl-C loses at most the cells in flight and never leaves a half-written record. A record that does not parse,
whose key does not match its config, that lacks a field, or whose fields a leaderboard cannot use (MACs missing
or zero, a target that is not a fraction...) is reported as corrupt and its cell is run again: a leaderboard is
built only from records that can be trusted.

Layout: `<out>/records/<key>.json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prune_cli.run.experiment import config_key
from prune_cli.store.files import write_text

SCHEMA = 1
STEPS = ("score_s", "finetune_s", "total_s")  # the timings a leaderboard shows
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
    if problem := _malformed(record):
        raise CorruptRecord(f"{key}: {problem}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _malformed(record: dict[str, Any]) -> str | None:
    """What makes a record whose key is valid unusable for a leaderboard (None: nothing). Its fields are edited by
    hand or written by another version; `report` must not crash on one, nor rank it."""
    config = record["config"]
    if not isinstance(config, dict) or not isinstance(config.get("job"), dict):
        return "`config` lacks its `job` mapping"
    epochs = config["job"].get("finetune_epochs", 0)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        return f"`config.job.finetune_epochs` must be a count of epochs, got {epochs!r}"
    if not isinstance(config["job"].get("recalibrate_bn", True), bool):
        return "`config.job.recalibrate_bn` must be true or false"
    if not isinstance(record["criterion"], str) or not record["criterion"]:
        return "`criterion` must be a name"
    if not _number(record["target"]) or not 0 < record["target"] < 1:
        return f"`target` must be a fraction in (0, 1), got {record['target']!r}"
    if not isinstance(record["seed"], int) or isinstance(record["seed"], bool):
        return f"`seed` must be an integer, got {record['seed']!r}"
    timings = record["timings"]
    if not isinstance(timings, dict) or not all(_number(timings.get(step)) for step in STEPS):
        return f"`timings` must map {', '.join(STEPS)} to seconds"
    if "experiment" in record and not isinstance(record["experiment"], (str, type(None))):
        return "`experiment` must be a name"
    for side in ("before", "after"):
        values = record[side]
        if not isinstance(values, dict):
            return f"`{side}` must be a mapping"
        if not _number(values.get("top1")) or not 0 <= values["top1"] <= 1:
            return f"`{side}` lacks a top1 in [0, 1]"
        for name in ("macs", "params"):
            if not _number(values.get(name)) or values[name] <= 0:
                return f"`{side}` lacks a positive number of {name}, got {values.get(name)!r}"
        for name, value in values.items():  # optional measurements: absent, null, or a number
            numeric = name.startswith(("top1_", "latency_")) or name in ("threads", "load_average")
            if numeric and value is not None and not _number(value):
                return f"`{side}.{name}` must be a number, got {value!r}"
    return None

"""Latency measurements kept across batches and runs: ``RUN_DIR/search/latency.jsonl``, keyed on (arch JSON, target
name, device fingerprint key), so an arch is measured once per target and machine however often it is proposed."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class LatencyCache:
    """Append-only JSON-lines file of measurements keyed on (arch JSON, target name, fingerprint key)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[tuple[str, str, str], dict[str, Any]] = {}
        if path.exists():
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                try:
                    record = json.loads(line)
                    self.entries[(record["arch"], record["target"], record["fingerprint_key"])] = record["measurement"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s line %d is not a measurement record (a write cut short?); ignoring it", path, number)

    def get(self, arch_json: str, target: str, fingerprint: str) -> dict[str, Any] | None:
        return self.entries.get((arch_json, target, fingerprint))

    def put(self, arch_json: str, target: str, fingerprint: str, measurement: dict[str, Any]) -> None:
        self.entries[(arch_json, target, fingerprint)] = measurement
        line = json.dumps({"arch": arch_json, "target": target, "fingerprint_key": fingerprint, "measurement": measurement})
        with open(self.path, "a") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())


__all__ = ["LatencyCache"]

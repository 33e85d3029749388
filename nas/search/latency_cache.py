"""Latency measurements kept across batches and runs: ``RUN_DIR/search/latency.jsonl``, keyed on (arch JSON, target
name, device fingerprint key), so an arch is measured once per target and machine however often it is proposed."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from nas import jsonio
from nas.durable import set_aside_cut_record

logger = logging.getLogger(__name__)


class LatencyCache:
    """Append-only JSON-lines file of measurements keyed on (arch JSON, target name, fingerprint key). Each append is
    flushed and fsynced; a last line cut short by a kill is set aside into a side file beside the cache when it is
    opened (``nas.durable.set_aside_cut_record``), so the next append starts on a line of its own. Only the
    holder of the run folder's lock opens it (``run_search``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[tuple[str, str, str], dict[str, Any]] = {}
        set_aside_cut_record(path)
        if path.exists():
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
                try:
                    record = json.loads(line)
                    self.entries[(record["arch"], record["target"], record["fingerprint_key"])] = record["measurement"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s line %d is not a measurement record (a write cut short?); ignoring it", path, number)

    def get(self, arch_json: str, target: str, fingerprint: str) -> dict[str, Any] | None:
        return self.entries.get((arch_json, target, fingerprint))

    def put(self, arch_json: str, target: str, fingerprint: str, measurement: dict[str, Any]) -> None:
        self.entries[(arch_json, target, fingerprint)] = measurement
        line = jsonio.dumps({"arch": arch_json, "target": target, "fingerprint_key": fingerprint, "measurement": measurement})
        with open(self.path, "a") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())


__all__ = ["LatencyCache"]

"""A job's ledger: which phases finished, with their metrics, so a rerun skips them.

Written atomically (temp file + rename) so a crash never leaves a half-written ledger.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


class Ledger:
    def __init__(self, workdir: Path):
        self.path = Path(workdir) / "phases.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def done(self, phase: str) -> bool:
        return self.data.get(phase, {}).get("done", False)

    def get(self, phase: str) -> Optional[dict]:
        return self.data.get(phase)

    def mark_done(self, phase: str, **record) -> None:
        self.data[phase] = {"done": True, **record}
        self._write()

    def _write(self) -> None:
        """Process 0 writes; every process keeps the same record in memory."""
        import jax

        if jax.process_index() != 0:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

"""A job's ledger (`phases.json`): which phases finished, with their metrics, wall
seconds and the code and devices that made them, so a rerun skips them. Process 0 writes it, atomically."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from bnfree_jax.pipeline.errors import raise_if_stopped
from bnfree_jax.pipeline.jsonfile import read_json, write_json
from bnfree_jax.pipeline.provenance import code_revision, device_layout
from bnfree_jax.data.storage import Path, as_path

REMEDY = "restore it, or rerun with --force to start the job over"


class Ledger:
    def __init__(self, workdir: Path):
        self.path = as_path(workdir) / "phases.json"
        self.data: dict[str, Any] = read_json(self.path, REMEDY) if self.path.exists() else {}
        bad = [k for k, v in self.data.items() if not isinstance(v, dict)]
        if bad:
            raise ValueError(f"{self.path}: entries {bad} are not records; {REMEDY}")

    def done(self, phase: str) -> bool:
        return self.data.get(phase, {}).get("done", False)

    def get(self, phase: str) -> Optional[dict]:
        return self.data.get(phase)

    def mark_done(self, phase: str, **record) -> None:
        """Record a finished phase (`code` and `layout`: the revision and devices that
        finished it, unless the record carries them, as a copied teacher's does); a stop
        signal that arrived during it ends the job here."""
        self.data[phase] = {"done": True, "code": code_revision(), "layout": device_layout(), **record}
        unfinished = self.data.get(self.UNFINISHED, {})
        if unfinished.pop(phase, None) is not None and not unfinished:
            del self.data[self.UNFINISHED]
        self._write()
        raise_if_stopped()

    UNFINISHED = "unfinished_seconds"  # not a phase: {phase: seconds of its runs that were stopped}

    @contextmanager
    def clock(self, phase: str) -> Iterator[Callable[[], float]]:
        """Yields `elapsed()`: the seconds spent on `phase` so far, this run's plus those
        of earlier runs stopped before it finished, so a resumed phase records its whole
        time. A run that ends by an exception before `mark_done(phase)` leaves its seconds
        under UNFINISHED for the next run; a killed process (SIGKILL) loses them."""
        before = self.data.get(self.UNFINISHED, {}).get(phase, 0.0)
        t0 = time.time()

        def elapsed() -> float:
            return round(before + time.time() - t0, 2)

        try:
            yield elapsed
        except BaseException:
            if not self.done(phase):
                self.data.setdefault(self.UNFINISHED, {})[phase] = elapsed()
                self._write()
            raise

    LAYERS = "layers"  # not a phase: the resolved per-layer table the job runs with

    def record_layers(self, table: list) -> None:
        """Keep the job's resolved per-layer table (`model.layer_table`) beside its phases,
        so the ledger alone says which widths and quantizers its results were made with."""
        if self.data.get(self.LAYERS) != {"table": table}:
            self.data[self.LAYERS] = {"table": table}
            self._write()

    def forget(self, phase: str) -> None:
        """Drop a phase's record (its result is to be made again)."""
        if self.data.pop(phase, None) is not None:
            self._write()

    def _write(self) -> None:
        """Process 0 writes; every process keeps the same record in memory."""
        import jax

        if jax.process_index() != 0:
            return
        write_json(self.path, self.data, indent=1, sort_keys=True)

"""Where a run's time goes: wall seconds per phase, for ``--profile``.

The library marks its phases with :func:`phase`; they cost nothing unless a :class:`Timings`
is active (``with Timings() as timings: compare(...)``). A phase inside another one counts
for itself only (the bounded pass inside a layer's statistics is ``bound``, not
``statistics``), so the phases add up to the run without overlap; what no phase covers
(walking the graph, recording outputs) is ``other``. Phases are the calling thread's: Keras's
layers run in a thread of their own alongside the comparison, and ``keras`` counts the time
the comparison waited for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

PHASES = {
    "startup": "importing TensorFlow, loading the model and the inputs",
    "keras": "waiting for the Keras layers (which run alongside the comparison)",
    "reveal": "auto's probes of TensorFlow's summation trees (a layer's first run only)",
    "kernel": "the NumPy side (convdiff's kernels in the chosen order, or yours)",
    "bound": "the float64 reference and the rounding bound",
    "statistics": "comparing outputs: ULPs, verdicts, budgets, histograms",
    "rendering": "the table, JSON and JUnit output",
}

_ACTIVE: ContextVar[Timings | None] = ContextVar("convdiff_timings", default=None)


class Timings:
    """Wall seconds per phase of :data:`PHASES` (plus ``other``) while active."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.total = 0.0
        self._open: list[list[float]] = []  # per open phase: [start, seconds of inner phases]
        self._started = 0.0

    def __enter__(self) -> Timings:
        self._started = time.perf_counter()
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self._token)
        self.total = time.perf_counter() - self._started

    @property
    def other(self) -> float:
        """Seconds no phase covers."""
        return max(0.0, self.total - sum(self.seconds.values()))

    def summary(self) -> str:
        """One line: ``startup 4.10, keras 1.20, ..., other 0.30, total 9.80`` (seconds)."""
        parts = [f"{name} {seconds:.2f}" for name, seconds in self.seconds.items()]
        return ", ".join([*parts, f"other {self.other:.2f}", f"total {self.total:.2f}"])


def detach() -> None:
    """In a thread's copy of the caller's context (:func:`contextvars.copy_context`): count
    none of the thread's phases. Its time overlaps the caller's, whose phases (the wait for
    the thread's results among them) already add up to the run."""
    _ACTIVE.set(None)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the enclosed block's own wall time (less its inner phases') as ``name``."""
    timings = _ACTIVE.get()
    if timings is None:
        yield
        return
    frame = [time.perf_counter(), 0.0]
    timings._open.append(frame)
    try:
        yield
    finally:
        timings._open.pop()
        elapsed = time.perf_counter() - frame[0]
        timings.seconds[name] += elapsed - frame[1]
        if timings._open:
            timings._open[-1][1] += elapsed

"""Attribution of the run's first non-finite value to a layer, across windows.

The loss and the total gradient norm are recorded on every step, layer statistics only on
sampled ones. A NaN that first shows in the loss of an unsampled step has no layer yet: the
monitor then samples every step (escalation) until a window names the first offending layer
in forward order. This module keeps that story for the whole run: the first event, the layer
once confirmed (and the step that confirmed it), and whether escalation is on. Each change is
logged once: escalation starting, the layer found, or the values turning finite again first.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from actmon.snapshot import NonFinite, Snapshot

log = logging.getLogger("actmon")


class NonFiniteAttribution:
    """The run's first non-finite event, completed with its layer when a later window finds it.

    ``observe`` takes each window's Snapshot (whose ``first_nonfinite`` is that window's own
    earliest event) and returns it, with ``first_nonfinite`` replaced by the completed run-level
    event in the window that confirms the layer.
    """

    def __init__(self, escalate: bool, logs: bool) -> None:
        self._escalate = escalate
        self._logs = logs  # False on ranks other than 0 of a reduced run
        self.first: NonFinite | None = None
        self.escalated = False

    def observe(self, snapshot: Snapshot) -> Snapshot:
        seen = snapshot.first_nonfinite
        if self.first is None:
            if seen is None:
                return snapshot
            self.first = seen
            self._log(
                "actmon: first non-finite %s at step %d%s",
                seen.source,
                seen.step,
                f" in layer {seen.layer!r}" if seen.layer else "",
            )
            if seen.layer is None and self._escalate:
                self.escalated = True
                self._log(
                    "actmon: no layer was sampled at step %d; sampling every step to find the"
                    " first non-finite layer",
                    seen.step,
                )
            return snapshot
        if self.first.layer is not None or not self.escalated:
            return snapshot  # attributed (or not looking): later windows change nothing
        if seen is not None and seen.layer is not None:
            self.first = replace(self.first, layer=seen.layer, confirmed_step=seen.step)
            self.escalated = False
            self._log(
                "actmon: the first non-finite layer is %r (non-finite from step %d, layer"
                " confirmed at step %d); back to the sampling schedule",
                seen.layer,
                self.first.step,
                seen.step,
            )
            return replace(snapshot, first_nonfinite=self.first)
        if seen is None:
            self.escalated = False
            self._log(
                "actmon: values were finite again by step %d before a layer was named (the"
                " non-finite %s at step %d stays unattributed); back to the sampling schedule",
                snapshot.step,
                self.first.source,
                self.first.step,
            )
        return snapshot

    def _log(self, message: str, *args: object) -> None:
        if self._logs:
            log.warning(message, *args)

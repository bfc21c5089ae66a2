"""The prune proxy's runs from a cut: most of a search's removals differ from its base removal (the anchor) in one
layer group's masks only, and everything computed before the first of those masks is the anchor's. Such a removal
runs the masked model from a cut at or before that mask, on the values the anchor's run computed before the cut.

The cuts are the nodes where the masks are applied (each masked value's ``Mul``). A cut is kept when the values
live across it (computed before it, read after it or a graph output) have known shapes, and the anchor's values
of all the cuts kept fit in ``_CUT_BYTES`` (the latest cuts first: they skip the most and their values are the
smallest). A cut in the first tenth of the nodes skips too little to pay for its session. The sessions of the
suffixes are opened when first used and kept while they are at most ``_SESSIONS`` and their weights fit in
``_SESSION_BYTES`` (the least recently used closed first).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxopt.passes._segments import known_bytes_per_sample, last_uses, segment
from onnxopt.runtime import Session

__all__ = ["Cuts"]

logger = logging.getLogger(__name__)

_CUT_BYTES = 256 << 20  # the anchor's values kept for the cuts, at most
_SESSION_BYTES = 256 << 20  # the weights of the suffix sessions kept open, at most
# Suffix sessions kept open, at most; they run without onnxruntime's memory arena (which keeps each run's peak).
# YOLOX-nano's prune peaked at 3.2 GB with 65 suffixes open and arenas on, 1.4 GB with arenas off; with at most 8 of
# its 37 suffixes open, 1.0 GB and no slower; 0.72-0.76 GB once the cuts are freed before the re-fits (0.6 GB
# without cuts).
_SESSIONS = 8
_MIN_SKIPPED = 0.1  # a cut skips at least this fraction of the nodes


class Cuts:
    """Where the masked model may be run from, and its suffix sessions."""

    def __init__(
        self,
        model: ir.Model,
        masks: Mapping[str, tuple[str, str]],
        outputs: list[str],
        samples: int,
        threads: int | None,
    ) -> None:
        """``model``: the masked model; ``masks``: per masked value, the names of its mask and fill inputs;
        ``outputs``: the outputs the proxy reads; ``samples``: the samples each kept value holds."""
        self.model, self.outputs, self.threads = model, outputs, threads
        self.cuts: list[int] = []  # positions of the nodes the suffixes start at, ascending
        self.live: dict[int, list[str]] = {}  # per cut, the values computed before it and used from it on
        self.at: dict[str, int] = {}  # per masked value, where its mask is applied
        self._sessions: OrderedDict[int, tuple[Session, int]] = OrderedDict()
        self.kept: list[str] = []  # the values the anchor's run keeps: every cut's live values
        ShapeInferencePass(strict_mode=False)(model)  # the live values' sizes
        order = list(model.graph)
        graphs = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        if any(a.type in graphs for node in order for a in node.attributes.values()):
            return  # a subgraph may read any outer value: no cut is safe
        position = {id(node): i for i, node in enumerate(order)}
        graph_inputs = {v.name: v for v in model.graph.inputs}
        for name, (mask, _) in masks.items():
            self.at[name] = min(position[id(use.node)] for use in graph_inputs[mask].uses())
        produced = {v.name: (i, v) for i, node in enumerate(order) for v in node.outputs if v.name}
        last_use = last_uses(order)
        for v in model.graph.outputs:
            last_use[v.name] = len(order)
        kept: set[str] = set()
        kept_bytes = 0  # one sample of the values in kept
        for cut in sorted(set(self.at.values()), reverse=True):
            if cut < _MIN_SKIPPED * len(order):
                break
            live = sorted(name for name, (i, _) in produced.items() if i < cut <= last_use.get(name, -1))
            new = [produced[name][1] for name in live if name not in kept]
            size = known_bytes_per_sample(new) if new else 0
            if size is None:
                continue
            if (kept_bytes + size) * samples > _CUT_BYTES:
                break
            kept.update(live)
            kept_bytes += size
            self.cuts.insert(0, cut)
            self.live[cut] = live
        self.kept = sorted(kept)
        logger.debug("prune proxy: %d cuts of %d nodes, %d values kept", len(self.cuts), len(order), len(self.kept))

    def close(self) -> None:
        """No more runs from a cut: the suffix sessions are closed (the caller drops the anchor's values)."""
        self.cuts, self.live = [], {}
        self._sessions.clear()

    def pick(self, changed: list[str]) -> int | None:
        """The latest cut at or before every mask of ``changed`` (masked value names), or ``None``."""
        first = min(self.at[name] for name in changed)
        usable = [cut for cut in self.cuts if cut <= first]
        return usable[-1] if usable else None

    def session(self, cut: int) -> Session:
        """The suffix from ``cut`` on, opened on first use (kept open within ``_SESSIONS`` and ``_SESSION_BYTES``)."""
        if cut in self._sessions:
            self._sessions.move_to_end(cut)
            return self._sessions[cut][0]
        order = list(self.model.graph)
        produced_after = {v.name for node in order[cut:] for v in node.outputs}
        outputs = [name for name in self.outputs if name in produced_after]
        suffix = segment(self.model, cut, len(order), outputs, {})
        weights = sum(v.const_value.nbytes for v in suffix.graph.initializers.values() if v.const_value is not None)
        session = Session(suffix, optimize=True, threads=self.threads, arena=False)  # see _SESSIONS
        self._sessions[cut] = (session, weights)
        while len(self._sessions) > _SESSIONS or sum(w for _, w in self._sessions.values()) > _SESSION_BYTES:
            if len(self._sessions) == 1:
                break
            self._sessions.popitem(last=False)
        return session

    def runner(self, cut: int):
        """The proxy's outputs for one batch, as ``run(feeds, kept)``: the suffix from ``cut`` run on ``feeds`` (the
        batch, masks and fills) and ``kept`` (the anchor's values of this batch); outputs computed before the cut
        are the anchor's. The session is opened here, once, so the runs may go on worker threads."""
        session, live = self.session(cut), self.live[cut]

        def run(feeds: Mapping[str, np.ndarray], kept: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            got = session.run({**feeds, **{name: kept[name] for name in live}}, None)
            return {name: got[name] if name in got else kept[name] for name in self.outputs}

        return run

"""Scores of prunable units from activation statistics (what ``prune``'s criteria and ``ratio`` ranking read).

Per unit (the channels that go together), over the channels the next layers read:

- ``dead``: zero on every calibration sample; ``apoz``: the fraction of zeros, or for a GELU/ReLU neuron the
  fraction of non-positive activation inputs (the gate's ``1 − P(x > 0)``); ``freq``: the fraction of positives;
  ``rel_std``: standard deviation relative to the layer's mean |activation|; ``mean_abs``;
- ``contribution``: ``Σ_consumers RMS(x_c)·‖W_c‖`` (the channel's row of the next layer's weight), and for an
  attention head ``√E‖x_S·W_S‖² = √tr(W_Sᵀ·E[x_Sᵀx_S]·W_S)`` over its ``D`` channels ``S`` of the output
  projection's input, from that projection's Gram matrix (correlations between the head's channels included).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxopt import graph as graph_io
from onnxopt.passes._channel_groups import Analysis, Unit
from onnxopt.stats import StatsTable

__all__ = ["Scored", "score_units"]


@dataclasses.dataclass
class Scored:
    """One unit and the statistics its criteria read."""

    unit: Unit
    dead: bool
    apoz: float
    freq: float
    rel_std: float
    mean_abs: float
    contribution: float


def score_units(analysis: Analysis, stats: StatsTable) -> dict[int, Scored]:
    """Per unit (keyed by its first slot), the statistics of the channels the next layers read."""
    consumers = {}
    for action in analysis.actions:
        if action.kind == "consumer":
            consumers.setdefault(id(action.space.value), []).append(action)
    owner = analysis._slot_owner()
    layer_scale: dict[int, float] = {}
    norms: dict[int, np.ndarray] = {}  # per consumer: the norm of its weight for each input channel
    for actions in consumers.values():
        for action in actions:
            weight = np.moveaxis(graph_io.const_array(action.node.inputs[1]), action.weight_axis, 0)
            norms[id(action)] = np.linalg.norm(weight.reshape(len(weight), -1), axis=1)
    gates = {id(space.value) for space in analysis.gates}
    blocks = _block_contributions(analysis, stats, consumers)
    scored = {}
    for unit in analysis.units:
        if unit.blocked:
            continue
        dead, apoz, freq, rel_std, mean_abs, contribution = True, 1.0, 0.0, 0.0, 0.0, 0.0
        seen = False
        nonpos = [
            1.0 - float(stats.channels[owner[slot].value.name].pos_frac[slot - owner[slot].base])
            for slot in unit.slots
            if id(owner[slot].value) in gates and owner[slot].value.name in stats.channels
        ]
        for slot in unit.slots:
            space = owner[slot]
            if id(space.value) not in consumers:
                continue
            s = stats.channels.get(space.value.name)
            if s is None:
                continue
            c = slot - space.base
            seen = True
            if id(space.value) not in layer_scale:
                layer_scale[id(space.value)] = float(np.mean(s.abs_mean)) + 1e-12
            dead = dead and s.min[c] == 0 and s.max[c] == 0
            apoz = min(apoz, float(s.zero_frac[c]))
            freq = max(freq, float(s.pos_frac[c]))
            rel_std = max(rel_std, float(s.std[c]) / layer_scale[id(space.value)])
            mean_abs = max(mean_abs, float(s.abs_mean[c]))
            rms = float(np.sqrt(s.sq_mean[c]))
            for action in consumers[id(space.value)]:
                if id(action) not in blocks:
                    contribution += rms * float(norms[id(action)][c])
        for per_unit in blocks.values():
            contribution += per_unit.get(unit.slots[0], 0.0)
        if nonpos:  # a GELU/ReLU neuron: how often its activation input is non-positive (APoZ-style)
            apoz = max(nonpos)
        if seen:
            scored[unit.slots[0]] = Scored(unit, dead, apoz, freq, rel_std, mean_abs, contribution)
    return scored


def _block_contributions(analysis: Analysis, stats: StatsTable, consumers) -> dict[int, dict[int, float]]:
    """Per consumer reading merged attention heads: unit (first slot) -> ``√E‖x_S·W_S‖²`` over the unit's slots ``S``.

    ``E[x_Sᵀx_S]`` is the block of the consumer input's Gram matrix, so the head's channels are scored together,
    correlations included, instead of summing per-channel norms.
    """
    unit_of = {}
    for unit in analysis.units:
        for slot in unit.slots:
            unit_of[slot] = unit
    result: dict[int, dict[int, float]] = {}
    for space in analysis.head_inputs:
        for action in consumers.get(id(space.value), []):
            gram = stats.grams.get(action.node.name)
            weight = graph_io.const_array(action.node.inputs[1])
            if gram is None or weight is None or weight.ndim != 2 or gram.xtx.shape[0] != space.size:
                continue
            moment = gram.second_moment
            rows = np.moveaxis(weight, action.weight_axis, 0).astype(np.float64)  # (K, M)
            per_unit: dict[int, list[int]] = {}
            for c in range(space.size):
                unit = unit_of.get(space.base + c)
                if unit is not None and not unit.blocked:
                    per_unit.setdefault(unit.slots[0], []).append(c)
            scores = {}
            for first, channels in per_unit.items():
                w = rows[channels]
                scores[first] = float(np.sqrt(max(np.sum((moment[np.ix_(channels, channels)] @ w) * w), 0.0)))
            result[id(action)] = scores
    return result

"""prune's selection: which units (channels, neurons, heads) a setting removes, and the report lines for them.

:func:`select` takes the scored units of each layer group (:mod:`onnxopt.passes._prune_scores`) and a criterion's
setting (or per-group ratios) and returns the units to remove, each group keeping ``min_channels`` and, for
``ratio``, a multiple of ``align`` channels (removing fewer rather than more; see :func:`_alignment`);
:func:`describe` and :func:`blocked` are the pass's changes and skips.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING

import numpy as np

from onnxopt.pass_base import Change, Skip
from onnxopt.passes._channel_groups import Analysis
from onnxopt.passes._prune_scores import Scored
from onnxopt.stats import StatsTable

if TYPE_CHECKING:
    from onnxopt.passes.prune import PruneConfig

__all__ = ["blocked", "describe", "removed_and_means", "select"]


def select(
    analysis: Analysis,
    scored: dict[int, Scored],
    config: PruneConfig,
    setting: float,
    per_group: dict[int, float] | None = None,
) -> list[Scored]:
    """The units the ``setting`` (or the ``per_group`` ratios) removes, group by group: each group's candidates
    in the criterion's order, taken while every value they touch keeps ``min_channels``, then (``ratio``) fewer
    taken so the group keeps a multiple of its alignment."""
    chosen: list[Scored] = []
    for plan in _plans(analysis, scored):
        candidates = _candidates(plan, config, (per_group or {}).get(plan.group, setting))
        if not candidates:
            continue
        remaining = dict(plan.sizes)  # every value of the group keeps min_channels (and an aligned count)
        taken = []
        for item in candidates:
            counts = plan.counts[id(item)]
            if all(remaining[v] - n >= config.min_channels for v, n in counts):
                for v, n in counts:
                    remaining[v] -= n
                taken.append(item)
        multiple = _alignment(plan.items, config, plan.owner) if config.criterion == "ratio" and taken else 1
        if multiple > 1:
            # keep a multiple of `multiple` of the group's channels: remove fewer rather than more
            surplus = (len(plan.items) - len(taken)) % multiple
            if surplus:
                taken = taken[: max(0, len(taken) - (multiple - surplus))]
        chosen.extend(taken)
    return chosen


@dataclasses.dataclass
class _Plan:
    """What :func:`select` reads of one layer group, whatever the setting: its units, each unit's channels per value
    (``counts[id(item)]``: (id of the value, channels) pairs) and each value's size, and the units in each order a
    criterion takes them (built when first asked)."""

    group: int
    items: list[Scored]
    owner: list
    counts: dict[int, tuple[tuple[int, int], ...]]
    sizes: dict[int, int]
    orders: dict[str, list[Scored]] = dataclasses.field(default_factory=dict)

    def ordered(self, name: str, key) -> list[Scored]:
        if name not in self.orders:
            self.orders[name] = sorted(self.items, key=key)
        return self.orders[name]


# per analysis, its scoring and their plans: the proxy allocation asks select() for a hundred settings of one of each
_PLANS: weakref.WeakKeyDictionary[Analysis, tuple[dict[int, Scored], list[_Plan]]] = weakref.WeakKeyDictionary()


def _plans(analysis: Analysis, scored: dict[int, Scored]) -> list[_Plan]:
    """Per layer group, in the order of ``scored``, its :class:`_Plan` (kept while ``analysis`` lives, for the next
    call with the same ``scored``)."""
    cached = _PLANS.get(analysis)
    if cached is not None and cached[0] is scored:
        return cached[1]
    owner = analysis._slot_owner()
    by_group: dict[int, list[Scored]] = {}
    for item in scored.values():
        by_group.setdefault(item.unit.group, []).append(item)
    plans = []
    for group, items in by_group.items():
        counts, sizes = {}, {}
        for item in items:
            per_value: dict[int, int] = {}
            for slot in item.unit.slots:
                value = id(owner[slot].value)
                per_value[value] = per_value.get(value, 0) + 1
                sizes[value] = owner[slot].size
            counts[id(item)] = tuple(per_value.items())
        plans.append(_Plan(group, items, owner, counts, sizes))
    _PLANS[analysis] = (scored, plans)
    return plans


def _alignment(items: list[Scored], config: PruneConfig, owner) -> int:
    """The multiple a group's kept channel count is rounded to: ``align``, halved down to 4 for a group of fewer
    than 2·``align`` channels (a 24-channel group keeps a multiple of 8), 1 below 8 channels and for groups whose
    units are blocks of channels (attention heads: their count is the model's design, not a kernel's block)."""
    slots = items[0].unit.slots
    if len(slots) != len({id(owner[slot].value) for slot in slots}):
        return 1
    multiple = config.align
    while multiple > 4 and len(items) < 2 * multiple:
        multiple //= 2
    return multiple if len(items) >= 2 * multiple else 1


def _candidates(plan: _Plan, config: PruneConfig, setting: float) -> list[Scored]:
    criterion, items = config.criterion, plan.items
    if criterion == "dead":
        return [i for i in items if i.dead]
    if criterion == "apoz":  # the units past the setting, in a stable sort's order (as sorting only those)
        return [i for i in plan.ordered("-apoz", lambda i: -i.apoz) if i.apoz >= setting]
    if criterion == "constant":
        return [i for i in plan.ordered("rel_std", lambda i: i.rel_std) if i.rel_std <= setting]
    if criterion == "outlier":
        freqs = np.array([i.freq for i in items])
        cut = freqs.mean() - 2 * freqs.std()
        return sorted((i for i in items if i.freq < cut), key=lambda i: i.freq)
    key = {"contribution": lambda i: i.contribution, "apoz": lambda i: -i.apoz, "mean": lambda i: i.mean_abs}
    ordered = plan.ordered(config.score, key[config.score])
    dead = [i for i in ordered if i.dead]
    count = max(len(dead), int(np.floor(setting * len(items) + 1e-9)))
    return dead + [i for i in ordered if not i.dead][: count - len(dead)]


def removed_and_means(analysis: Analysis, chosen, stats: StatsTable):
    removed = analysis.removed_by_space([item.unit for item in chosen])
    means = {}
    for space in analysis.spaces.values():
        channel = stats.channels.get(space.value.name)
        if channel is not None and id(space.value) in removed:
            means[id(space.value)] = channel.mean
    return removed, means


def blocked(analysis: Analysis) -> list[Skip]:
    reasons: dict[str, int] = {}
    for unit in analysis.units:
        if unit.blocked:
            reasons[unit.blocked] = reasons.get(unit.blocked, 0) + 1
    return [Skip(f"{count} channel{'s' * (count != 1)}", f"kept: {reason}") for reason, count in reasons.items()]


def describe(
    analysis: Analysis, chosen, setting: float, per_group: dict[int, float], config: PruneConfig
) -> list[Change]:
    removed = analysis.removed_by_space([item.unit for item in chosen])
    owner = analysis._slot_owner()
    group_of = {id(owner[slot].value): item.unit.group for item in chosen for slot in item.unit.slots}
    changes = []
    for action in analysis.actions:
        if action.kind == "producer" and id(action.space.value) in removed:
            before = action.space.size
            after = before - len(removed[id(action.space.value)])
            # the fraction removed, which rounding, alignment and min_channels make differ from the setting
            what = f"{before} -> {after} channel{'s' * (after != 1)} ({(before - after) / before:.3g} removed; "
            what += config.criterion
            if config.criterion not in ("dead", "outlier"):
                value = per_group.get(group_of.get(id(action.space.value), -1), setting)
                what += f" {value:.4g}"  # the criterion's setting
            changes.append(Change(action.node.name or action.space.value.name, what + ")"))
    merged = {id(space.value) for space in analysis.head_inputs}
    for action in analysis.actions:  # the head merge Reshapes: heads per attention layer
        if action.kind == "reshape" and id(action.out_space.value) in merged and id(action.space.value) in removed:
            before = action.space.size
            after = before - len(removed[id(action.space.value)])
            changes.append(Change(action.node.name, f"{before} -> {after} attention heads"))
    return changes

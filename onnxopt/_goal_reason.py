"""Why a goal search ended where it did: the reason :func:`onnxopt.goal.seek` gives, made of what was measured.

When the target is not reached, the reason names the best point within the budget, the pipelines that missed the
budget and how, what each ``quant`` run found (the int8 recipe it chose and its speed against its float input, or
why it kept float), whether the CPU has VNNI int8 instructions, how much of the MACs the structural passes
(``prune``, ``depth``) removed within the budget, the pipelines not tried and why, and for a latency target where
the best model's time goes (:mod:`onnxopt.profile`, by kind of kernel, against the original's).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from onnxopt.errors import first_line

if TYPE_CHECKING:
    import onnx_ir as ir

    from onnxopt.goal import Point, Target
    from onnxopt.profile import Profile

__all__ = ["reason", "profiles", "where_text", "quant_facts", "cpu_vnni"]

logger = logging.getLogger("onnxopt.goal")
# single-step points whose MACs ratio says how far a structural pass went within the budget
STRUCTURAL = ("prune", "depth")


def profiles(original: Path, model: ir.Model, feeds) -> dict[str, Profile] | None:
    """Where the time goes in the original and in the chosen model on ``feeds``; None when a profile cannot be
    taken (the reason is given without it)."""
    from onnxopt.profile import profile

    try:
        return {"original": profile(original, feeds), "chosen": profile(model, feeds)}
    except Exception as e:
        logger.info("goal: no profile of the chosen model (%s)", first_line(e))
        return None


def where_text(chosen: Point, profiles: Mapping[str, Profile]) -> str:
    from onnxopt import graph as graph_io
    from onnxopt.profile import shares_text

    shares = shares_text(profiles["original"], profiles["chosen"])
    if not shares:
        return ""
    at = ", ".join(f"{name}={graph_io.shape_text(shape)}" for name, shape in profiles["chosen"].feeds.items())
    return f"where {chosen.pipeline}'s time goes (onnxruntime's profile at {at}): {shares}"


def reason(
    target: Target,
    points: Sequence[Point],
    chosen: Point | None,
    reached: bool,
    stages,
    skipped,
    time_note: str = "",
    where: str = "",
) -> str:
    """Why the search ended where it did, from what was measured."""
    if reached and chosen is not None:
        return f"{chosen.pipeline} reaches {target.kind} {target.value(chosen):.2f}x within the budget"
    facts = []
    if chosen is not None:
        facts.append(f"best within the budget {target.value(chosen):.2f}x {target.kind} ({chosen.pipeline})")
    else:
        facts.append("no pipeline holds the budget")
    for point in points:
        if not point.ok:
            facts.append(f"{point.pipeline} {point.note or 'misses the budget'}")
    quant = quant_facts(stages)
    facts += quant
    if quant and target.kind == "latency":
        vnni = cpu_vnni()
        if vnni is False:
            facts.append("this CPU has no AVX-512 VNNI / AVX-VNNI int8 instructions")
    if where:
        facts.append(where)
    for name in STRUCTURAL:  # the pass alone: the first such point (the whole budget's, where it ran)
        alone = next((p for p in points if p.pipeline.split("(")[0] == name and "," not in p.pipeline and p.ok), None)
        if alone is not None and alone.macs_ratio is not None:
            facts.append(f"{name} keeps {alone.macs_ratio:.2f} of the MACs within the budget")
    facts += [f"not tried: {s}" for s in skipped]
    if time_note:
        facts.insert(1, time_note)
    return f"target {target.describe()} not reached: " + "; ".join(facts)


def quant_facts(stages) -> list[str]:
    """What each quant run measured: the recipe it chose and its speed against its float input, or why it kept
    float; pipelines with the same finding share one fact."""
    from onnxopt.goal import _pipeline

    found: dict[str, list[str]] = {}
    seen = set()
    for prefix, stage in stages.items():  # a pipeline that is the same model as one run shares its stage: once
        if not stage.chain or prefix[-1].name != "quant" or id(stage) in seen:
            continue
        seen.add(id(stage))
        record = next((r for r in stage.chain[-1].passes if r.name == "quant"), None)
        if record is None:
            continue
        details = record.details
        chosen = details.get("quant_chosen")
        if chosen is not None:
            ratio = next((r["latency_ratio"] for r in details.get("quant_recipes", []) if r["recipe"] == chosen), None)
            fact = f"int8 recipe {chosen}" + (f" at {ratio:.2f}x its float input" if ratio is not None else "")
        else:
            fact = "float kept: " + next((s.reason for s in record.skipped if s.site == "model"), "no recipe won")
        found.setdefault(fact, []).append(_pipeline(prefix))
    return [f"{', '.join(where)}: {fact}" for fact, where in found.items()]


def cpu_vnni() -> bool | None:
    """Whether the CPU advertises VNNI int8 dot products (``/proc/cpuinfo`` flags; ``None``: unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags

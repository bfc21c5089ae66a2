"""The pass interface: OptPass (an onnx_ir in-place pass), its config, result and run context.

A pass has one entry point, ``pass_(model) -> OptResult``. onnx_ir's ``PassBase.__call__`` runs
``requires()`` (preconditions), ``call()``, then ``ensures()`` and checks the pass really was in place.
``OptResult.changes`` lists each rewritten site and ``OptResult.skipped`` each declined site with its
reason; ``modified`` must be true exactly when the model changed.

Passes that need data declare it through :meth:`OptPass.stats_request`; the pass manager collects the
statistics before the pass runs and puts them in ``model.meta`` (:func:`onnxopt.stats.get_stats`).
Passes that search for the strongest setting within the error budget call ``self.context.check(model)``,
which validates a candidate against the original model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt.stats import StatsRequest

if TYPE_CHECKING:
    from onnxopt.data import DataSource
    from onnxopt.validate import Budget, ValidationReport

__all__ = ["Change", "Skip", "OptResult", "PassConfig", "PassContext", "OptPass", "budget_figures"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Change:
    """One rewritten site: the node or value and what was done to it."""

    site: str
    what: str


@dataclasses.dataclass(frozen=True)
class Skip:
    """One declined site and the reason."""

    site: str
    reason: str


@dataclasses.dataclass
class OptResult(ir.passes.PassResult):
    """``PassResult`` plus the changed and skipped sites, and optional structured ``details`` for the report."""

    changes: list[Change] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-ready; e.g. quant's recipe table


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Options of a pass. Subclasses add fields; the CLI exposes each as ``--<pass>-<field>``: a bool field as
    ``--<pass>-<field>`` / ``--no-<pass>-<field>``, and so is a ``bool | None`` field whose metadata names what
    ``None`` (neither flag given) means: ``metadata={"unset": "auto"}`` (prune's ``refit``)."""


@dataclasses.dataclass
class PassContext:
    """What the pass manager gives a pass: the budget, the data, and a validator against the original."""

    budget: Budget
    data: DataSource | None = None
    eval_data: DataSource | None = None
    check: Callable[[ir.Model], ValidationReport] | None = None
    seed: int = 0
    # the model the pipeline started from, as a file (what ``distill`` learns to reproduce)
    original: Path | None = None
    # the per-sample input shapes the run counts MACs at (the data's first batch; PassManager._cost_shapes): a
    # pass that needs concrete shapes (an image model's symbolic height and width) counts at the same ones
    input_shapes: dict[str, list[int]] | None = None
    # how many budget checks the running pass's search expects to make (progress displays; see expect_trials)
    expected_trials: int | None = None
    # candidates worth scoring at once (an executor's workers; 1: one after the other), and how: ``prefetch(models)``
    # scores those models together so that the search's later ``check`` of each returns at once (None: no executor)
    parallel: int = 1
    prefetch: Callable[[list[ir.Model]], None] | None = None

    def expect_trials(self, count: int) -> None:
        """Tell progress displays how many budget checks the search will make in all (an upper bound is fine)."""
        self.expected_trials = max(0, int(count))


class OptPass(ir.passes.InPlacePass):
    """Base class of onnxopt's passes.

    Subclasses set ``name`` (the CLI/registry name), ``exact`` (output-preserving up to rounding),
    ``config_class``, optionally ``simplify_after``, and implement ``call``.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    # whether the pass spends error budget (a lossy pass's search goes as far as the budget allows); None: when it
    # is not exact. A recovery pass (distill) brings the model closer to the original and spends none.
    spends_budget: ClassVar[bool | None] = None

    @classmethod
    def spends(cls) -> bool:
        return (not cls.exact) if cls.spends_budget is None else cls.spends_budget

    config_class: ClassVar[type[PassConfig]] = PassConfig
    # False for a pass whose output a final cleanup would undo (constant folding a quantized weight's
    # DequantizeLinear would turn it back into float).
    simplify_after: ClassVar[bool] = True
    # False for a pass that removes shape annotations on purpose (compact): no shape inference after it
    infer_shapes_after: ClassVar[bool] = True

    def __init__(self, config: PassConfig | None = None) -> None:
        super().__init__()
        if config is not None and not isinstance(config, self.config_class):
            raise TypeError(f"pass '{self.name}' takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config if config is not None else self.config_class()
        self.context: PassContext | None = None

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring (``onnxopt passes``)."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def expect_trials(self, count: int) -> None:
        """Tell progress displays how many budget checks this pass's search will make (through the run context;
        a context without ``expect_trials``, such as a test's stand-in, is left alone)."""
        expect = getattr(self.context, "expect_trials", None)
        if expect is not None:
            expect(count)

    def needs_data(self, model: ir.Model) -> bool:
        """Whether this pass, as configured, cannot run on ``model`` without calibration data (checked before any
        pass runs)."""
        return False

    def stats_request(self, model: ir.Model) -> StatsRequest:
        """Statistics this pass needs on ``model``; empty by default."""
        return StatsRequest()

    def requires(self, model: ir.Model) -> None:
        """Default precondition: a default-domain opset in the supported range."""
        opset = graph_io.default_opset(model)
        if not graph_io.MIN_OPSET <= opset <= graph_io.MAX_OPSET:
            raise ir.passes.PreconditionError(f"pass '{self.name}': opset {opset} is not supported")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def budget_figures(report: ValidationReport) -> str:
    """A failed budget check in one line: its first failures, and the worst cosine when they do not name it (the
    reason a pass backs off, or the pass manager reverts one)."""
    text = "; ".join(report.failures[:2]) or "fails"
    cosines = [d.cosine for d in report.outputs.values()]
    if cosines and "cosine" not in text:
        text += f"; worst cosine {min(cosines):.5f}"
    return text

"""`fuse`: onnxruntime's transformer fusions (``onnxruntime.transformers.optimizer``), validated, kept where faster.

Before (one encoder block, as exporters write it)::

    x ─ MatMul+Add (Q) ─ Reshape ─ Transpose ─┐
    x ─ MatMul+Add (K) ─ Reshape ─ Transpose ─ MatMul ─ Div ─ Add(mask) ─ Softmax ─┐
    x ─ MatMul+Add (V) ─ Reshape ─ Transpose ──────────────────────────────────── MatMul ─ Transpose ─ Reshape ─
      ─ MatMul+Add ─ Add(x) ─ LayerNormalization ─ MatMul+Add ─ Erf-GELU ─ MatMul+Add ─ Add ─ LayerNormalization

After (``com.microsoft`` ops, onnxruntime's CPU kernels)::

    x ─ Attention(QKV weight [hidden, Q+K+V], num_heads) ─ MatMul ─ SkipLayerNormalization(bias, x) ─
      ─ MatMul ─ BiasGelu ─ MatMul ─ SkipLayerNormalization

plus ``EmbedLayerNormalization`` for the word + position (+ segment) embeddings and their LayerNorm. A pruned
encoder (fewer heads than the hidden size holds) gets ``qkv_hidden_sizes``; heads and widths are read per block.

Steps:

1. :func:`passes._fuse_graph.attention_blocks` finds the self-attention blocks and reads their heads, head size
   and hidden size from the graph; without one, the model is refused as not a transformer encoder. The detected
   ``num_heads`` and attention width (``hidden_size``: heads x head size, below the model's hidden size once heads
   are pruned) are given to onnxruntime when every block agrees (else 0: it reads each block's Reshape).
2. The additive attention mask is rewritten into the one form onnxruntime matches
   (:func:`passes._fuse_graph.canonical_masks`; ``simplify`` merges its two Unsqueezes, which alone stops the
   Attention fusion on MiniLM).
3. ``optimize_model(model_type="bert", opt_level=0)``: only the Python fusions, none of onnxruntime's own graph
   optimizations baked into the file (``opt_level`` >= 1 also imports torch). ``enable_gelu_approximation`` stays
   off: Gelu is never replaced by the tanh approximation (``FastGelu``). ``FastGelu`` then appears only where the
   model already computes tanh-GELU (the fusion is exact up to rounding) and validation judges it like the rest.
   Candidates: every fusion, and every fusion but Attention (onnxruntime's CPU Attention kernel was slower than the
   unfused ops on MiniLM at one thread, ../shared/FINDINGS.md), the latter only when Attention fused.
4. Each candidate is validated against the pass's input on the run's data (evaluation data first; seeded random
   inputs without data): max abs error scaled by the output's range (``max|Δ| / max(1, max|y|)``) at most
   ``tolerance`` (1e-5, the budget the pass manager gives runs of exact passes; measured: 3e-7 on tiny_bert, 1e-6
   on MiniLM), integer outputs equal. A candidate that fails is dropped with the error.
5. The input and the candidates are timed together (onnxruntime with full optimizations, 1 thread, the first batch
   of the data, interleaved rounds; the record in :mod:`onnxopt.latency_cache` makes the same command give the
   same choice). The fastest candidate wins if it is faster than the input by ``margin``; else the input is kept
   and the skip gives the medians. ``force`` switches the latency guard off (the full fusion is kept untimed:
   deterministic, for tests, or for another runtime).

Fused ops are opaque to the structural passes (prune, svd, split read MatMul+Add chains and Reshape targets), and
distill trains ONNX ops through torch: the pass manager refuses a pipeline that puts one of
:attr:`FusePass.hides_from` after ``fuse``. ``quant --quant-mode dynamic`` after it turns Attention into
QAttention and the remaining MatMuls into dynamic int8.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxopt import graph as graph_io
from onnxopt.errors import DataError, first_line
from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip
from onnxopt.passes import _fuse_graph

__all__ = ["FuseConfig", "FusePass"]

logger = logging.getLogger(__name__)

FUSED_OPS = ("EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu", "Gelu", "FastGelu",
             "LayerNormalization")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FuseConfig(PassConfig):
    attention: bool = dataclasses.field(default=True, metadata={"help": "also try the Attention fusion"})
    force: bool = dataclasses.field(
        default=False, metadata={"help": "keep the full fusion without timing it (latency guard off)"}
    )
    margin: float = dataclasses.field(default=0.05, metadata={"help": "relative speed-up that counts as faster"})
    rounds: int = dataclasses.field(default=15, metadata={"help": "interleaved timing rounds"})
    tolerance: float = dataclasses.field(
        default=1e-5, metadata={"help": "max abs error against the input, scaled by max(1, max|y|)"}
    )  # the pass manager's exact budget (Budget.exact): a kept fusion passes a run's final check of exact passes
    remeasure: bool = dataclasses.field(
        default=False, metadata={"help": "time again instead of reusing an earlier run's record"}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 1:
            raise ValueError(f"fuse margin must be in [0, 1), got {self.margin}")
        if self.rounds < 1:
            raise ValueError(f"fuse rounds must be at least 1, got {self.rounds}")
        if not self.tolerance > 0:
            raise ValueError(f"fuse tolerance must be positive, got {self.tolerance}")


@dataclasses.dataclass
class _Candidate:
    name: str
    path: Path
    fused: dict[str, int]
    latency_us: float | None = None
    spread_us: tuple[float, float] | None = None
    error: float | None = None  # worst scaled max abs error against the input

    def describe(self) -> str:
        return ", ".join(f"{op} {count}" for op, count in self.fused.items())


class FusePass(OptPass):
    """onnxruntime's transformer fusions (Attention, SkipLayerNormalization, BiasGelu...), validated, kept if faster."""

    name = "fuse"
    exact = True  # validated against its input within ``tolerance`` (float rounding of the fused kernels)
    config_class = FuseConfig
    simplify_after = False  # onnxscript's optimizer does not know the com.microsoft ops; nothing left to clean
    # passes that cannot see through the fused ops: the pass manager refuses them after `fuse`
    hides_from: ClassVar[tuple[str, ...]] = ("prune", "svd", "split", "distill")

    def call(self, model: ir.Model) -> OptResult:
        config: FuseConfig = self.config
        blocks = _fuse_graph.attention_blocks(model)
        if not blocks:
            why = ("not a transformer encoder: no self-attention block (MatMul(Q, K) -> [scale] -> [mask Add] -> "
                   "Softmax -> MatMul(., V), Q split into heads by Reshape + Transpose)")  # fmt: skip
            return OptResult(model, modified=False, skipped=[Skip("model", why)])
        # onnxruntime's hidden_size is the attention width (heads x head size; a pruned block's is below the model's)
        shapes = {(b.heads, b.heads * b.head_size) for b in blocks}
        num_heads, width = next(iter(shapes)) if len(shapes) == 1 else (0, 0)
        detected = f"{len(blocks)} attention blocks, " + ", ".join(
            sorted({f"{b.heads} heads of {b.head_size}" for b in blocks})
        )
        with tempfile.TemporaryDirectory(prefix="onnxopt-fuse-") as tmp:
            folder = Path(tmp)
            prepared = model.clone()
            masks = _fuse_graph.canonical_masks(prepared)
            RemoveUnusedNodesPass()(prepared)
            source = graph_io.save(prepared, folder / "input.onnx")
            variants = [("all", True), ("no-attention", False)] if config.attention else [("no-attention", False)]
            candidates: list[_Candidate] = []
            for name, attention in variants:
                candidate = _fuse(source, folder / f"{name}.onnx", name, num_heads, width, attention)
                if candidate.fused:
                    candidates.append(candidate)
                if attention and not candidate.fused.get("Attention"):
                    break  # without Attention the second variant would be the same model
            if not candidates:
                why = f"onnxruntime's bert fusions matched nothing ({detected})"
                return OptResult(model, modified=False, skipped=[Skip("model", why)])
            skipped: list[Skip] = []
            input_path = graph_io.save(model.clone(), folder / "original.onnx")
            source_data = self._data(model)
            if source_data is None:
                why = "no data to validate the fusion on: give --data (random inputs need concrete shapes)"
                return OptResult(model, modified=False, skipped=[Skip("model", why)])
            valid = []
            for candidate in candidates:
                failure = self._validate(input_path, candidate, source_data)
                if failure:
                    skipped.append(Skip(f"fusion {candidate.name}", f"{candidate.describe()}: {failure}"))
                else:
                    valid.append(candidate)
            if not valid:
                return OptResult(model, modified=False, skipped=[Skip("model", "no fusion validated"), *skipped])
            if config.force:
                winner, why = valid[0], "kept without timing (--fuse-force)"
            else:
                input_us, feeds_shape = self._time(input_path, valid, source_data)
                winner, why = _choose(input_us, valid, config.margin)
                if winner is None:
                    lines = "; ".join(f"{c.name} ({c.describe()}) {_ms(c.latency_us)}" for c in valid)
                    reason = (f"not {config.margin:.0%} faster than the unfused model: medians of {config.rounds} "
                              f"rounds at {feeds_shape}: unfused {_ms(input_us)}, {lines}")  # fmt: skip
                    return OptResult(model, modified=False, skipped=[Skip("model", reason), *skipped])
                skipped += [Skip(f"fusion {c.name}", f"{_ms(c.latency_us)}: slower") for c in valid if c is not winner]
            fused = graph_io.in_memory(graph_io.load(winner.path))
            _type_fused_outputs(fused)
            graph_io.adopt(model, fused)
        what = f"{winner.describe()} ({detected}; {masks} attention mask(s) rewritten for onnxruntime): {why}"
        details = {"fuse_detected": detected, "fuse_chosen": winner.name, "fuse_ops": winner.fused,
                   "fuse_max_error": winner.error}  # fmt: skip
        return OptResult(model, modified=True, changes=[Change("model", what)], skipped=skipped, details=details)

    def _data(self, model: ir.Model):
        """The data to validate and time on: evaluation data, else calibration data, else seeded random inputs."""
        context = self.context
        source = None if context is None else (context.eval_data or context.data)
        if source is not None:
            return source
        from onnxopt import data as data_mod

        try:
            return data_mod.random_source(model, seed=0 if context is None else context.seed)
        except DataError as e:
            logger.info("fuse: no random inputs: %s", first_line(e))
            return None

    def _validate(self, input_path: Path, candidate: _Candidate, source) -> str:
        """Empty when ``candidate`` holds the tolerance against the input, else the failure."""
        from onnxopt.validate import Budget, validate

        report = validate(input_path, candidate.path, source, Budget(max_abs=self.config.tolerance), check=False)
        errors = [d.scaled_abs for d in report.outputs.values() if d.scaled_abs is not None]
        candidate.error = max(errors, default=None)
        return "" if report.ok else "; ".join(report.failures[:2])

    def _time(self, input_path: Path, candidates: list[_Candidate], source) -> tuple[float, str]:
        """Time the input and ``candidates`` interleaved (or take an earlier run's record); the input's median."""
        from onnxopt import latency_cache, runtime

        feeds = dict(next(iter(source)).feeds)
        shape = ", ".join(f"{k} {graph_io.shape_text(v.shape)}" for k, v in feeds.items())
        # each timed in the form the run writes it: without intermediate shape annotations when the run's original
        # has none (onnxruntime fuses SkipLayerNormalization with them, 13% slower on MiniLM's int8 model)
        source = getattr(self.context, "original", None)
        paths = [graph_io.file_as_written(p, source) for p in [input_path] + [c.path for c in candidates]]
        digest = latency_cache.key(paths, feeds, rounds=self.config.rounds, threads=1, kind="fuse")
        recorded = None if self.config.remeasure else latency_cache.lookup(digest)
        if isinstance(recorded, list) and len(recorded) == len(paths):
            logger.info("fuse: latencies from the record of an earlier run (--fuse-remeasure times again)")
            figures = [tuple(r) for r in recorded]
        else:
            measured = runtime.measure_latency(paths, feeds, rounds=self.config.rounds)
            figures = [(m.median_us, m.min_us, m.max_us) for m in measured]
            latency_cache.store(digest, [list(f) for f in figures])
        for candidate, (median, low, high) in zip(candidates, figures[1:], strict=True):
            candidate.latency_us, candidate.spread_us = median, (low, high)
        logger.info("fuse: unfused %s; %s", _ms(figures[0][0]),
                    ", ".join(f"{c.name} {_ms(c.latency_us)}" for c in candidates))  # fmt: skip
        return figures[0][0], shape


def _fuse(source: Path, dst: Path, name: str, num_heads: int, width: int, attention: bool) -> _Candidate:
    """Run onnxruntime's bert fusions on the model file ``source``; the fused model is written to ``dst``."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_gelu_approximation = False  # Gelu stays exact: never rewritten to the tanh FastGelu
    options.enable_attention = attention
    with _quiet():
        fused = optimizer.optimize_model(
            str(source), model_type="bert", num_heads=num_heads, hidden_size=width, optimization_options=options,
            opt_level=0, use_gpu=False,
        )  # fmt: skip
        fused.save_model_to_file(str(dst))
    before, after = _op_counts(graph_io.load(source)), _op_counts(graph_io.load(dst))
    counts = {op: after[op] - before.get(op, 0) for op in FUSED_OPS if after.get(op, 0) > before.get(op, 0)}
    logger.info("fuse %s: %s", name, counts or "nothing fused")
    return _Candidate(name, dst, counts)


def _type_fused_outputs(model: ir.Model) -> None:
    """Give the outputs of the com.microsoft ops the element type onnx's shape inference cannot (it does not know
    them): the type of their first float input; EmbedLayerNormalization's mask index is int32. Later cost counts
    (which run the model for shapes onnx cannot infer) and quantizers need typed values."""
    for node in model.graph:
        if node.domain != "com.microsoft":
            continue
        floats = [v.dtype for v in node.inputs if v is not None and v.dtype is not None and v.dtype.is_floating_point()]
        for index, output in enumerate(node.outputs):
            if output.dtype is None:
                mask_index = node.op_type == "EmbedLayerNormalization" and index == 1
                output.dtype = ir.DataType.INT32 if mask_index else (floats[0] if floats else None)


def _op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _choose(input_us: float, candidates: list[_Candidate], margin: float) -> tuple[_Candidate | None, str]:
    fastest = min(candidates, key=lambda c: c.latency_us or float("inf"))
    if fastest.latency_us is None or fastest.latency_us > input_us * (1 - margin):
        return None, ""
    low, high = fastest.spread_us or (fastest.latency_us, fastest.latency_us)
    return fastest, (f"latency {fastest.latency_us / input_us:.2f}x the unfused model ({_ms(fastest.latency_us)}, "
                     f"rounds {low / 1000:.2f}-{high / 1000:.2f} ms; unfused {_ms(input_us)})")  # fmt: skip


def _ms(us: float | None) -> str:
    return "untimed" if us is None else f"{us / 1000:.2f} ms"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's transformer tools print and log warnings (to module-level loggers); library code stays quiet."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)

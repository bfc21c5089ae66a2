"""Command line: ``onnxopt run | inspect | validate | passes``. With its helpers (:mod:`onnxopt._cli_print`, what
it prints; :mod:`onnxopt._cli_files`, what it writes) the only module that prints.

Exit codes: 0 success; 1 validation failed (no model written unless ``--force``), or ``--target`` not reached (the
best model within the budget written); 2 bad usage or bad
input (one line on stderr, nothing written); 3 a pass or onnxopt itself failed; 130 interrupted (Ctrl-C),
143 terminated (SIGTERM).
``--debug`` shows tracebacks instead of one-line errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from onnxopt import _cli_files as _files
from onnxopt import _cli_print as _out
from onnxopt.errors import OnnxoptError, UsageError
from onnxopt.progress import plural

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
HOLDOUT = 0.3  # without --eval, lossy passes are judged on this last fraction of --data
MIN_EVAL_SAMPLES = 32  # fewer evaluation samples cannot judge a lossy pass (unless --allow-small-eval)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"onnxopt: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxopt", description="Make ONNX models small and fast: prune, split, svd, quant.")
    parser.add_argument("--version", action="version", version=f"onnxopt {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log one line per pass and stage")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="optimize a model with a list of passes and validate the result",
        usage="onnxopt run MODEL --passes P1,P2,... -o OUT [--data DATA] [--eval DATA] [options]",
        description=_RUN_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    run.add_argument("model", metavar="MODEL", help="input .onnx model (never overwritten)")
    run.add_argument("--passes", default="", metavar="P1,P2,...", help="pass names, in order (see 'onnxopt passes')")
    run.add_argument(
        "--target",
        type=_target,
        metavar="KIND=RATIO",
        help="a goal instead of --passes: latency=0.5 or size=0.25 (a ratio to the original); onnxopt tries "
        "pipelines from cheap to strong until one reaches it within the budget, else writes the best within the "
        "budget, exits 1 and says why (README, 'A goal instead of a recipe')",
    )
    run.add_argument(
        "--target-time",
        type=_positive_float,
        metavar="SECONDS",
        help="with --target: a time budget for the search; no pipeline starts after it and a running search stops "
        "at its next budget check; the best within the budget so far is written",
    )
    run.add_argument("-o", "--output", required=True, metavar="OUT", help="output .onnx path")
    run.add_argument(
        "--data",
        metavar="DATA",
        help="calibration data: .npz keyed by input name (optional 'labels'), a folder of .npz files (one feed "
        "each), or a folder of images. An .npz whose every array has one axis more than its input's full shape "
        "holds stacked feeds (axis 0 indexes the feed: recurrent states, scalars, shape inputs); arrays of the "
        "input's own rank hold samples on the batch axis",
    )
    run.add_argument(
        "--eval",
        metavar="DATA",
        help="held-out evaluation data (as --data: .npz, .npz folder or image folder) for validation",
    )
    run.add_argument("--report", metavar="FILE.json", help="write the JSON report here")
    run.add_argument(
        "--html", metavar="FILE.html", help="write a self-contained HTML report here (needs the 'report' extra)"
    )
    # the first screen of `run --help` is the options above and below; the rest goes into groups after it
    data_options = run.add_argument_group("data")
    checks = run.add_argument_group("validation and output")
    _add_preprocess_option(data_options)
    checks.add_argument("--force", action="store_true", help="write the model even when validation fails")
    run.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (no progress, no table)")
    run.add_argument(
        "--config",
        metavar="RECIPE.toml",
        help="passes, options, budget, metric and data from a TOML recipe (flags given here win; see README)",
    )
    data_options.add_argument(
        "--allow-small-eval",
        action="store_true",
        help=f"judge lossy passes on fewer than {MIN_EVAL_SAMPLES} evaluation samples (refused by default)",
    )
    checks.add_argument("--no-validate", action="store_true", help="skip the final validation")
    checks.add_argument(
        "--no-budget-split",
        action="store_true",
        help="give every lossy pass the whole budget (default: of n lossy passes the k-th searches within k/n of it, "
        "so prune,quant leaves quant room)",
    )
    run.add_argument(
        "--executor",
        default="local",
        metavar="local|ray[:ADDRESS]",
        help="where calibration statistics, budget checks and the validation run: 'local' (default, this process), "
        "'ray' (a local Ray instance over this machine's CPUs) or 'ray:HOST:PORT' (a running Ray cluster), sharded "
        "by batches with the same results; Ray needs onnxopt[ray]",
    )
    checks.add_argument("--latency", action="store_true", help="measure onnxruntime latency before and after")
    checks.add_argument(
        "--no-simplify", action="store_true", help="don't wrap the passes in the lossless 'simplify' pass"
    )
    checks.add_argument(
        "--keep-initializer-inputs",
        action="store_true",
        help="keep weights that the model lists as graph inputs overridable (simplify leaves them)",
    )
    _add_data_options(data_options)
    _add_budget_options(run)
    _add_pass_options(run)

    inspect = sub.add_parser("inspect", help="per-layer shapes, parameters and MACs")
    inspect.add_argument("model")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...", help="fix a dynamic input")

    val = sub.add_parser("validate", help="compare an optimized model with its original")
    val.add_argument("original")
    val.add_argument("optimized")
    val.add_argument("--data", help="evaluation data .npz or image folder (default: seeded random inputs)")
    _add_preprocess_option(val)
    val.add_argument("--json", action="store_true", help="print the validation report as JSON")
    val.add_argument(
        "--executor",
        default="local",
        metavar="local|ray[:ADDRESS]",
        help="where the batches run: 'local' (default), 'ray' or 'ray:HOST:PORT' (sharded over Ray workers; the "
        "same report); needs onnxopt[ray]",
    )
    _add_budget_options(val)
    _add_data_options(val)

    conv = sub.add_parser(
        "convert", help="convert a Keras file, SavedModel directory, TFLite or TorchScript file to ONNX"
    )
    conv.add_argument("source", help=".keras/.h5 file, SavedModel directory, .tflite file or TorchScript .pt")
    conv.add_argument("-o", "--output", required=True, help="output .onnx path")
    conv.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (default 17)")
    conv.add_argument("--nchw", action="store_true", help="make NHWC image inputs NCHW")
    conv.add_argument("--data", help=".npz of sample inputs to validate the conversion on (default: random)")
    conv.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=D0,D1,...",
        help="TorchScript: each input's name and example shape, in forward()'s order (torch extra)",
    )

    exp = sub.add_parser("export", help="write an ORT-format model for onnxruntime mobile, validated")
    exp.add_argument("model")
    exp.add_argument("--format", choices=["ort"], default="ort", help="output format (ORT for onnxruntime mobile)")
    exp.add_argument(
        "-o", "--output", required=True, help="output .ort file (its operator config beside it), or a directory"
    )
    exp.add_argument("--data", help=".npz of sample inputs to validate on (default: random)")
    exp.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...", help="fix a dynamic input")
    exp.add_argument("--no-usability", action="store_true", help="skip onnxruntime's mobile usability checker")

    bench = sub.add_parser("bench", help="size, params, MACs, latency and accuracy of models, side by side")
    bench.add_argument("models", nargs="+")
    bench.add_argument(
        "--data", help="evaluation .npz or image folder (labels give accuracy); its first batch times latency"
    )
    _add_preprocess_option(bench)
    bench.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated")
    bench.add_argument("--rounds", type=_positive_int, default=15)
    bench.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...", help="fix a dynamic input")
    bench.add_argument(
        "--profile", action="store_true",
        help="also show where the time goes: onnxruntime's per-kernel profile summed by kind (depthwise, 1x1 and "
        "spatial conv, matmul, layout, ...) and each model's slowest kernels, on the first --threads count",
    )  # fmt: skip
    bench.add_argument("--json", action="store_true", help="print JSON")

    sub.add_parser("passes", help="list the registered passes")
    for command in sub.choices.values():  # `onnxopt run ... -v` as well as `onnxopt -v run ...`
        # SUPPRESS: when absent here, the value given (or not) before the sub-command stands
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log one line per pass and stage")  # fmt: skip
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks and debug logs")  # fmt: skip
    return parser


def _add_budget_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("error budget (default: exact 1e-5 for exact passes)")
    group.add_argument("--max-accuracy-drop", type=_non_negative, metavar="PP", help="percentage points")
    group.add_argument(
        "--max-mse-increase", type=_non_negative, metavar="R", help="relative task-MSE increase (0.01 = 1%%)"
    )
    group.add_argument("--min-cosine", type=float, metavar="C", help="lowest per-sample cosine similarity")
    group.add_argument("--max-rel-l2", type=_non_negative, metavar="E", help="highest per-sample relative L2 error")
    group.add_argument("--max-abs", type=_non_negative, metavar="E", help="highest max|diff| / max(1, max|y|)")
    group.add_argument(
        "--max-mismatch",
        type=_non_negative,
        metavar="F",
        help="fraction of integer/boolean output values allowed to differ (default 0, or free under a task budget)",
    )
    metric = parser.add_argument_group("task metric (see README, Task metrics)")
    metric.add_argument(
        "--metric",
        metavar="NAME",
        help="top1, top5, mse, psnr, spearman, or MODULE:FUNCTION / path/file.py:FUNCTION (your own)",
    )
    metric.add_argument("--metric-output", metavar="NAME", help="the output a built-in metric reads (default: 1st fit)")
    metric.add_argument(
        "--max-metric-drop",
        type=_non_negative,
        metavar="X",
        help="metric loss allowed, in its units (increase for lower-is-better metrics); judges searches and result",
    )
    metric.add_argument(
        "--metric-limit", type=float, metavar="X", help="worst metric value allowed after (a floor; the bar for psnr)"
    )
    metric.add_argument(
        "--budget-confidence",
        type=_confidence,
        metavar="C",
        help="judge the metric at the worse end of its C bootstrap interval (e.g. 0.95) instead of its point value",
    )


def _add_preprocess_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preprocess",
        metavar="SPEC",
        help="how image folders given as data become tensors: a preset (imagenet, tf, none) and/or items, "
        "e.g. 'imagenet,crop=192' or 'none,mean=0.5,std=0.5,nhwc' (see README, Data)",
    )


def _image_data(args: argparse.Namespace, *flags: str) -> list[Any]:
    """The values of the data ``flags``, image folders wrapped with ``--preprocess`` (files stay paths).

    Raises UsageError for a folder without ``--preprocess``, or ``--preprocess`` without a folder.
    """
    from onnxopt import images
    from onnxopt.data import is_npz_folder

    values = [getattr(args, flag) for flag in flags]
    folders = [  # a folder holding .npz files is one feed per file (onnxopt.data), not images
        f"--{flag} {value}"
        for flag, value in zip(flags, values, strict=True)
        if value and Path(value).is_dir() and not is_npz_folder(value)
    ]
    if args.preprocess is None:
        if folders:
            raise UsageError(
                f"{folders[0]} is a folder of images: pass --preprocess (a preset: imagenet, tf, none; "
                "or items such as 'imagenet,crop=192'; see README, Data)"
            )
        return values
    if not folders:
        raise UsageError("--preprocess applies to image folders, but no --data/--eval folder was given")
    pre = images.parse_preprocess(args.preprocess)
    batch = getattr(args, "batch_size", None)  # None: automatic, by the images' size
    return [images.ImageFolder(v, pre, batch) if v and Path(v).is_dir() and not is_npz_folder(v) else v for v in values]


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="batch size for dynamic batch axes (default 16; image folders: up to 16, at most 4 MiB of input)",
    )
    parser.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...", help="fix a dynamic input")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed for random inputs and passes")


_RUN_DESCRIPTION = """\
Optimize MODEL with the passes named, validate the result against MODEL and write it to OUT.

  onnxopt run model.onnx --passes prune,quant --data calib.npz --eval eval.npz -o out.onnx
  onnxopt run model.onnx --target latency=0.5 --data calib.npz --eval eval.npz -o out.onnx  (passes chosen)

Lossy passes (prune, split, svd, quant, share, depth) search the strongest setting within the error budget: by
default 0.5 pp of accuracy when the data has labels, else a per-sample cosine of 0.999; runs of exact passes
only must match to 1e-5. --config reads all of it from a recipe file.
"""
_METAVARS = {int: "N", float: "X", str: "TEXT"}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """A wider option column, the description's line breaks kept, and "(default: X)" where a default means
    something (not on switches or options that default to "not given")."""

    def __init__(self, prog: str) -> None:
        width = min(shutil.get_terminal_size((100, 24)).columns, 110)
        super().__init__(prog, max_help_position=34, width=width)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == "" or default == argparse.SUPPRESS
        if not action.option_strings or "default" in text or unset:
            return text
        return f"{text} (default: %(default)s)"


def _version() -> str:
    from onnxopt import __version__

    return __version__


def _add_pass_options(parser: argparse.ArgumentParser) -> None:
    from onnxopt import registry

    for name in registry.available():
        try:
            cls = registry.get_pass(name)
        except OnnxoptError:
            continue
        fields = dataclasses.fields(cls.config_class)
        if not fields:
            continue
        group = parser.add_argument_group(f"'{name}' pass options", cls.summary())
        for field in fields:
            flag = f"--{name}-{field.name.replace('_', '-')}"
            help_text = field.metadata.get("help", "").replace("%", "%%")
            default = field.default if field.default is not dataclasses.MISSING else None
            dest = f"pass__{name}__{field.name}"
            # the flags default to None ("not given", so only given options reach the pass); the help shows the
            # pass's own default
            unset = field.metadata.get("unset")  # an on/off option whose third value, None, is what it means
            if isinstance(default, bool) or unset is not None:
                help_text += f" (default: {unset if default is None else 'on' if default else 'off'})"
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                kind = type(default) if default is not None else str
                if default not in (None, ""):
                    help_text += f" (default: {default})"
                group.add_argument(
                    flag, dest=dest, type=kind, default=None, choices=field.metadata.get("choices"), help=help_text,
                    metavar=None if field.metadata.get("choices") else _METAVARS.get(kind, "TEXT"),
                )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    quiet = not (args.debug or args.verbose)
    if quiet:
        _quiet_libraries()
    with _Signals() as signals, warnings.catch_warnings():
        if quiet:  # numpy RuntimeWarnings, library deprecations: stderr carries onnxopt's one-line errors only
            warnings.simplefilter("ignore")
        return _dispatch(args, signals)


def _quiet_libraries() -> None:
    """Keep onnxscript's and onnxruntime's warnings off stderr (``--verbose`` or ``--debug`` show them)."""
    for name in ("onnxscript", "onnxruntime", "onnx_ir", "tf2onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import onnxruntime

    from onnxopt import runtime

    onnxruntime.set_default_logger_severity(4)  # its C++ log ("[W:onnxruntime:...]" in colour) goes to fd 2
    runtime.LOG_SEVERITY = 4  # a failed run is raised (one line), not also logged


class _Signals:
    """SIGINT (Ctrl-C) and SIGTERM raise KeyboardInterrupt once; later ones are ignored while the run cleans up.

    Temporary folders and half-written outputs are removed by ``finally`` blocks on the way out; a second
    Ctrl-C or a SIGTERM arriving then would cut that cleanup short and leave them behind.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._saved[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: Python's own handling stays
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)


def _dispatch(args: argparse.Namespace, signals: _Signals) -> int:
    try:
        from onnxopt import runtime

        runtime.work_threads()  # a bad $ONNXOPT_THREADS is refused before anything runs
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if signals.signum == signal.SIGTERM:
            sys.stderr.write("onnxopt: terminated; nothing was written\n")
            return 128 + signal.SIGTERM
        sys.stderr.write("onnxopt: interrupted; nothing was written\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `onnxopt inspect big.onnx | head`
        sys.stderr.close()
        return EXIT_OK
    except OnnxoptError as e:
        if args.debug:
            raise
        sys.stderr.write(f"onnxopt: error: {_one_line(e)}\n")
        return EXIT_USAGE
    except MemoryError as e:  # a model or data too large for this machine: bad input, not a crash
        if args.debug:
            raise
        sys.stderr.write(f"onnxopt: error: out of memory ({_one_line(e)}); the model or data is too large\n")
        return EXIT_USAGE
    except Exception as e:
        if args.debug:
            raise
        sys.stderr.write(f"onnxopt: failed: {_one_line(e)} (run with --debug for the traceback)\n")
        return EXIT_FAILED


def _cmd_passes(args: argparse.Namespace) -> int:
    from onnxopt import registry

    table = registry.available()
    width = max((len(n) for n in table), default=0)
    for name in table:
        cls = registry.get_pass(name)
        kind = "exact" if cls.exact else "lossy"
        print(f"{name:<{width}}  [{kind}]  {cls.summary()}")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from onnxopt import cost, data, graph

    model = graph.load(args.model)
    shapes = data.parse_shape_overrides(args.input_shape)
    result = cost.estimate(model, input_shapes=shapes)
    if args.json:
        payload = result.to_json() | {"nodes": [dataclasses.asdict(n) for n in result.nodes]}
        print(json.dumps(payload, indent=1))
        return EXIT_OK
    specs = ", ".join(s.describe() for s in data.input_specs(model))
    print(f"{args.model}: opset {graph.default_opset(model)}, IR {model.ir_version}, inputs {specs}")
    rows = [("node", "op", "output shape", "params", "MACs")]
    for node in result.nodes:
        if node.macs or node.params:
            shape = graph.shape_text(node.output_shape) if node.output_shape else "?"
            rows.append((node.name[-40:], node.op_type, shape, f"{node.params:,}", f"{node.macs:,}"))
    _out.print_table(rows)
    print(
        f"total: {result.params:,} params, {result.macs:,} MACs ({result.macs / 1e9:.3f} G), "
        f"{result.ops:,} other ops, {result.bytes:,} bytes, {len(result.nodes)} nodes"
    )
    for node in result.nodes:
        if node.note:  # If/Loop/Scan: how their subgraphs were counted
            print(f"{node.name or '(unnamed)'} ({node.op_type}): {node.note}")
    _out.print_cost_shapes(result, "--input-shape" if shapes else "declared shapes, a dynamic batch axis 1")
    _out.print_partial(result)
    unknown = sum(1 for n in result.nodes if n.output_shape is None)
    if unknown:
        print(f"note: {unknown} nodes have unknown shapes (their MACs count 0); fix dynamic inputs with --input-shape")
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from onnxopt import data, graph
    from onnxopt.validate import Budget, validate

    original = graph.load(args.original)
    graph.load(args.optimized)  # clear errors for a bad file before onnxruntime sees it
    shapes = data.parse_shape_overrides(args.input_shape)
    (data_arg,) = _image_data(args, "data")
    budget = _budget(args)
    metric = None
    if args.metric is not None:
        from onnxopt import metrics

        metric = metrics.resolve(args.metric, output=args.metric_output)
    if data_arg:
        pair = metric is not None and metric.pair
        source = data.as_source(data_arg, original, batch_size=args.batch_size or 16, what="data", pair_labels=pair)
    else:
        source = data.random_source(original, seed=args.seed, shapes=shapes)
    budget = budget or Budget.default(exact=False, has_labels=source.has_labels)
    from onnxopt.executor import make_executor

    executor = make_executor(args.executor)
    report = validate(args.original, args.optimized, source, budget, metric=metric, executor=executor)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        _out.print_validation(report)
    return EXIT_OK if report.ok else EXIT_INVALID


def _cmd_convert(args: argparse.Namespace) -> int:
    from onnxopt import convert

    source, output = Path(args.source), Path(args.output)
    _files.check_output_path(source, output)
    data = None
    if args.data:
        from onnxopt.data import load_npz

        data = load_npz(Path(args.data), "data")
    from onnxopt.data import parse_shape_overrides

    shapes = parse_shape_overrides(args.input_shape)
    result = convert.convert_file(source, output, opset=args.opset, nchw=args.nchw, data=data, input_shapes=shapes)
    print(
        f"wrote {output}: validated against the source on {plural(result.samples, 'sample')}, "
        f"max error {result.max_error:.3g} (tolerance {result.tolerance:g})"
    )
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from onnxopt import data, graph
    from onnxopt.export import export_ort

    source = None
    if args.data:
        source = data.as_source(args.data, graph.load(args.model), what="data")
    shapes = data.parse_shape_overrides(args.input_shape)
    result = export_ort(args.model, args.output, data=source, input_shapes=shapes, usability=not args.no_usability)
    print(
        f"wrote {result.ort_path} and {result.config_path}: the ORT model matches the ONNX model on "
        f"{plural(result.samples, 'sample')} (max error {result.max_abs:.3g})"
    )
    if result.usability:
        print("mobile execution providers (onnxruntime's usability checker; XNNPACK is not covered):")
        for support in result.usability:
            print(f"  {support.describe()}")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from onnxopt import data
    from onnxopt.benchmark import bench_models

    try:
        threads = [int(t) for t in args.threads.split(",") if t]
    except ValueError:
        raise UsageError(f"--threads {args.threads!r}: expected comma-separated integers") from None
    (data_arg,) = _image_data(args, "data")
    results = bench_models(
        args.models, data=data_arg, threads=threads, rounds=args.rounds,
        input_shapes=data.parse_shape_overrides(args.input_shape),
        profile_runs=args.rounds if args.profile else None,
    )  # fmt: skip
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=1))
        return EXIT_OK
    header = ["model", "bytes", "params", "MACs"] + [f"{t} thr us (min-max)" for t in threads]
    header += ["accuracy %", "agreement"]
    rows = [tuple(header)]
    for r in results:
        cells = [Path(r.path).name, f"{r.bytes:,}", f"{r.params:,}", f"{r.macs:,}"]
        for t in threads:
            lat = r.latency_us[t]
            cells.append(f"{lat['median']:.1f} ({lat['min']:.0f}-{lat['max']:.0f})")
        cells.append("-" if r.accuracy is None else f"{r.accuracy:.2f}")
        cells.append("-" if r.agreement is None else f"{r.agreement:.4f}")
        rows.append(tuple(cells))
    _out.print_table(rows)
    for r in results:
        print(f"{Path(r.path).name}: MACs per sample at {_out.shapes_text(r.input_shapes)}, "
              f"latency on {_out.shapes_text(r.latency_inputs)}")  # fmt: skip
        if r.macs_partial:
            shown = "; ".join(f"{u['node']} ({u['op_type']}: {u['reason']})" for u in r.uncounted[:3])
            more = f"; {len(r.uncounted) - 3} more with --json" if len(r.uncounted) > 3 else ""
            print(f"note: its MACs are partial, {len(r.uncounted)} nodes not counted: {shown}{more}")
    if args.profile:
        _out.print_profiles([(Path(r.path).name, r.profile) for r in results if r.profile is not None])
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    if not args.quiet:
        return _run(args)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # errors still go to stderr
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from onnxopt import data, registry
    from onnxopt.manager import PassManager
    from onnxopt.progress import ProgressView

    if args.config:
        from onnxopt import recipe

        defaults = vars(build_parser().parse_args(["run", args.model, "-o", args.output]))
        recipe.apply(args, recipe.load(args.config), defaults, Path(args.config))
    source, output = Path(args.model), Path(args.output)
    _files.check_output_path(source, output)
    if args.report:
        _files.check_output_path(source, Path(args.report))
    if args.html:
        from onnxopt import html_report

        _files.check_output_path(source, Path(args.html))
        html_report.require_matplotlib()
    _files.check_collisions(args)
    calib, held_out = _image_data(args, "data", "eval")
    if args.target is not None:
        return _run_goal(args, source, output, calib, held_out)
    if args.target_time is not None:
        raise UsageError("--target-time is the time budget of a --target search: give --target")
    names = [n.strip() for n in args.passes.split(",") if n.strip()]
    if names and not args.no_simplify and "simplify" not in names:
        names = ["simplify", *names]
        if registry.get_pass(names[-1]).simplify_after:
            names.append("simplify")
    options = _pass_options(args, names)
    if args.keep_initializer_inputs:
        if "simplify" not in names:
            raise UsageError("--keep-initializer-inputs applies to the 'simplify' pass, which this run does not use")
        options.setdefault("simplify", {})["keep_initializer_inputs"] = True
    passes = [registry.make_pass(name, **options.get(name, {})) for name in names]
    view = None if args.quiet else ProgressView()
    manager = PassManager(
        passes,
        data=calib,
        eval_data=held_out,
        budget=_budget(args),
        validate=not args.no_validate,
        batch_size=args.batch_size or 16,
        input_shapes=data.parse_shape_overrides(args.input_shape),
        seed=args.seed,
        progress=view,
        simplify=False,  # already placed in `names`, with the user's simplify options
        metric=args.metric,
        metric_output=args.metric_output,
        holdout=HOLDOUT,  # without --eval, lossy passes are judged on the last 30% of --data
        min_eval_samples=0 if args.allow_small_eval else MIN_EVAL_SAMPLES,
        executor=args.executor,
        budget_split=not args.no_budget_split,
    )
    if not passes:  # it would only copy the model; the model and the data are still read, so their errors come first
        manager.validate = False
        manager.run(source)
        raise UsageError("nothing to do: give --passes (for example --passes simplify; 'onnxopt passes' lists them)")
    try:
        report = manager.run(source)
    finally:
        if view is not None:
            view.close()
    latency = _measure_latency(source, report.model, manager, args) if args.latency else None
    _out.print_run(report, latency)
    payload = report.to_json()
    if latency is not None:
        payload["latency_us"] = latency
    from onnxopt import recipe

    judged_by = report.validation.budget if report.validation is not None else _budget(args)
    payload["recipe"] = recipe.effective(args, passes, judged_by)  # `--config` on it repeats this run
    if not report.ok and not args.force:
        _files.write_report(args, payload)
        where = sys.stderr if args.quiet else sys.stdout
        print(f"validation failed: nothing written to {output} (use --force to write it anyway)", file=where)
        return EXIT_INVALID
    page = None
    if args.html:
        page = html_report.render(report, latency=latency, model_name=str(source), output_name=str(output))
    # byte for byte when nothing changed: a re-serialized copy gains value_info and grows
    _files.write_outputs(
        args, report.model, output, payload, page, source=source,
        copy_from=source if _files.unchanged_copy(source, report) else None,
    )  # fmt: skip
    return EXIT_OK if report.ok else EXIT_INVALID


def _run_goal(args: argparse.Namespace, source: Path, output: Path, calib: Any, held_out: Any) -> int:
    """``run --target``: the goal search (:mod:`onnxopt.goal`), each point printed as it is measured.

    Exit 0 when a pipeline reaches the target within the budget (written to ``-o``); 1 when none does: the best
    within the budget is written (nothing when no pipeline holds the budget) and the reason printed.
    """
    from onnxopt import data, goal, recipe, registry
    from onnxopt.progress import ProgressView

    if args.passes.strip():
        raise UsageError("--target chooses the passes itself: give --target or --passes, not both")
    if args.no_validate:
        raise UsageError("--target judges every pipeline by its validation: drop --no-validate")
    if calib is None:
        raise UsageError("--target needs calibration data: give --data (every pipeline it tries is lossy)")
    options = _pass_options(args, list(registry.available()))
    unused = [name for name in options if name not in goal.PASSES]
    if unused:
        raise UsageError(f"--target does not use the '{unused[0]}' pass: drop its --{unused[0]}-* options")
    if args.keep_initializer_inputs:
        options.setdefault("simplify", {})["keep_initializer_inputs"] = True
    view = None if args.quiet else ProgressView()
    announced = []

    def announce() -> None:  # once the model is read: bad input gets its one error line alone
        if not announced:
            announced.append(True)
            print(f"goal: {args.target.describe()}; trying pipelines from cheap to strong")

    def progress(event) -> None:
        announce()
        view(event)

    def on_point(point) -> None:
        announce()
        if view is not None:
            view.close()
        print(f"goal point {_out.goal_point_line(point)}")

    try:
        result = goal.seek(
            source, args.target, data=calib, eval_data=held_out, budget=_budget(args), metric=args.metric,
            metric_output=args.metric_output, options=options, batch_size=args.batch_size or 16,
            input_shapes=data.parse_shape_overrides(args.input_shape), seed=args.seed,
            simplify=not args.no_simplify, holdout=HOLDOUT,
            min_eval_samples=0 if args.allow_small_eval else MIN_EVAL_SAMPLES, executor=args.executor,
            progress=None if view is None else progress, on_point=on_point, max_seconds=args.target_time,
        )  # fmt: skip
    finally:
        if view is not None:
            view.close()
    report, chosen = result.report, result.chosen
    latency = None
    if chosen is not None and chosen.latency_us is not None:
        latency = {
            "before": round(chosen.original_latency_us, 2),
            "after": round(chosen.latency_us, 2),
            "inputs": result.latency_inputs,
            "inputs_from": result.latency_from,
        }
    _out.print_goal(result)
    if report is not None:
        print(f"chosen: {chosen.pipeline}")
        _out.print_run(report, latency)
    print(("target reached: " if result.reached else "") + result.reason)
    payload = report.to_json() if report is not None else {}
    payload["goal"] = result.to_json()
    if latency is not None:
        payload["latency_us"] = latency
    if report is not None:
        payload["recipe"] = recipe.effective(args, result.passes, report.validation.budget)  # the chosen pipeline
    if report is None:
        _files.write_report(args, payload)
        where = sys.stderr if args.quiet else sys.stdout
        print(f"no pipeline holds the budget: nothing written to {output}", file=where)
        return EXIT_INVALID
    page = None
    if args.html:
        from onnxopt import html_report

        page = html_report.render(
            report, latency=latency, model_name=str(source), output_name=str(output), goal=result
        )  # fmt: skip
    _files.write_outputs(args, report.model, output, payload, page, source=source)
    return EXIT_OK if result.reached else EXIT_INVALID


def _pass_options(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if not key.startswith("pass__") or value is None:
            continue
        _, pass_name, field = key.split("__", 2)
        if pass_name not in names:
            flag = f"--{pass_name}-{field.replace('_', '-')}"
            raise UsageError(f"{flag} was given but '{pass_name}' is not in --passes")
        options.setdefault(pass_name, {})[field] = value
    return options


def _budget(args: argparse.Namespace):
    from onnxopt.validate import Budget

    budget = Budget(
        max_accuracy_drop=args.max_accuracy_drop,
        max_mse_increase=args.max_mse_increase,
        min_cosine=args.min_cosine,
        max_rel_l2=args.max_rel_l2,
        max_abs=args.max_abs,
        max_metric_drop=args.max_metric_drop,
        metric_limit=args.metric_limit,
        confidence=args.budget_confidence,
        max_mismatch=args.max_mismatch,
    )
    if args.budget_confidence is not None and budget.max_metric_drop is None and budget.metric_limit is None:
        if budget.max_accuracy_drop is None:
            raise UsageError("--budget-confidence applies to a metric budget: give --max-metric-drop or --metric-limit")
    if args.metric is None and (args.metric_output is not None or budget.max_metric_drop is not None):
        flag = "--metric-output" if args.metric_output is not None else "--max-metric-drop"
        raise UsageError(f"{flag} needs --metric (a metric budget is in the metric's units)")
    if args.metric is None and budget.metric_limit is not None:
        raise UsageError("--metric-limit needs --metric (a metric budget is in the metric's units)")
    return None if budget.is_empty() else budget


def _measure_latency(source: Path, optimized, manager, args) -> dict[str, Any]:
    """Latency before and after on the data's own first batch (``--eval``, else ``--data``), else random inputs."""
    from onnxopt import graph
    from onnxopt.runtime import latency_feeds, measure_latency

    if manager.eval_data is not None:
        data, what = manager.eval_data, "evaluation data"
    else:
        data, what = manager.data, "calibration data"
    timing = latency_feeds(
        graph.load(source), data, input_shapes=manager.input_shapes, batch_size=manager.batch_size, seed=args.seed,
        what=what,
    )  # fmt: skip
    before, after = measure_latency([source, optimized], timing.feeds)
    return {
        "before": round(before.median_us, 2),
        "after": round(after.median_us, 2),
        "inputs": timing.shapes,
        "inputs_from": timing.source,
    }


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _confidence(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (e.g. 0.95), got {text}")
    return value


def _target(text: str):
    from onnxopt.goal import Target

    try:
        return Target.parse(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())[:500]


_COMMANDS = {
    "run": _cmd_run,
    "inspect": _cmd_inspect,
    "validate": _cmd_validate,
    "passes": _cmd_passes,
    "convert": _cmd_convert,
    "export": _cmd_export,
    "bench": _cmd_bench,
}

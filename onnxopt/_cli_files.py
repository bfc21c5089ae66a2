"""What ``onnxopt run`` writes, and the checks made before anything runs.

Every file is written atomically (a temporary file in the same directory, then ``os.replace``), the model first, so an
interrupted run leaves either the old file or the complete new one, never half of one. The checks refuse, with a
:class:`~onnxopt.errors.UsageError` (one line, exit 2), an output that would overwrite the input model, its external
data, ``--data``/``--eval`` or another output, and a directory that cannot be written, before any pass runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from onnxopt.errors import UsageError

__all__ = ["check_output_path", "check_collisions", "write_report", "write_outputs", "unchanged_copy"]


def check_output_path(source: Path, output: Path) -> None:
    if output.exists() and source.exists() and os.path.samefile(source, output):
        raise UsageError(f"{output}: refusing to overwrite the input model; choose another output path")
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; give a file name")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UsageError(f"{output}: {parent} {what}")
    try:  # before the run, not after it: root passes os.access everywhere, yet /proc or a full disk refuse files
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise UsageError(f"{output}: directory {parent} is not writable ({e.strerror or e})") from None


def check_collisions(args: argparse.Namespace) -> None:
    """Exit 2 before anything runs when an output of ``run`` is one of its inputs or another output.

    Inputs: the model, its external-data files, ``--data`` and ``--eval``; outputs: ``-o``, the
    ``<output>.data`` file a large model is written with, ``--report`` and ``--html``. Paths are compared
    after resolving ``..`` and symlinks, and by inode when both exist (hard links).
    """
    from onnxopt import graph

    source = Path(args.model)
    inputs = [("the input model", source)]
    inputs += [("the input model's external data", p) for p in graph.external_data_files(source)]
    inputs += [(f"--{flag}", Path(getattr(args, flag))) for flag in ("data", "eval") if getattr(args, flag)]
    outputs = [("-o", Path(args.output)), ("the output's external data", Path(f"{args.output}.data"))]
    outputs += [(f"--{flag}", Path(getattr(args, flag))) for flag in ("report", "html") if getattr(args, flag)]
    for index, (flag, path) in enumerate(outputs):
        for what, other in inputs + outputs[:index]:
            if _same_path(path, other):
                raise UsageError(f"{path}: {flag} would overwrite {what} ({other}); nothing was written")


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop: not a file anything can be written to or read from
        return False


def write_report(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    """``--report``, when asked for (also where validation failed and no model is written)."""
    if args.report:
        _write_json_atomic(Path(args.report), payload)
        print(f"wrote {args.report}")


def write_outputs(
    args: argparse.Namespace,
    model: Any,
    output: Path,
    payload: dict[str, Any],
    page: Any,
    *,
    copy_from=None,
    source: Path | None = None,
) -> None:
    """What ``run`` writes: the model first (an interrupted save leaves no report of it), a byte-for-byte copy of
    ``copy_from`` instead when given, then ``--report`` and the rendered ``--html`` page. The model carries
    intermediate shape annotations only when its ``source`` did (:func:`onnxopt.graph.drop_value_info`)."""
    from onnxopt import graph

    if copy_from is not None:
        _copy_atomic(copy_from, output)
    else:
        if graph.writes_without_value_info(source):
            graph.drop_value_info(model)
        graph.save(model, output)
    print(f"wrote {output}")
    write_report(args, payload)
    if page is not None:
        from onnxopt import html_report

        html_report.write(args.html, page)
        print(f"wrote {args.html}")


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1)
        os.chmod(tmp, _file_mode())  # mkstemp's 0600 would hide the report from the user's group, unlike the model
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def unchanged_copy(source: Path, report) -> bool:
    """No pass changed the model, which is one self-contained file at its own opset: the output is a copy."""
    from onnxopt import graph

    if any(record.modified for record in report.passes) or graph.external_data_files(source):
        return False
    import onnx

    proto = onnx.load(str(source), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return opset == graph.default_opset(report.model)  # not upgraded on load (opset < 7)


def _copy_atomic(source: Path, output: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent if str(output.parent) else ".")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

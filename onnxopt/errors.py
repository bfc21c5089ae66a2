"""Typed errors: every user-facing failure of onnxopt is an OnnxoptError with a one-line message."""

from __future__ import annotations

__all__ = [
    "OnnxoptError",
    "ModelLoadError",
    "ModelSaveError",
    "DataError",
    "CalibrationError",
    "UnknownPassError",
    "ValidationError",
    "UsageError",
    "first_line",
]


class OnnxoptError(Exception):
    """Base of onnxopt's errors. The CLI prints ``str(error)`` on one line and exits 2."""


class UsageError(OnnxoptError):
    """A command line or API call that cannot mean anything (bad option value, output equal to input)."""


class ModelLoadError(OnnxoptError):
    """The model file is missing, unreadable, not ONNX, or fails the checker."""


class ModelSaveError(OnnxoptError):
    """The output path cannot be written."""


class DataError(OnnxoptError):
    """Calibration or evaluation data that does not match the model (names, shapes, dtypes, NaN/Inf)."""


class CalibrationError(DataError):
    """Statistics could not be collected (no batch arrived, a value cannot be exposed)."""


class UnknownPassError(OnnxoptError):
    """A pass name that is not in the registry."""


class ValidationError(OnnxoptError):
    """The optimized model misses the error budget; carries the report."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), for one-line reports."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:limit]

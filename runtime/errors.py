"""Errors that reach the user as one line, without a traceback."""

from __future__ import annotations

TRT_HINT = (
    "install TensorRT 10.x or 11.x for your CUDA (e.g. pip install tensorrt-cu12), "
    "or on a Jetson use JetPack's own in a venv made with --system-site-packages"
)


class SegError(Exception):
    """A problem with the user's input or environment, phrased as what is wrong and what to do."""


class InputError(SegError):
    """Bad input data: a missing, corrupt or unsuitable file."""


class SpecError(SegError):
    """A model spec that is missing, malformed or from an unknown newer schema."""


class MissingDependency(SegError):
    """An optional dependency is not installed; the message names the extra."""


def require(module: str, extra: str, purpose: str, hint: str | None = None):
    """Import ``module`` or raise a MissingDependency that names the extra (or ``hint``) to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{purpose} needs the '{module}' package: {hint or f'pip install unet-edge[{extra}]'}"
        ) from exc


def first_line(exc: BaseException | str, limit: int = 160) -> str:
    """An exception's message as one short line for an error message (its type if it says nothing)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return text.splitlines()[0][:limit]

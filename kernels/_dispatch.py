"""Shared helpers for the kernel dispatchers: tracing detection, the optional Triton import, fallback logging."""

from __future__ import annotations

import functools
import importlib
import logging

import torch

__all__ = ["is_exporting_or_tracing", "log_fallback_once", "reset_fallback_log", "triton_status"]

_TRITON_INSTALL_HINT = "pip install 'nasforge[triton]'"
_logged_fallbacks: set[tuple[str, str]] = set()


def is_exporting_or_tracing() -> bool:
    """True while ``torch.onnx.export`` or ``torch.jit.trace``/``script`` records the graph (use the reference)."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


@functools.cache
def triton_status() -> tuple[bool, str]:
    """``(True, "")`` when ``triton`` imports, else ``(False, reason with the pip line that fixes it)``."""
    try:
        importlib.import_module("triton")
    except (ImportError, OSError, RuntimeError) as error:
        return False, f"triton is not importable ({error}); {_TRITON_INSTALL_HINT}"
    return True, ""


def log_fallback_once(logger: logging.Logger, operation: str, reason: str, on_gpu: bool) -> None:
    """Log that ``operation`` runs its PyTorch reference because of ``reason``, once per (operation, reason).

    A fallback with inputs on a GPU is a performance surprise (WARNING); on CPU it is the normal path (INFO).
    """
    key = (operation, reason)
    if key in _logged_fallbacks:
        return
    _logged_fallbacks.add(key)
    level = logging.WARNING if on_gpu else logging.INFO
    logger.log(level, "%s: using the PyTorch reference, not the Triton kernel: %s", operation, reason)


def reset_fallback_log() -> None:
    """Forget which fallbacks were logged (for tests)."""
    _logged_fallbacks.clear()

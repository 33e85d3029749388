"""Registered blocks. Importing this package registers every built-in block."""

from __future__ import annotations

import importlib

from .base import (
    REGISTRY,
    BlockChoices,
    BlockContext,
    BlockType,
    BoolRule,
    ElasticBlock,
    FloatRule,
    IntRule,
    OptionRule,
    block_type,
    choice,
    register_block,
    type_of,
)

BUILTIN_BLOCK_MODULES = ("mbconv", "metaformer", "gla")


def ensure_registered() -> None:
    """Import every built-in block module (idempotent)."""
    for module in BUILTIN_BLOCK_MODULES:
        importlib.import_module(f"{__name__}.{module}")


__all__ = [
    "REGISTRY",
    "BlockChoices",
    "BlockContext",
    "BlockType",
    "BoolRule",
    "ElasticBlock",
    "FloatRule",
    "IntRule",
    "OptionRule",
    "block_type",
    "choice",
    "ensure_registered",
    "register_block",
    "type_of",
]

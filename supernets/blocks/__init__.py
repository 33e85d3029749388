"""Blocks: one module each, registered in ``BLOCKS`` under its YAML name when the module is imported. Every module of
this package is imported on the first look-up in ``BLOCKS``, so adding a block is one file (plus its test)."""

from __future__ import annotations

from .base import (
    BLOCKS,
    SHRINK_KINDS,
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
    choice_index,
    choice_problem,
    field_defaults,
    field_shrinks,
    register_block,
    type_of,
    value_kind,
    without_defaults,
)

__all__ = [
    "BLOCKS",
    "BlockChoices",
    "BlockContext",
    "BlockType",
    "BoolRule",
    "ElasticBlock",
    "FloatRule",
    "IntRule",
    "OptionRule",
    "SHRINK_KINDS",
    "block_type",
    "choice",
    "choice_index",
    "choice_problem",
    "field_defaults",
    "field_shrinks",
    "register_block",
    "type_of",
    "value_kind",
    "without_defaults",
]

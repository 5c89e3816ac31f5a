"""semid: hierarchical semantic IDs for generative recommenders."""
from __future__ import annotations

from typing import Any

__all__ = ["SemanticIdTokenizer", "SemidConfig"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import semid.train` on a GPU worker does not pull in the parquet stack.
    if name == "SemanticIdTokenizer":
        from semid.tokenizer import SemanticIdTokenizer

        return SemanticIdTokenizer
    if name == "SemidConfig":
        from semid.config import SemidConfig

        return SemidConfig
    raise AttributeError(f"module 'semid' has no attribute {name!r}")

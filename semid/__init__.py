"""semid: hierarchical semantic IDs for generative recommenders."""
from __future__ import annotations

import functools
from typing import Any

__all__ = ["SemanticIdTokenizer", "SemidConfig", "__version__"]


@functools.cache
def installed_version() -> str:
    """The installed distribution's version (what `semid --version` prints and model directories record).
    Looked up on first use: importlib.metadata would add tens of milliseconds to every `import semid`."""
    from importlib import metadata

    try:
        return metadata.version("semid")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    # Lazy, so that `import semid.train` on a GPU worker does not pull in the parquet stack.
    if name == "SemanticIdTokenizer":
        from semid.tokenizer import SemanticIdTokenizer

        return SemanticIdTokenizer
    if name == "__version__":
        return installed_version()
    if name == "SemidConfig":
        from semid.config import SemidConfig

        return SemidConfig
    raise AttributeError(f"module 'semid' has no attribute {name!r}")

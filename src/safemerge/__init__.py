"""safemerge: safety-aware merging of large language models.

The public API is a handful of functions; each CLI sub-command is a thin wrapper over one of them.
Imports are lazy so that `import safemerge` stays cheap (no torch until a function is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "merge": "safemerge.engine",
    "mergealign": "safemerge.recipes",
    "multimerge": "safemerge.multistage",
    "extract_lora": "safemerge.extract",
    "MergeConfig": "safemerge.config",
    "load_config": "safemerge.config",
    "build_testbed": "safemerge.testbed",
    "evaluate_safety": "safemerge.evaluate",
    "evaluate_domain": "safemerge.evaluate",
    "similarity": "safemerge.evaluate",
    "audit": "safemerge.evaluate",
    "compare": "safemerge.comparison",
    "update_card": "safemerge.publishing",
    "publish": "safemerge.publishing",
    # the errors a caller may catch: every one is a SafemergeError (the CLI prints it as one line, exit code 2)
    "SafemergeError": "safemerge.errors",
    "ConfigError": "safemerge.errors",
    "CheckpointError": "safemerge.errors",
    "OutputExistsError": "safemerge.errors",
    "DataError": "safemerge.data.loaders",
    "PublishError": "safemerge.publishing",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'safemerge' has no attribute {name!r}")

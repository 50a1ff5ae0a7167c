"""Optional dependencies: import one, or fail with an ``ImportError`` that names the extra to install.

The plain install (``pip install flwr-invariant``) brings ``flwr`` and ``numpy`` only.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from types import ModuleType

__all__ = ["require", "require_installed"]


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    """``import module``; if it is missing, ``ImportError`` saying ``needed_by`` needs ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise _missing(needed_by, [module], extra) from error


def require_installed(modules: Iterable[str], extra: str, needed_by: str) -> None:
    """``ImportError`` naming ``extra`` unless every top-level module is installed (nothing is imported)."""
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise _missing(needed_by, missing, extra)


def _missing(needed_by: str, modules: list[str], extra: str) -> ImportError:
    return ImportError(
        f"{needed_by} needs {', '.join(map(repr, modules))}, which the plain install does not bring; "
        f"install the extra: pip install 'flwr-invariant[{extra}]'"
    )

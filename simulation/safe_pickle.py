"""Restricted unpickling for the edge-case files, which are pickles of numpy arrays.

``pickle.load`` runs whatever callables a file names; a tampered download could
run ``os.system``. :class:`NumpyOnlyUnpickler` resolves only the few globals a
pickled ``numpy.ndarray`` needs and refuses every other one.
"""

from __future__ import annotations

import io
import pickle
import types
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "NumpyOnlyUnpickler",
    "PlaceholderTorchUnpickler",
    "load_numpy_pickle",
    "placeholder_pickle_module",
]

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 (out-of-band buffers)
    ("numpy._core.numeric", "_frombuffer"),
    ("codecs", "encode"),  # protocol 2 encodes the raw bytes as a latin-1 str
    ("_codecs", "encode"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An ``Unpickler`` whose ``find_class`` allows only what a numpy array needs."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` if allowed, else raise ``pickle.UnpicklingError``."""
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            )
        return super().find_class(module, name)


def load_numpy_pickle(path: str | Path) -> np.ndarray:
    """Load one pickled ``numpy.ndarray`` from ``path`` with :class:`NumpyOnlyUnpickler`.

    Raises ``FileNotFoundError`` if absent and ``ValueError`` (naming the file)
    if it is corrupt, holds forbidden globals, or is not a single ndarray.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"edge-case file not found: {path}")
    try:
        with path.open("rb") as handle:
            obj = NumpyOnlyUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"cannot load {path} as a pickled numpy array: {err}") from err
    if not isinstance(obj, np.ndarray):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a numpy.ndarray")
    return obj


class _Placeholder:
    """Stands in for a torchvision dataset object; its state lands in ``__dict__``."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


_TORCH_SAVE_GLOBALS = {
    ("collections", "OrderedDict"),
    *(
        (builtins, name)
        for builtins in ("builtins", "__builtin__")
        for name in ("set", "frozenset", "list", "dict", "tuple")
    ),
}


def _is_torch_rebuilder(module: str, name: str) -> bool:
    """Tensor/storage rebuild functions and dtypes of ``torch`` (what ``torch.save`` emits)."""
    if not (module == "torch" or module.startswith("torch.")):
        return False
    return (
        name.startswith("_rebuild")
        or name.endswith("Storage")
        or name in ("device", "Size", "uint8", "int64")
    )


class PlaceholderTorchUnpickler(pickle.Unpickler):
    """For ``torch.load(pickle_module=...)`` of the ARDIS ``torch.save`` files.

    torchvision classes become :class:`_Placeholder`; only ``torch.*`` tensor and
    storage rebuilders and ``collections.OrderedDict`` are resolved; anything
    else is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve allowed globals, placeholder torchvision ones, refuse the rest."""
        if module.startswith("torchvision"):
            return _Placeholder
        if (module, name) in _TORCH_SAVE_GLOBALS or _is_torch_rebuilder(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def placeholder_pickle_module() -> types.ModuleType:
    """A pickle-like module for ``torch.load(..., pickle_module=...)`` (see above)."""
    module = types.ModuleType("placeholder_pickle")
    module.Unpickler = PlaceholderTorchUnpickler  # type: ignore[attr-defined]
    module.load = lambda f, **kw: PlaceholderTorchUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    module.loads = lambda b, **kw: PlaceholderTorchUnpickler(io.BytesIO(b), **kw).load()  # type: ignore[attr-defined]
    module.__name__ = "pickle"
    return module

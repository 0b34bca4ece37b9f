"""A restricted unpickler: pickles may hold plain data only, never code.

A pickle names globals that the loader imports and calls, so ``pickle.load`` on a file from elsewhere
can run anything (``os.system`` in a ``__reduce__``). MTL-AQA's annotation and split files hold only
dicts, lists, tuples, ints, floats and strings, none of which needs a global; this unpickler allows
nothing beyond a handful of harmless constructors (sets, complex numbers, latin1 bytes and numpy
scalars, which older pickles use) and refuses every other global before it is imported.
"""

from __future__ import annotations

import builtins
import os
import pickle
from pathlib import Path
from typing import IO, Any

from deepsports.errors import DataError, UnsafePickleError

__all__ = ["restricted_load"]


def _numpy_scalar(source: str) -> Any:
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import scalar  # numpy 1.x
    return scalar


def _numpy_dtype(source: str) -> Any:
    import numpy

    return numpy.dtype


def _latin1_bytes(source: str) -> Any:
    def encode(text: str, encoding: str = "utf-8") -> bytes:
        # Protocol-2 pickles rebuild bytes (numpy scalars' raw data too) as _codecs.encode(text, "latin1").
        if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
            raise UnsafePickleError(f"{source}: refusing _codecs.encode with codec {encoding!r} "
                                    f"(only latin1, which rebuilds bytes, is allowed)")
        return text.encode("latin1")

    return encode


# Protocols < 4 pickle sets and complex numbers through these constructors; they execute nothing.
_BUILTINS = {name: getattr(builtins, name) for name in ("set", "frozenset", "complex", "bytearray")}
# (module, name) -> factory(source) of the object handed to the unpickler. "__builtin__" is Python 2's name.
_ALLOWED_GLOBALS = {
    **{(module, name): (lambda source, obj=obj: obj) for module in ("builtins", "__builtin__")
       for name, obj in _BUILTINS.items()},
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fileobj: IO[bytes], source: str) -> None:
        # latin1 is what numpy recommends for Python 2 pickles holding numpy scalars.
        super().__init__(fileobj, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle the global {module}.{name}; an annotation or split pickle "
                f"may only hold builtin containers, numbers, strings and numpy scalars (nothing was executed)")
        return factory(self._source)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refusing a pickle persistent id {pid!r}")


def restricted_load(fileobj_or_path: str | os.PathLike | IO[bytes]) -> Any:
    """Unpickle a file (path or binary file object) allowing no globals but builtin containers and numpy scalars.

    Raises :class:`UnsafePickleError` naming the refused ``module.name`` (before anything is called) and
    :class:`DataError` when the file is missing or not a pickle.
    """
    if isinstance(fileobj_or_path, (str, os.PathLike)):
        path = Path(fileobj_or_path)
        try:
            with path.open("rb") as handle:
                return _unpickle(handle, str(path))
        except OSError as exc:
            raise DataError(f"cannot read pickle {str(path)!r}: {exc.strerror or exc}") from exc
    source = str(getattr(fileobj_or_path, "name", "<pickle stream>"))
    return _unpickle(fileobj_or_path, source)


def _unpickle(handle: IO[bytes], source: str) -> Any:
    try:
        return _RestrictedUnpickler(handle, source).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, OverflowError, RecursionError) as exc:
        raise DataError(f"{source}: not a valid pickle ({type(exc).__name__}: {exc})") from exc

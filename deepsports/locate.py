"""Named files shipped with the package: experiments, search spaces, SLURM profiles and templates.

They live in the repository (``experiments/``, ``search_spaces/``, ``slurm/profiles/``,
``slurm/templates/``) and are package data under ``deepsports/assets/`` (links to those folders in a
clone, copies in an installed wheel), so ``deepsports train --config demo`` or ``--config
experiments/demo.yaml`` works from any directory and from a non-editable install. A file in the
current directory always wins over the shipped one of the same name.
"""

from __future__ import annotations

import os
from pathlib import Path

from deepsports.errors import ConfigError

ASSETS = Path(__file__).resolve().parent / "assets"


def shipped(folder: str) -> Path:
    """The shipped copy of a repository folder, e.g. ``shipped("slurm/templates")``."""
    return ASSETS / folder


def find_named(name_or_path: str | os.PathLike, folder: str, what: str, *, suffix: str = ".yaml",
               error: type[ConfigError] = ConfigError) -> Path:
    """``name`` -> ``<folder>/<name><suffix>`` here, else the shipped one; a path is used as it is, else (when
    it starts with ``<folder>/``) the shipped file of that name. Raises ``error`` naming what was tried."""
    path = Path(name_or_path).expanduser()
    prefix = Path(folder).parts
    if path.suffix in (".yaml", ".yml", suffix) or len(path.parts) > 1 or path.exists():
        candidates = [path]
        if not path.is_absolute() and path.parts[:len(prefix)] == prefix:
            candidates.append(shipped(folder).joinpath(*path.parts[len(prefix):]))
    else:
        candidates = [Path(folder) / f"{path}{suffix}", shipped(folder) / f"{path}{suffix}"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in shipped(folder).glob(f"*{suffix}"))
    raise error(f"{what} {str(name_or_path)!r} does not exist (looked for {', '.join(map(str, candidates))}): give a "
                f"path, or a name shipped with DeepSports: {', '.join(names) or 'none'}")

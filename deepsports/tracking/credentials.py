"""The tracking server's credentials for this process, from a 0600 file named in the environment.

Import-light on purpose (no mlflow): every ``deepsports`` command reads it at start.
"""

from __future__ import annotations

import configparser
import os
import stat
from pathlib import Path

from deepsports.errors import ConfigError

#: Names a file holding the tracking server's user name and password (see :func:`load_credentials`).
CREDENTIALS_ENV = "DEEPSPORTS_MLFLOW_CREDENTIALS"


def load_credentials(environ: dict[str, str] | None = None) -> str | None:
    """Read the tracking server's credentials from the file named by ``$DEEPSPORTS_MLFLOW_CREDENTIALS``
    into ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` of this process (MLflow's client sends
    them as HTTP basic auth). Returns the user name, or None when the variable is unset.

    The file has MLflow's own credentials format (the same file works as ``~/.mlflow/credentials``)::

        [mlflow]
        mlflow_tracking_username = alice
        mlflow_tracking_password = ...

    and must be readable by its owner only (mode 0600 or 0400): a SLURM job is handed the file's name,
    so the password is in no job script, job environment, argument list or log. Raises ConfigError.
    """
    environ = os.environ if environ is None else environ
    name = environ.get(CREDENTIALS_ENV)
    if not name:
        return None
    path = Path(name).expanduser()
    try:
        mode = path.stat().st_mode
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    except (OSError, configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{CREDENTIALS_ENV}={name}: cannot read the credentials file: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{CREDENTIALS_ENV}={name}: the credentials file is mode {stat.S_IMODE(mode):04o}; "
                          f"allowed: readable by its owner only (chmod 600 {name})")
    section = parser["mlflow"] if parser.has_section("mlflow") else {}
    user, password = section.get("mlflow_tracking_username"), section.get("mlflow_tracking_password")
    if not user or not password:
        raise ConfigError(f"{CREDENTIALS_ENV}={name}: expected a [mlflow] section with mlflow_tracking_username "
                          "and mlflow_tracking_password")
    environ["MLFLOW_TRACKING_USERNAME"] = user
    environ["MLFLOW_TRACKING_PASSWORD"] = password
    return user

"""Tracking-store URIs without importing MLflow: the URI in effect, its absolute form, redaction of
credentials, the SQLite file of a ``sqlite:///`` URI, and the checks a command makes before it opens
anything (a typo in a URI fails in a blink, and creates nothing).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from deepsports.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: Schemes MLflow opens as a tracking store (a ``+driver`` suffix allowed on the database ones).
KNOWN_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks", "databricks-uc", "uc")

def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory (a file store the
    user chose is opted into: :func:`allow_file_store`)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    allow_file_store(uri)
    return uri


#: Set in this process's environment once the file-store warning was given (its child processes then skip it).
_FILE_STORE_WARNED_ENV = "DEEPSPORTS_FILE_STORE_WARNED"


def is_file_store(uri: str) -> bool:
    """A ``file:`` URI or a plain directory path: MLflow's file store (deprecated since MLflow 3.13)."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    return scheme == "file" or (scheme == "" and bool(uri))


def allow_file_store(uri: str) -> bool:
    """A file store the user chose works: MLflow >= 3.13 refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``,
    which this sets for this process (and the processes it starts: tune workers, ``mlflow run``, ``mlflow
    ui``) only when ``uri`` is one. Warns once that MLflow deprecated it, naming the migration tool.
    Returns whether ``uri`` is a file store."""
    if not is_file_store(uri):
        return False
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if not os.environ.get(_FILE_STORE_WARNED_ENV):
        os.environ[_FILE_STORE_WARNED_ENV] = "1"
        log.warning("tracking store %s is an MLflow file store, which MLflow deprecated (MLflow 3.13 refuses it unless "
                    "MLFLOW_ALLOW_FILE_STORE=true; DeepSports sets that for this command). Move to SQLite with: "
                    "mlflow migrate-filestore --source <the store directory> --target sqlite:///mlflow.db",
                    redact_uri(uri))
    return True


_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<secret>[^/\s]*)@")
# Query parameters (``?password=``) and libpq keyword DSNs (``host=db password=x``) alike.
_SECRET_PARAM = re.compile(r"(?P<key>(?:^|[?&;\s])(?:password|passwd|pwd|sslpassword|token|secret|api_key|access_key)=)"
                           r"(?P<value>[^&;#\s]*)", re.IGNORECASE)


def redact_uri(text: str) -> str:
    """Hide credentials in a URI (or any text holding URIs): ``user:pass@`` -> ``user:***@``,
    ``?password=x`` and ``password=x`` -> ``password=***`` (also token/secret/api_key/access_key)."""
    text = _USERINFO.sub(lambda m: f"{m.group('head')}:***@", str(text))
    return _SECRET_PARAM.sub(lambda m: f"{m.group('key')}***", text)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs`` or ``sqlite:///rel``), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def absolute_uri(uri: str) -> str:
    """``uri`` as it reads from any working directory: a relative ``sqlite:///mlflow.db`` (or a plain or
    ``file:`` path) made absolute; a server URL as it is."""
    path = sqlite_path(uri)
    if path is not None:
        query = uri.split("?", 1)[1] if "?" in uri else ""
        return f"sqlite:///{path.expanduser().absolute()}" + (f"?{query}" if query else "")
    if uri.startswith("file://"):
        return uri
    if uri.startswith("file:"):
        return "file://" + str(Path(uri[len("file:"):]).expanduser().absolute())
    if "://" not in uri:
        return str(Path(uri).expanduser().absolute())
    return uri


def check_store_folder(uri: str) -> None:
    """A ``sqlite:///`` store's folder exists: a typo in a shared path must not start an empty store
    somewhere new (MLflow would create the file, and DeepSports used to create the folders too)."""
    path = sqlite_path(uri)
    if path is not None and not path.expanduser().absolute().parent.exists():  # (a file there: the open says so)
        raise ConfigError(f"tracking store {redact_uri(uri)} (MLFLOW_TRACKING_URI): the folder "
                          f"{str(path.expanduser().absolute().parent)!r} does not exist: create it first, or fix "
                          "the path (nothing was created)")




def check_uri_scheme(uri: str, source: str = "MLFLOW_TRACKING_URI") -> None:
    """A ``scheme://`` MLflow knows (a misspelt one would otherwise be found only after seconds of imports)."""
    if "://" not in uri:
        return  # a local path: MLflow's file store
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in KNOWN_SCHEMES:
        raise ConfigError(f"{source}={redact_uri(uri)}: unknown scheme {scheme!r}: expected sqlite:///FILE, "
                          f"postgresql://..., mysql://..., http(s)://SERVER or a folder path")


def check_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI in effect (or ``uri``), its scheme known and a SQLite store's folder existing; cheap
    (no MLflow import), so a command checks it before the seconds of importing torch and MLflow."""
    uri = uri or tracking_uri()
    check_uri_scheme(uri)
    check_store_folder(uri)
    return uri

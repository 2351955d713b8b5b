"""Credentials out of everything normlab prints, tags or uploads.

A tracking URI may carry a user and password (``http://alice:s3cret@host``), and MLflow puts
the full URI into its exception texts; the environment may hold tokens that a library echoes
back. normlab's messages, run tags (``normlab.reason``, a sweep's errors) and logged text pass
through ``redact`` first, so a shared store never holds them.
"""

from __future__ import annotations

import os
import re

MASK = "***"

# Environment variables whose values are secrets, for MLflow and the artifact stores it talks to.
SECRET_VARIABLES = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_CLIENT_CERT_PASSWORD",
    "DATABRICKS_TOKEN",
    "DATABRICKS_PASSWORD",
    "DATABRICKS_CLIENT_SECRET",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
    "MLFLOW_GCS_DEFAULT_TOKEN",
)
# Any other variable whose name ends like a secret's (HF_TOKEN, MY_DB_PASSWORD, OPENAI_API_KEY);
# the end only, so TOKENIZERS_PARALLELISM=false does not mask every "false".
_SECRET_NAME = re.compile(r"(TOKEN|PASSWORD|PASSWD|SECRET|API_KEY|ACCESS_KEY)$", re.IGNORECASE)
# Values shorter than this are not masked: masking "1" or "yes" would garble every message,
# and no token or usable password is that short.
MIN_SECRET_LENGTH = 4

# scheme://USERINFO@ : the userinfo runs to the last '@' before the path, query or whitespace,
# so an unescaped '@' inside a password is covered too.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^\s/?#]+)@")


def is_secret_name(name: str) -> bool:
    """Whether an environment variable of this name holds a secret."""
    return name in SECRET_VARIABLES or bool(_SECRET_NAME.search(name))


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The values of the secret variables that are set, longest first (so a secret that
    contains another is masked whole)."""
    environ = os.environ if environ is None else environ
    values = {value for name, value in environ.items() if is_secret_name(name) and len(value) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """``text`` with every URI's ``user:password@`` replaced by ``***@`` and the value of
    every secret environment variable (SECRET_VARIABLES, or named like one) by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", str(text))
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return text

"""Secrets never reach a logbook: it is meant to be published.

Three rules, applied to every event before it is written: the values of this process's
environment variables whose names mark them as secrets are replaced wherever they appear;
so is the value under any secret-named key (``HF_TOKEN``, ``db_password``, ``api_key``, ...);
and so are well-known credential shapes, wherever they came from.
"""

from __future__ import annotations

import os
import re

# Names whose values are secrets wherever they appear (environment variables, and config
# keys, whose sections are joined with dots: "hub.api_key").
SECRET_NAME = re.compile(
    r"(^|[_.])(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH)($|_)",
    re.I,
)
# Well-known credential shapes, redacted even when we do not know where they came from.
SECRET_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{20,}"),  # Hugging Face
    re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"),  # GitHub
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"xox[baprs]-[A-Za-z0-9-]{10,}"),  # Slack
    re.compile(r"sk-[A-Za-z0-9_-]{20,}"),  # OpenAI-style keys
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]{10,}"),
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in URLs
]
REDACTED = "[redacted]"


def secret_values() -> list[str]:
    """Values of this process's environment variables whose names mark them as secrets."""
    return sorted(
        (v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6),
        key=len,
        reverse=True,
    )


def redact(value, secrets: list[str] | None = None):
    """A copy of ``value`` (JSON-like) with secrets replaced by ``[redacted]``."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {
            k: _hidden(v) if SECRET_NAME.search(str(k)) else redact(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        for pattern in SECRET_PATTERNS:
            value = pattern.sub(REDACTED, value)
        return value
    return value


def _hidden(value):
    """A secret-named key's value, redacted whole. A list or a mapping keeps its shape (a
    config change's ``[old, new]`` stays a pair) with every non-empty value in it redacted;
    an empty value says nothing and stays."""
    if isinstance(value, dict):
        return {k: _hidden(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hidden(v) for v in value]
    return value if value in (None, "") else REDACTED

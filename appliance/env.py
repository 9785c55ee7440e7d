"""Typed readers for environment settings.

Every setting comes from the environment. `NAME_FILE` (a path) wins over `NAME`
so secrets can be mounted as files. A value that does not parse stops start-up
with a message naming the variable, instead of failing later somewhere deep.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import urlparse


class ConfigError(SystemExit):
    """Bad configuration: the process stops, printing this message (exit code 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"llm-observe configuration error: {message}")


def _raw(name: str) -> str | None:
    file_path = os.environ.get(f"{name}_FILE")
    if file_path:
        try:
            return Path(file_path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE={file_path!r} cannot be read: {exc.strerror}") from None
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def env_str(name: str, default: str | None = None) -> str | None:
    value = _raw(name)
    return default if value is None else value


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = _raw(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}={number} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name}={number} is above the maximum {maximum}")
    return number


def env_float(name: str, default: float | None, *, minimum: float | None = None,
              maximum: float | None = None) -> float | None:
    value = _raw(name)
    if value is None or value.strip() == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a number") from None
    if number != number:  # NaN
        raise ConfigError(f"{name}={value!r} is not a number")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}={number} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name}={number} is above the maximum {maximum}")
    return number


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean (use one of {sorted(_TRUE | _FALSE)})")


def env_list(name: str, default: list[str]) -> list[str]:
    value = _raw(name)
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _raw(name)
    if value is None:
        return default
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def env_url(name: str, *, schemes: tuple[str, ...], aliases: tuple[str, ...] = ()) -> str | None:
    """A URL from NAME (or the first alias set); checks the scheme and host."""
    used = name
    value = _raw(name)
    for alias in aliases:
        if value is not None:
            break
        value, used = _raw(alias), alias
    if value is None:
        return None
    parsed = urlparse(value)
    if parsed.scheme not in schemes:
        raise ConfigError(f"{used} must start with one of {', '.join(s + '://' for s in schemes)} (got {parsed.scheme or 'no scheme'!r})")
    if not (parsed.hostname or parsed.path):
        raise ConfigError(f"{used} has no host")
    return value


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def generated_secret(path: Path, *, nbytes: int) -> str:
    """The secret in `path`, made on first use (0600, in a 0700 folder) and kept across restarts.

    Several processes of the appliance may ask at once: the one that creates the file wins, the
    others read it."""
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = secrets.token_urlsafe(nbytes)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value)
    return value

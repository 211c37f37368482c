"""The herd's shared secret: from the environment, else from a file the first server makes.

Zero setup on one host, as Erlang's cookie file does it: with no secret in the
environment, the first server of a herd writes 32 random bytes (hex) to the secret
file, readable only by its owner, and every other server started from the same
herd.ini reads the same file. The file is made atomically (written under a temporary
name, then hard-linked into place, which fails if another server got there first),
so servers starting together agree on one secret. Across hosts, copy the file or
set the variable.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from .config import HerdConfig

SECRET_BYTES = 32


class SecretError(Exception):
    """The secret file cannot be made or read, or others may read it."""


@dataclass(frozen=True)
class HerdSecret:
    secrets: tuple[bytes, ...]  # empty: links run unauthenticated (an explicit opt-out)
    source: str  # where they came from, for the start line and run_herd's table


def load_secret(config: HerdConfig, environ: Mapping[str, str]) -> HerdSecret:
    """The variable wins (rotation: several, comma-separated); then the file; else none."""
    from_env = config.secrets(environ)
    if from_env:
        return HerdSecret(from_env, f"${config.secret_env}")
    if config.secret_file is None:
        return HerdSecret((), "none (secret_file = -)")
    return HerdSecret((read_or_create(config.secret_file),), config.secret_file)


def read_or_create(path: str) -> bytes:
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    _create(path)
    return _read(path)


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(f"{path} may be read by others (mode {stat.S_IMODE(mode):04o}): chmod 600 {path}")
        data = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(data) < 16:
        raise SecretError(f"{path} holds no usable secret (fewer than 16 bytes)")
    return data


def _create(path: str) -> None:
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise SecretError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        try:
            os.write(fd, secrets.token_hex(SECRET_BYTES).encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)  # fails if another server made it first: then theirs is the herd's
        except FileExistsError:
            pass
    except OSError as exc:
        raise SecretError(f"cannot create {path}: {exc.strerror or exc}") from None
    finally:
        os.unlink(temp)

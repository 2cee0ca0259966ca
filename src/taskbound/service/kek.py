"""Finding the key-encryption key (KEK) at start-up.

Order: ``keys.kek`` (environment ``TASKBOUND_KEYS__KEK``), then ``keys.kek_file``, then the
default file outside the data directory. Only in dev mode (dev identity issuer on) is a
missing file generated, with a warning; a production deployment supplies its own KEK.
"""

from __future__ import annotations

import logging
import os

from taskbound.config import Settings, default_kek_file
from taskbound.core.secretbox import SecretBox, generate_kek, parse_kek
from taskbound.errors import ConfigError

log = logging.getLogger("taskbound.kek")


def load_kek(settings: Settings) -> SecretBox:
    if settings.keys.kek is not None:
        return SecretBox(_parse(settings.keys.kek.get_secret_value(), "keys.kek"))
    path = settings.keys.kek_file or default_kek_file()
    data_dir = settings.storage.data_dir.resolve()
    if path.resolve().is_relative_to(data_dir):
        raise ConfigError(
            f"the KEK file {path} is inside the data directory; keep it apart from the data"
        )
    if path.exists():
        return SecretBox(_parse(path.read_text(encoding="utf-8"), str(path)))
    if not (settings.identity.dev_issuer and settings.keys.generate_kek_if_missing):
        raise ConfigError(
            "no key-encryption key: set TASKBOUND_KEYS__KEK or keys.kek_file "
            "(generate one with `taskbound keys generate-kek`)"
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Write a temporary file, then link it into place: the link fails if another process
    # got there first, and nobody ever reads a half-written key.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(generate_kek() + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    log.warning(
        "generated a development key-encryption key; production must supply its own",
        extra={"kek_file": str(path)},
    )
    return SecretBox(_parse(path.read_text(encoding="utf-8"), str(path)))


def _parse(text: str, where: str) -> bytes:
    try:
        return parse_kek(text)
    except ValueError as exc:
        raise ConfigError(f"the key-encryption key in {where} is not valid: {exc}") from None

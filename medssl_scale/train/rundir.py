"""Check that run_dir can be created and written, before any process group, data or model exists."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..config import ConfigError


def check_run_dir(path: str, key: str = "run_dir") -> None:
    """Create `path` (parents included) and write a file in it; any failure is one ConfigError line naming
    `key` (run_dir): a read-only file system (/sys/x), a path under a regular file, missing permissions."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        if isinstance(e, (NotADirectoryError, FileExistsError)):
            reason = "a part of it is a file, not a folder"
        raise ConfigError(f"{key}={path} cannot be written ({reason}): set {key}=<a writable folder>") from None

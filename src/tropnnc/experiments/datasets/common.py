"""What every dataset loader shares: the errors, where files are searched, atomic downloads."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

__all__ = [
    "ENV_VAR",
    "SYSTEM_DIRS",
    "DatasetError",
    "DatasetNotFoundError",
    "base_dirs",
    "check_split",
    "data_dir",
    "download_file",
    "download_files",
    "file_md5",
    "sources_text",
    "unique",
    "walk",
]

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file is corrupt, truncated or has an unexpected format (or is missing)."""


class DatasetNotFoundError(DatasetError):
    """The dataset files are not present in any searched location."""


ENV_VAR = "TROPNNC_DATA"
#: System-wide dataset folders, searched last (patched by tests).
SYSTEM_DIRS: list[Path] = [Path("/usr/share/datasets")]
_SPLITS = ("train", "test")
_MAX_SEARCH_DEPTH = 3
_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".cache", ".tox"}


def data_dir() -> Path:
    """The project data cache.

    ``$TROPNNC_DATA`` if set; else ``<repo root>/data`` when running from a source checkout of
    this project (found by walking up from this file to the ``pyproject.toml`` that declares
    ``tropnnc``); else ``~/.cache/tropnnc``.  The folder is not created.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve()
    for parent in here.parents:
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file():
            try:
                text = pyproject.read_text(encoding="utf-8", errors="replace")
            except OSError:
                break
            if re.search(r'^\s*name\s*=\s*["\']tropnnc["\']', text, re.MULTILINE):
                return parent / "data"
            break
    return Path.home() / ".cache" / "tropnnc"


def check_split(split: str) -> str:
    """``split`` itself when it is "train" or "test"; else a ValueError naming the choices."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return split


def unique(paths: Iterable[Path]) -> list[Path]:
    """``paths`` without repeats, in their first order."""
    seen: set[str] = set()
    out: list[Path] = []
    for p in paths:
        key = str(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def base_dirs(root: str | Path | None, folders: Sequence[str]) -> list[Path]:
    """Directories to search, in priority order (each is searched a few levels deep)."""
    cands: list[Path] = []
    if root is not None:
        r = Path(root).expanduser()
        cands += [r / f for f in folders] + [r]
    env = os.environ.get(ENV_VAR)
    if env:
        cands += [Path(env).expanduser() / f for f in folders]
    cands += [data_dir() / f for f in folders]
    for sysdir in SYSTEM_DIRS:
        cands += [Path(sysdir) / f for f in folders]
    return unique(cands)


def walk(
    base: Path, exclude: re.Pattern[str] | None, depth: int = _MAX_SEARCH_DEPTH
) -> Iterator[Path]:
    """``base`` and its sub-directories (breadth first, sorted, up to ``depth`` levels)."""
    if not base.is_dir():
        return
    level = [base]
    for _ in range(depth + 1):
        nxt: list[Path] = []
        for d in level:
            yield d
            try:
                subs = sorted(p for p in d.iterdir() if p.is_dir())
            except OSError:
                continue
            for s in subs:
                if s.name in _SKIP_DIRS or (exclude is not None and exclude.search(s.name)):
                    continue
                nxt.append(s)
        level = nxt


def sources_text(bases: Sequence[Path]) -> str:
    """The searched folders as an indented list for a "not found" message."""
    return "\n".join(f"  - {b}" for b in bases)


def file_md5(path: Path) -> str:
    """The MD5 hex digest of a file, read in 1 MiB chunks (a checksum, not security)."""
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, dest: Path, md5: str | None = None) -> None:
    """Download ``url`` to ``dest`` atomically (temporary file in the same folder + rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        if md5 is not None:
            got = file_md5(tmp)
            if got != md5:
                raise DatasetError(f"{url}: MD5 mismatch (got {got}, expected {md5})")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_files(target: Path, mirrors: Sequence[str], files: dict[str, str]) -> None:
    """Each ``name: md5`` of ``files`` into ``target``, from the first mirror that serves it
    (a file already there with the right checksum is kept)."""
    for name, md5 in files.items():
        dest = target / name
        if dest.is_file() and file_md5(dest) == md5:
            continue
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            log.info("downloading %s -> %s", url, dest)
            try:
                download_file(url, dest, md5)
                break
            except (OSError, DatasetError) as e:  # URLError is an OSError
                errors.append(f"{url}: {e}")
        else:
            raise DatasetError(f"could not download {name}:\n  " + "\n  ".join(errors))

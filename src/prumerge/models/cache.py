"""A build-once directory cache: atomic publication, a file lock and a checksum manifest.

A cache entry is a directory holding `manifest.json` (written last) plus the files it lists with
their sizes and SHA-256 digests. Builders write into a temporary sibling directory and publish it
with one `os.replace`, under a `filelock.FileLock`, so concurrent processes either see a complete
entry or none. An entry whose manifest is missing or whose files disagree with it is treated as
corrupt, moved aside and rebuilt, with a warning. Temporary folders of builds that were killed
are swept away by the next build of the same entry (it holds the entry's lock, so no live
build owns them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from prumerge.errors import PrumergeError

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 22

logger = logging.getLogger(__name__)


class CacheError(PrumergeError):
    """The cache directory cannot be used (missing and not creatable, not a folder, read-only)."""


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_root() -> Path:
    """The cache root: `$PRUMERGE_CACHE`, else `$XDG_CACHE_HOME/prumerge`, else `~/.cache/prumerge`."""
    if os.environ.get("PRUMERGE_CACHE"):
        return Path(os.environ["PRUMERGE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "prumerge"
    return Path.home() / ".cache" / "prumerge"


def describe_cache_root(cache_dir: str | Path | None = None) -> str:
    """Which setting chose the cache root, for error messages."""
    if cache_dir is not None:
        return f"set by --cache-dir {cache_dir}"
    if os.environ.get("PRUMERGE_CACHE"):
        return f"set by PRUMERGE_CACHE={os.environ['PRUMERGE_CACHE']}"
    if os.environ.get("XDG_CACHE_HOME"):
        return f"set by XDG_CACHE_HOME={os.environ['XDG_CACHE_HOME']}; PRUMERGE_CACHE overrides it"
    return "the default, ~/.cache/prumerge; set PRUMERGE_CACHE or --cache-dir to move it"


def check_cache_root(root: Path) -> None:
    """Make sure ``root`` is, or can become, a folder this process can write in.

    Raises:
        CacheError: naming the folder and what is wrong with it.
    """
    if root.exists() and not root.is_dir():
        raise CacheError(f"the model cache {root} is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the model cache {root}: {exc.strerror or exc}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise CacheError(f"the model cache {root} is not writable")


def sweep_stale_builds(directory: Path) -> list[Path]:
    """Delete the temporary and trash folders that killed builds of ``directory`` left.

    Call only while holding the entry's lock: no live build of it exists then.

    Returns:
        The folders removed.
    """
    removed = []
    for prefix in (f".tmp-{directory.name}-", f".trash-{directory.name}-"):
        for path in directory.parent.glob(prefix + "*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    if removed:
        logger.info(
            "removed %d unfinished build folder(s) of %s left by an interrupted build",
            len(removed),
            directory.name,
        )
    return removed


def write_manifest(directory: Path, extra: dict | None = None) -> dict:
    """Hash every file under `directory` and write `manifest.json` there (last).

    Args:
        directory: the finished entry, before publication.
        extra: JSON-serialisable metadata stored under the manifest's `"info"` key.

    Returns:
        The manifest as written.
    """
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            rel = path.relative_to(directory).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"files": files, "info": extra or {}}
    tmp = directory / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, directory / MANIFEST_NAME)
    return manifest


def verify_entry(directory: Path, check_hashes: bool = True) -> str | None:
    """Check a cache entry against its manifest.

    Args:
        directory: the entry.
        check_hashes: also compare SHA-256 digests (sizes are always compared).

    Returns:
        None when the entry is complete and intact, else a short reason.
    """
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if not files:
        return "empty manifest"
    for rel, meta in files.items():
        path = directory / rel
        if not path.is_file():
            return f"missing {rel}"
        if path.stat().st_size != meta["size"]:
            return f"size of {rel} differs"
        if check_hashes and sha256_file(path) != meta["sha256"]:
            return f"checksum of {rel} differs"
    return None


def _discard(directory: Path) -> None:
    """Move a directory out of the way atomically, then delete it."""
    if not directory.exists():
        return
    trash = directory.with_name(f".trash-{directory.name}-{uuid.uuid4().hex[:8]}")
    os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def ensure_entry(
    directory: Path,
    build: Callable[[Path], dict | None],
    *,
    check_hashes: bool = True,
    rebuild: bool = False,
    lock_timeout: float = 3600.0,
) -> Path:
    """Return a verified cache entry, building it first if needed.

    Args:
        directory: where the entry lives once published.
        build: called with an empty temporary directory to fill; may return metadata for the
            manifest.
        check_hashes: verify SHA-256 digests, not only sizes.
        rebuild: discard an existing entry and build anew.
        lock_timeout: seconds to wait for another process's build.

    Returns:
        `directory`, complete and verified.
    """
    from filelock import FileLock

    if not rebuild and verify_entry(directory, check_hashes) is None:
        return directory
    check_cache_root(directory.parent)
    lock = FileLock(str(directory.with_name(directory.name + ".lock")), timeout=lock_timeout)
    try:
        lock.acquire()
    except OSError as exc:
        raise CacheError(f"cannot lock the model cache {directory.parent}: {exc}") from None
    try:
        # Another process may have finished the build while we waited for the lock.
        reason = None if rebuild else verify_entry(directory, check_hashes)
        if reason is None and not rebuild:
            return directory
        sweep_stale_builds(directory)
        if directory.exists() and not rebuild:
            logger.warning("the cache entry %s is damaged (%s); rebuilding it", directory, reason)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
        try:
            info = build(tmp)
            write_manifest(tmp, info)
            _discard(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
    reason = verify_entry(directory, check_hashes)
    if reason is not None:  # pragma: no cover - would mean the disk lied to us
        raise RuntimeError(f"cache entry {directory} is invalid right after building: {reason}")
    return directory

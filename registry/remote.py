"""Model packages in shared storage: fetch one, verified, into a directory.

A registered package is named by the SHA-256 of its package.json (its package id), and
package.json names the SHA-256 of every other file. So a package copied anywhere — an
object store (s3://, gs://), a shared mount (file://, a PVC), a plain path — is checked
end to end by one digest: the one the registry resolved `NAME@ALIAS` to.

`fetch_package(uri, dest, sha256)` is what a pod's init container runs (`vivace deploy
fetch`) before `vivace serve /mnt/models`. URIs go through fsspec; s3:// needs s3fs and
gs:// gcsfs (the `s3` and `gcs` extras).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vivace import spec

from .package import MANIFEST
from .store import IntegrityError, NotFoundError, RegistryError

_CHUNK = 1 << 20
_STAGING_PREFIX = ".incoming."


def _filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URI or a local path."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:  # pragma: no cover - fsspec is a dependency
        raise RegistryError("reading remote artifacts needs fsspec (pip install fsspec)") from None
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        scheme = uri.partition("://")[0]
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(scheme)
        hint = f" (pip install 'vivace[{extra}]')" if extra else ""
        raise RegistryError(f"cannot open {uri}: {exc}{hint}") from None


def _copy_verified(fs: Any, source: str, target: Path, digest: str, what: str) -> None:
    """Copy one object to `target` (fsynced), refusing it unless its bytes hash to `digest`."""
    h = hashlib.sha256()
    with fs.open(source, "rb") as src, open(target, "wb") as sink:
        while block := src.read(_CHUNK):
            h.update(block)
            sink.write(block)
        sink.flush()
        os.fsync(sink.fileno())
    if h.hexdigest() != digest:
        raise IntegrityError(f"{what} is corrupted (sha256 {h.hexdigest()[:12]}…, expected {digest[:12]}…)")


def _is_fetched(dest: Path, sha256: str) -> bool:
    """dest already holds exactly this package, every file verified (a restarted init container)."""
    manifest = dest / MANIFEST
    if not manifest.is_file() or hashlib.sha256(manifest.read_bytes()).hexdigest() != sha256:
        return False
    from .package import PackageError, load_package

    try:
        load_package(dest, verify=True)
    except PackageError:
        return False
    return True


def fetch_package(uri: str, dest: str | os.PathLike, sha256: str) -> Path:
    """Copy the package at `uri` into `dest`, verified against its package id `sha256`.

    package.json is fetched first and must hash to `sha256`; each file it lists must hash
    to its recorded digest. Files are staged in a hidden folder inside `dest` (which may be
    a mount point, such as a pod's emptyDir) and moved in only once all of them verified,
    package.json last: `dest` holds the whole package or no package.json at all.
    """
    dest = Path(dest)
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise RegistryError(f"--sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if dest.exists() and not dest.is_dir():
        raise RegistryError(f"{dest} exists and is not a directory")
    dest.mkdir(parents=True, exist_ok=True)
    if _is_fetched(dest, sha256):
        return dest
    fs, root = _filesystem(uri)
    root = root.rstrip("/")
    try:
        manifest_bytes = fs.cat_file(f"{root}/{MANIFEST}")
    except FileNotFoundError:
        raise NotFoundError(f"no package at {uri} ({MANIFEST} is missing)") from None
    except OSError as exc:
        raise RegistryError(f"cannot read {uri}/{MANIFEST}: {exc}") from None
    actual = hashlib.sha256(manifest_bytes).hexdigest()
    if actual != sha256:
        raise IntegrityError(f"{uri}/{MANIFEST} has sha256 {actual[:12]}…, the release pins {sha256[:12]}…: "
                             "corrupted, or another package")
    try:
        manifest = spec.decode(manifest_bytes)
    except spec.ManifestError as exc:
        raise IntegrityError(f"{uri}/{MANIFEST}: {exc}") from None
    for stale in dest.glob(_STAGING_PREFIX + "*"):  # left by a fetch that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=dest))
    try:
        for name, digest in manifest.files.items():
            if "/" in name or name.startswith(".") or name == MANIFEST:
                raise IntegrityError(f"{uri}/{MANIFEST} lists an invalid file name {name!r}")
            try:
                _copy_verified(fs, f"{root}/{name}", staging / name, digest, f"{uri}/{name}")
            except FileNotFoundError:
                raise NotFoundError(f"{uri}/{name} is missing (listed in {MANIFEST})") from None
        (dest / MANIFEST).unlink(missing_ok=True)  # a half-replaced package never looks whole
        for name in manifest.files:
            os.replace(staging / name, dest / name)
        tmp_manifest = staging / MANIFEST
        tmp_manifest.write_bytes(manifest_bytes)
        with open(tmp_manifest, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_manifest, dest / MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest

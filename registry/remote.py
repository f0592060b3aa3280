"""Registry artifacts in shared storage: publish, and fetch verified through a local cache.

A registered package is named by the SHA-256 of its package.json (its package id), and
package.json names the SHA-256 of every other file; a dataset file is an object named by
its SHA-256. So an artifact copied anywhere — an object store (s3://, gs://), a shared
mount (file://, a PVC), a plain path — is checked end to end by one digest: the one the
registry resolved `NAME@ALIAS` or `name@vN` to. Every replica on every node that is given
that digest gets the same bytes or an error; none can serve something else.

Layout under a storage prefix (the home's own layout):

    PREFIX/packages/<package id>/package.json, model.pt, ...
    PREFIX/objects/<ab>/<sha256>

Publishing uploads a package's files first and package.json last: an interrupted upload
leaves no package.json, so nothing can fetch the half-package (publishing again completes
it). Fetching downloads into a staging folder, verifies every byte, then renames: a
destination or cache entry holds a whole verified artifact or nothing.

URIs go through fsspec; s3:// needs s3fs and gs:// gcsfs (the `s3` and `gcs` extras).
Credentials come from the usual places (AWS_* / GOOGLE_* variables, profiles, instance
roles); an S3-compatible store is reached with AWS_ENDPOINT_URL.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from vivace import spec

from .package import MANIFEST, PackageError, load_package
from .store import Home, IntegrityError, NotFoundError, RegistryError, open_home

_CHUNK = 1 << 20
_STAGING_PREFIX = ".incoming."
_T = TypeVar("_T")


def _check_sha(sha256: str, what: str = "sha256") -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise RegistryError(f"{what} must be 64 lowercase hex digits, got {sha256!r}")
    return sha256


def _filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it, without a trailing slash) for a URI or a path."""
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        scheme = uri.partition("://")[0]
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(scheme)
        hint = f" (pip install 'vivace[{extra}]')" if extra else ""
        raise RegistryError(f"cannot open {uri}: {exc}{hint}") from None
    return fs, path.rstrip("/")


def _storage(uri: str, action: Callable[[], _T]) -> _T:
    """Run one storage call; its failures become one-line errors naming the URI
    (FileNotFoundError is left to the caller, which knows what was missing)."""
    try:
        return action()
    except (FileNotFoundError, RegistryError):
        raise
    except PermissionError as exc:
        raise RegistryError(f"{uri}: access denied ({exc}): check the storage credentials") from exc
    except Exception as exc:  # the client libraries' own errors (credentials, endpoint, network)
        raise RegistryError(f"{uri}: {type(exc).__name__}: {exc}") from exc


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _put(fs: Any, data: Path | bytes, target: str) -> None:
    """Write one remote object whole. Object stores make a PUT visible whole or not at
    all; on a shared filesystem the bytes go to a temporary name first, then a rename."""
    if not _is_local(fs):
        if isinstance(data, Path):
            fs.put_file(str(data), target)
        else:
            fs.pipe_file(target, data)
        return
    folder = Path(target).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_STAGING_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as sink:
            if isinstance(data, Path):
                with open(data, "rb") as src:
                    shutil.copyfileobj(src, sink, _CHUNK)
            else:
                sink.write(data)
            sink.flush()
            os.fsync(sink.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def _stage_package(uri: str, sha256: str, staging: Path) -> list[str]:
    """Download the package at `uri` into `staging`, every file verified; returns the names
    of its files (package.json, written last, not among them)."""
    fs, root = _filesystem(uri)
    try:
        manifest_bytes = _storage(uri, lambda: fs.cat_file(f"{root}/{MANIFEST}"))
    except FileNotFoundError:
        raise NotFoundError(f"no package at {uri} ({MANIFEST} is missing: never published, or its upload "
                            "was interrupted)") from None
    actual = hashlib.sha256(manifest_bytes).hexdigest()
    if actual != sha256:
        raise IntegrityError(f"{uri}/{MANIFEST} has sha256 {actual[:12]}…, the release pins {sha256[:12]}…: "
                             "corrupted, or another package")
    try:
        manifest = spec.decode(manifest_bytes)
    except spec.ManifestError as exc:
        raise IntegrityError(f"{uri}/{MANIFEST}: {exc}") from None
    for name, digest in manifest.files.items():
        try:
            _storage(uri, partial(_copy_verified, fs, f"{root}/{name}", staging / name, digest, f"{uri}/{name}"))
        except FileNotFoundError:
            raise NotFoundError(f"{uri}/{name} is missing (listed in {MANIFEST})") from None
    (staging / MANIFEST).write_bytes(manifest_bytes)
    with open(staging / MANIFEST, "rb") as f:
        os.fsync(f.fileno())
    return list(manifest.files)


def _is_whole(folder: Path, sha256: str) -> bool:
    """`folder` holds exactly this package, every file verified."""
    manifest = folder / MANIFEST
    if not manifest.is_file() or hashlib.sha256(manifest.read_bytes()).hexdigest() != sha256:
        return False
    try:
        load_package(folder, verify=True)
    except PackageError:
        return False
    return True


class ArtifactCache:
    """A local content-addressed cache of remote artifacts (the home's layout):
    ``packages/<package id>/``, ``objects/<ab>/<sha256>``, ``tmp/`` for staging.

    Entries appear by rename once verified, so readers (and other processes filling the
    same cache) never see a partial one; an entry is verified again when it is used.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        for folder in (self.root / "packages", self.root / "objects", self.tmp):
            folder.mkdir(parents=True, exist_ok=True)

    def package(self, uri: str, sha256: str) -> Path:
        """The package `sha256` from the cache, downloaded from `uri` first if needed."""
        final = self.root / "packages" / _check_sha(sha256)
        if _is_whole(final, sha256):
            return final
        self._set_aside(final)  # a damaged entry is replaced, never trusted
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.tmp))
        try:
            _stage_package(uri, sha256, staging)
            for f in staging.iterdir():
                os.chmod(f, 0o444)
            os.chmod(staging, 0o755)
            self._publish(staging, final, lambda: _is_whole(final, sha256))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final

    def object(self, prefix: str, sha256: str) -> Path:
        """The object `sha256` (a dataset file) from the cache, downloaded from
        PREFIX/objects/<ab>/<sha256> first if needed."""
        final = self.root / "objects" / _check_sha(sha256)[:2] / sha256
        if final.is_file() and _file_sha256(final) == sha256:
            return final
        self._set_aside(final)
        uri = f"{prefix.rstrip('/')}/objects/{sha256[:2]}/{sha256}"
        fs, path = _filesystem(uri)
        fd, tmp_name = tempfile.mkstemp(prefix=_STAGING_PREFIX, dir=self.tmp)
        os.close(fd)
        staged = Path(tmp_name)
        try:
            try:
                _storage(uri, lambda: _copy_verified(fs, path, staged, sha256, uri))
            except FileNotFoundError:
                raise NotFoundError(f"no object at {uri}") from None
            os.chmod(staged, 0o444)
            final.parent.mkdir(exist_ok=True)
            self._publish(staged, final, lambda: final.is_file() and _file_sha256(final) == sha256)
        finally:
            staged.unlink(missing_ok=True)
        return final

    def _set_aside(self, entry: Path) -> None:
        if entry.exists():
            aside = Path(tempfile.mkdtemp(prefix=".damaged.", dir=self.tmp))
            os.rename(entry, aside / "entry")
            shutil.rmtree(aside, ignore_errors=True)

    @staticmethod
    def _publish(staged: Path, final: Path, already_there: Callable[[], bool]) -> None:
        try:
            os.rename(staged, final)
        except OSError:
            if not already_there():  # another process cached the same bytes first
                raise


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def fetch_package(uri: str, dest: str | os.PathLike, sha256: str, cache: str | os.PathLike | None = None) -> Path:
    """Copy the package at `uri` into `dest`, verified against its package id `sha256`.

    With `cache`, the package comes from that ArtifactCache (downloaded once, then reused).
    Files are staged in a hidden folder inside `dest` (which may be a mount point, such as
    a pod's emptyDir) and moved in only once all of them verified, package.json last:
    `dest` holds the whole package or no package.json at all.
    """
    dest = Path(dest)
    _check_sha(sha256, "--sha256")
    if dest.exists() and not dest.is_dir():
        raise RegistryError(f"{dest} exists and is not a directory")
    if cache is not None:
        uri = str(ArtifactCache(cache).package(uri, sha256))
    dest.mkdir(parents=True, exist_ok=True)
    if _is_whole(dest, sha256):
        return dest  # a restarted init container: nothing to do
    for stale in dest.glob(_STAGING_PREFIX + "*"):  # left by a fetch that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=dest))
    try:
        names = _stage_package(uri, sha256, staging)
        (dest / MANIFEST).unlink(missing_ok=True)  # a half-replaced package never looks whole
        for name in names:
            os.replace(staging / name, dest / name)
        os.replace(staging / MANIFEST, dest / MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def publish_package(home: Home | str | os.PathLike | None, package_sha: str, prefix: str) -> str:
    """Upload the stored package `package_sha` to PREFIX/packages/<package_sha>; returns its URI.

    The local bytes are verified first. Files go up before package.json, so an interrupted
    upload is invisible to fetchers; publishing an already complete package uploads nothing.
    """
    from .models import package_path

    home = open_home(home)
    local = package_path(home, _check_sha(package_sha), verify=True)
    uri = f"{prefix.rstrip('/')}/packages/{package_sha}"
    fs, root = _filesystem(uri)
    manifest_bytes = (local / MANIFEST).read_bytes()
    try:
        remote = _storage(uri, lambda: fs.cat_file(f"{root}/{MANIFEST}"))
        if remote == manifest_bytes and all(
                _storage(uri, partial(fs.size, f"{root}/{name}")) == (local / name).stat().st_size
                for name in spec.decode(manifest_bytes).files):
            return uri
    except FileNotFoundError:
        pass
    for name in sorted(spec.decode(manifest_bytes).files):
        _storage(uri, partial(_put, fs, local / name, f"{root}/{name}"))
    _storage(uri, lambda: _put(fs, manifest_bytes, f"{root}/{MANIFEST}"))
    return uri


def publish_object(home: Home | str | os.PathLike | None, sha256: str, prefix: str) -> str:
    """Upload the stored object `sha256` (a dataset file) to PREFIX/objects/<ab>/<sha256>."""
    home = open_home(home)
    local = home.verify_object(_check_sha(sha256))
    uri = f"{prefix.rstrip('/')}/objects/{sha256[:2]}/{sha256}"
    fs, path = _filesystem(uri)
    try:
        if _storage(uri, lambda: fs.size(path)) == local.stat().st_size:
            return uri
    except FileNotFoundError:
        pass
    _storage(uri, lambda: _put(fs, local, path))
    return uri


def publish_dataset(home: Home | str | os.PathLike | None, ref: str, prefix: str) -> list[str]:
    """Upload every file of the dataset version `ref` (name@vN); returns their URIs.

    Readers elsewhere take the digests from the version's `files` and read them through
    `ArtifactCache.object(prefix, digest)`."""
    from .data import get_dataset

    home = open_home(home)
    version = get_dataset(home, ref)
    return [publish_object(home, digest, prefix) for digest in sorted(set(version.files.values()))]

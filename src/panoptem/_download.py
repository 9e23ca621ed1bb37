"""Download model files into a local cache (internal; the public entry is ``registry.fetch_file``).

The cache is a plain folder: the file for a URL is named after the last part of the URL's
path, without the query string (``.../MitoNet_v1.pth?download=1`` -> ``MitoNet_v1.pth``),
exactly as empanada-napari names its downloads, so files either program downloaded are
found by both. Downloads go through :mod:`pooch`: TLS certificates are verified, data is
streamed into a temporary file in the cache folder and renamed only once it is complete and
its checksum (when one is known) matches, so an interrupted or corrupted download never
leaves a file under the final name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import string
import threading
from pathlib import Path
from urllib.parse import urlparse

from panoptem.errors import PanoptemError, describe, system_reason
from panoptem.progress import Progress

__all__ = [
    "OFFLINE_ENV",
    "CONNECT_TIMEOUT_S",
    "READ_TIMEOUT_S",
    "is_url",
    "offline",
    "cache_name",
    "check_hash_spec",
    "file_matches",
    "download_cached",
]

#: Environment variable that, when set to 1/true/yes, forbids network access.
OFFLINE_ENV = "PANOPTEM_OFFLINE"
#: Seconds to wait for the server to accept the connection.
CONNECT_TIMEOUT_S = 5.0
#: Seconds to wait for the next block of data once connected.
READ_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20
_log = logging.getLogger("panoptem.download")

# Files whose checksum has been verified in this process: (path, size, mtime_ns, hash) -> True,
# so a large cached file is hashed once per process rather than at every load.
_verified: set[tuple[str, int, int, str]] = set()
_verified_lock = threading.Lock()


def is_url(value: str | os.PathLike) -> bool:
    """Whether ``value`` is an http(s) URL (anything else is treated as a local path)."""
    if not isinstance(value, str):
        return False
    return urlparse(value.strip()).scheme.lower() in ("http", "https")


def offline() -> bool:
    """Whether :data:`OFFLINE_ENV` asks panoptem to stay off the network."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def cache_name(url: str) -> str:
    """The cache file name for ``url``: the last part of its path, query string dropped.

    Raises
    ------
    PanoptemError
        If the URL is not http(s) or its path does not end in a file name.
    """
    parts = urlparse(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise PanoptemError(
            f"'{url}' is not a valid download address: give an http:// or https:// URL "
            "with a host name, or the path of a local file."
        )
    name = os.path.basename(parts.path)
    if name in ("", ".", ".."):
        raise PanoptemError(
            f"The URL '{url}' does not end in a file name, so panoptem cannot name the "
            "downloaded file: give the URL of the model file itself (e.g. .../model.pth)."
        )
    return name


def check_hash_spec(known_hash: str) -> str:
    """Validate a checksum written as ``"<algorithm>:<hex digest>"`` or a bare sha256 digest.

    Returns
    -------
    str
        The algorithm name in lower case.

    Raises
    ------
    PanoptemError
        If the algorithm is unknown or the digest is not hexadecimal.
    """
    if not isinstance(known_hash, str) or not known_hash.strip():
        raise PanoptemError(
            f"Checksum {known_hash!r} is not valid: write it as 'sha256:<hex digest>'."
        )
    alg, _, digest = known_hash.strip().rpartition(":")
    alg = (alg or "sha256").lower()
    try:
        hashlib.new(alg)
    except (ValueError, TypeError):
        raise PanoptemError(
            f"Checksum {known_hash!r} names an unknown algorithm '{alg}': "
            "use 'sha256:<hex digest>' (or md5/sha1/sha512)."
        ) from None
    if not digest or any(c not in string.hexdigits for c in digest):
        raise PanoptemError(
            f"Checksum {known_hash!r} is not valid: the part after ':' must be a hex digest."
        )
    return alg


def file_matches(path: Path, known_hash: str) -> tuple[bool, str]:
    """(matches, actual digest) for ``path``; remembers verified files for this process."""
    import pooch

    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, known_hash.lower())
    with _verified_lock:
        if key in _verified:
            return True, known_hash.rpartition(":")[2].lower()
    alg = check_hash_spec(known_hash)
    actual = pooch.file_hash(str(path), alg=alg).lower()
    ok = actual == known_hash.rpartition(":")[2].lower()
    if ok:
        with _verified_lock:
            _verified.add(key)
    return ok, f"{alg}:{actual}"


class _PoochProgress:
    """Adapts pooch's tqdm-like progress protocol to a :class:`Progress` stage."""

    def __init__(self, progress: Progress, label: str) -> None:
        self._progress = progress
        self._label = label
        self._total = 0
        self._seen = 0
        self._started = False
        self._filling = False

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:  # pooch sets this once the size is known
        self._total = int(value or 0)
        self._seen = 0
        self._started = True
        self._progress.stage(self._label, self._total)

    def update(self, n: int) -> None:
        if not self._started:
            self.total = 0
        if self._filling:
            # after reset(), pooch calls update(total) to fill the bar: add only what is missing
            n = max(0, self._total - self._seen)
        elif self._total:
            n = max(0, min(int(n), self._total - self._seen))
        self._seen += n
        self._progress.advance(n)

    def reset(self) -> None:
        self._filling = True

    def close(self) -> None:
        pass


def _by_hand(url: str, target: Path) -> str:
    return (
        f"To use it without downloading, fetch {url} by other means (a browser, another "
        f"machine) and save it as {target} (exactly this name); panoptem then uses that file."
    )


def download_cached(
    url: str,
    folder: Path,
    known_hash: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Return the cached copy of ``url`` in ``folder``, downloading it if needed.

    Parameters
    ----------
    url : str
        http(s) address of the file.
    folder : Path
        Cache folder; created only when a download actually starts.
    known_hash : str, optional
        ``"sha256:<hex>"`` (or another hashlib algorithm, or a bare sha256 digest). A cached
        file that does not match is downloaded again; a download that does not match is
        deleted and reported.
    progress : Progress, optional
        Receives one stage ``"Downloading <name>"`` counted in bytes; a cancel request
        stops the download (:class:`~panoptem.errors.Cancelled`) and leaves nothing behind.

    Returns
    -------
    Path
        ``folder / cache_name(url)``.

    Raises
    ------
    PanoptemError
        Offline mode, network or HTTP failure, checksum mismatch, unwritable cache folder.
        The message names the URL and the exact path where the file can be placed by hand.
    """
    import pooch
    import requests

    name = cache_name(url)
    if known_hash is not None:
        check_hash_spec(known_hash)
    folder = Path(folder).expanduser().absolute()
    target = folder / name

    if target.is_file():
        if known_hash is None:
            return target
        ok, actual = file_matches(target, known_hash)
        if ok:
            return target
        stale = f"The cached file {target} has checksum {actual}, not the expected {known_hash}"
        if offline():
            raise PanoptemError(
                f"{stale}, and {OFFLINE_ENV} forbids downloading a fresh copy of {url}. "
                f"Unset {OFFLINE_ENV} to download it again, or replace the file by hand. "
                + _by_hand(url, target)
            )
        # otherwise fall through and download a fresh copy (pooch replaces it atomically)

    if offline():
        raise PanoptemError(
            f"{url} is not in the model cache and {OFFLINE_ENV} is set, so it was not "
            f"downloaded. Unset {OFFLINE_ENV} (or set it to 0) to download it. "
            + _by_hand(url, target)
        )

    bar = _PoochProgress(progress, f"Downloading {name}") if progress is not None else False
    downloader = pooch.HTTPDownloader(
        progressbar=bar,
        chunk_size=_CHUNK_BYTES,
        timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
    )
    _log.info("Downloading %s to %s", url, target)
    pooch_log = pooch.get_logger()
    level = pooch_log.level
    # pooch's own log lines address pooch users ("use this as known_hash of pooch.retrieve").
    pooch_log.setLevel(logging.WARNING)
    try:
        # pooch streams into a temporary file inside `folder`, checks the hash, then renames.
        pooch.retrieve(
            url,
            known_hash=known_hash,
            fname=name,
            path=folder,
            downloader=downloader,
            progressbar=False,
        )
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        reason = (exc.response.reason or "") if exc.response is not None else ""
        hint = (
            "the file is not at that address: check the URL in the model config"
            if status in (404, 410)
            else "the server refused or failed the request; try again later"
        )
        raise PanoptemError(
            f"Downloading {url} failed with HTTP status {status} {reason}".rstrip()
            + f": {hint}. "
            + _by_hand(url, target)
        ) from None
    except requests.exceptions.SSLError as exc:
        raise PanoptemError(
            f"Downloading {url} failed: the server's TLS certificate could not be verified "
            f"({describe(exc)}). Fix the system's certificate store or proxy settings "
            "(REQUESTS_CA_BUNDLE can point to a CA bundle); verification is never turned off. "
            + _by_hand(url, target)
        ) from None
    except requests.exceptions.Timeout:
        raise PanoptemError(
            f"Downloading {url} timed out (connect {CONNECT_TIMEOUT_S:g} s / read "
            f"{READ_TIMEOUT_S:g} s): check the network connection or proxy and try again. "
            + _by_hand(url, target)
        ) from None
    except requests.exceptions.RequestException as exc:
        raise PanoptemError(
            f"Could not download {url}: the server could not be reached ({system_reason(exc)}). "
            "Check the network connection, proxy settings and the URL, then try again. "
            + _by_hand(url, target)
        ) from None
    except ValueError as exc:
        # pooch raises ValueError when the downloaded data does not match known_hash;
        # it has already deleted the temporary file. Its message names both hashes.
        raise PanoptemError(
            f"The file downloaded from {url} does not match the expected checksum "
            f"{known_hash} ({describe(exc)}); it was not kept. Try again (the transfer may "
            "have been corrupted) or correct the checksum in the model config if the file "
            "was deliberately replaced. " + _by_hand(url, target)
        ) from None
    except OSError as exc:
        raise PanoptemError(
            f"Could not write the download of {url} into {folder} ({exc}). Make the folder "
            "writable or point PANOPTEM_HOME to a writable folder."
        ) from None
    finally:
        pooch_log.setLevel(level)
    if known_hash is not None:
        stat = target.stat()
        with _verified_lock:
            _verified.add((str(target), stat.st_size, stat.st_mtime_ns, known_hash.lower()))
    return target

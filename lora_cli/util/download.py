"""HTTP downloads with a progress bar and errors a user can act on."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli import __version__
from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import fsync_dir

CHUNK = 1 << 20


class HTTPStatusError(LoraCliError):
    """The server answered an HTTP error status (`code`), so a caller can explain a 401 or a 404 its own way."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class BearerToken:
    """An access token sent as `Authorization: Bearer` to one origin (scheme://host:port) only.

    It goes as an unredirected header, so urllib never forwards it; a redirect to the same origin
    gets it again, one to another host (the Hub's LFS files redirect to a CDN) does not.
    """

    origin: str
    token: str = field(repr=False)

    def applies_to(self, url: str) -> bool:
        return origin(url) == self.origin


def origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


class _AuthRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, auth: BearerToken | None) -> None:
        self.auth = auth

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and self.auth is not None and self.auth.applies_to(new.full_url):
            new.add_unredirected_header("Authorization", f"Bearer {self.auth.token}")
        return new


def open_url(url: str, headers: dict[str, str], timeout: float, auth: BearerToken | None = None) -> Any:
    """urlopen `url` (following redirects) with `auth` sent only where `BearerToken.applies_to` says."""
    request = urllib.request.Request(url, headers={"User-Agent": f"lora-cli/{__version__}"} | headers)
    if auth is not None and auth.applies_to(url):
        request.add_unredirected_header("Authorization", f"Bearer {auth.token}")
    return urllib.request.build_opener(_AuthRedirects(auth)).open(request, timeout=timeout)


def fetch_bytes(url: str, timeout: float = 30.0) -> bytes:
    """GET `url` into memory (for small files such as the SMS zip), showing progress on a terminal."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": f"lora-cli/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            try:
                total = int(response.headers.get("Content-Length") or 0) or None
            except ValueError:  # a malformed header: take what the server sends
                total = None
            parts = []
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", disable=not sys.stderr.isatty()) as bar:
                while chunk := response.read(CHUNK):
                    parts.append(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise LoraCliError(f"download failed: {url} answered HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LoraCliError(f"download failed: cannot reach {url} ({reason})") from exc
    except http.client.HTTPException as exc:  # e.g. a chunked body cut short, a garbled status line
        raise LoraCliError(f"download failed: {url} sent a broken HTTP response ({type(exc).__name__})") from exc
    data = b"".join(parts)
    if total is not None and len(data) != total:
        raise LoraCliError(f"download failed: {url} sent {len(data)} of {total} bytes")
    return data


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    auth: BearerToken | None = None,
) -> Path:
    """Stream `url` to `dest`, resumably, and verify it (`auth`: a token for the URL's host, see BearerToken).

    Bytes go to `dest + ".part"`; a `.part` left by an earlier attempt is continued with an
    HTTP `Range: bytes=N-` request (a server that answers 200 instead of 206 restarts the
    download from zero; 416 means the `.part` already holds the whole file, or is stale).
    At the end the size and SHA-256 (computed incrementally, resumed prefix included) are
    checked: on a mismatch the `.part` is deleted and a LoraCliError names expected vs actual.
    On success the `.part` is fsynced and renamed over `dest`. A network error raises a
    LoraCliError and keeps the `.part`, so running the same command again resumes.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected_sha256 = expected_sha256.lower() if expected_sha256 else None
    for attempt in range(2):  # a second pass only after discarding a stale .part
        digest, restart = _stream_to_part(url, part, expected_size, progress, timeout, auth)
        if not restart:
            break
        part.unlink(missing_ok=True)
        if attempt:
            raise LoraCliError(f"download failed: {url} keeps refusing the byte range; try again later")
    actual_size = part.stat().st_size
    if expected_size is not None and actual_size != expected_size:
        part.unlink(missing_ok=True)
        raise LoraCliError(
            f"download of {url} is corrupt: expected {expected_size} bytes, got {actual_size}; "
            "the partial file was deleted, run the command again to download it afresh"
        )
    actual_sha256 = digest.hexdigest()
    if expected_sha256 is not None and actual_sha256 != expected_sha256:
        part.unlink(missing_ok=True)
        raise LoraCliError(
            f"download of {url} is corrupt: SHA-256 mismatch (expected {expected_sha256}, got "
            f"{actual_sha256}); the file was deleted, run the command again to download it afresh"
        )
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def _stream_to_part(
    url: str, part: Path, expected_size: int | None, progress: bool, timeout: float, auth: BearerToken | None
) -> tuple[Any, bool]:
    """Append the rest of `url` to `part`; (sha256 of the whole .part, whether to restart from zero)."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        return digest, True  # longer than the file can be: not a prefix of it
    if offset:
        with open(part, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    received = 0
    try:
        with open_url(url, headers, timeout, auth) as response:
            length = _int_header(response.headers.get("Content-Length"))
            if offset and response.status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:  # not the bytes we asked for: cannot append them
                    return hashlib.sha256(), True
            else:  # 200: the whole file, whether or not we asked for a range
                if offset:
                    offset, digest = 0, hashlib.sha256()
                total = length
            if total is None and length is not None:
                total = offset + length
            if expected_size is not None and total is not None and total != expected_size:
                part.unlink(missing_ok=True)
                raise LoraCliError(
                    f"download of {url} is not the expected file: the server reports {total} bytes, "
                    f"expected {expected_size} bytes"
                )
            show = progress and sys.stderr.isatty()
            try:
                out = open(part, "ab" if offset else "wb")  # noqa: SIM115 - closed below
            except OSError as exc:
                raise LoraCliError(f"cannot write {part}: {exc.strerror or exc}") from exc
            with out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
                disable=not show,
            ) as bar:
                while chunk := response.read(CHUNK):
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise LoraCliError(f"cannot write {part}: {exc.strerror or exc}") from exc
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if length is not None and received < length:
                raise _interrupted(url, part, f"the connection closed after {received} of {length} bytes")
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            _, total = _content_range(exc.headers.get("Content-Range") if exc.headers else None)
            size = total if total is not None else expected_size
            if size is not None and size == offset:
                return digest, False  # the .part already holds the whole file
            return digest, True
        raise HTTPStatusError(f"download failed: {url} answered HTTP {exc.code} {exc.reason}", exc.code) from exc
    except LoraCliError:
        raise
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # OSError: resets, timeouts
        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
        raise _interrupted(url, part, str(reason)) from exc
    return digest, False


def _interrupted(url: str, part: Path, why: str) -> LoraCliError:
    have = part.stat().st_size if part.exists() else 0
    return LoraCliError(
        f"download interrupted: {url} ({why}). The {have} bytes received so far are kept in {part}; "
        "run the same command again to resume"
    )


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from `bytes 100-199/1000` or `bytes */1000`; None where absent."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total



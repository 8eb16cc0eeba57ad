"""HTTP downloads with a progress bar and errors a user can act on."""

from __future__ import annotations

import http.client
import sys
import urllib.error
import urllib.request

from lora_cli import __version__
from lora_cli.errors import LoraCliError

CHUNK = 1 << 20


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

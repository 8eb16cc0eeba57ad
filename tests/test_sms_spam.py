"""lora_cli.data.sms_spam and lora_cli.util.download: the book's SMS Spam split, rebuilt without pandas, and its download."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import random
import socket
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from loopback import LoopbackServer

from lora_cli.data import sms_spam
from lora_cli.util import download
from lora_cli.util.errors import LoraCliError

SPLITS = ("train", "validation", "test")


def make_zip(content: bytes, member: str = "SMSSpamCollection", compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        archive.writestr("readme", "SMS Spam Collection v.1\n")  # the UCI zip has a readme beside the data
        archive.writestr(member, content)
    return buffer.getvalue()


def read_splits(directory: Path) -> dict[str, bytes]:
    return {name: (directory / f"{name}.csv").read_bytes() for name in SPLITS}


def book_split(source: Path, out: Path, seed: int | None = None) -> dict[str, bytes]:
    """The book's chapter-6 pipeline (pandas + llms_from_scratch.ch06), written with pandas' to_csv."""
    from llms_from_scratch.ch06 import create_balanced_dataset, random_split

    df = pd.read_csv(source, sep="\t", header=None, names=["Label", "Text"])
    if seed is None:
        balanced = create_balanced_dataset(df)
    else:  # the same steps with another random_state
        spam = df[df["Label"] == "spam"]
        balanced = pd.concat([df[df["Label"] == "ham"].sample(spam.shape[0], random_state=seed), spam])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    if seed is None:
        parts = random_split(balanced, 0.7, 0.1)
    else:
        shuffled = balanced.sample(frac=1, random_state=seed).reset_index(drop=True)
        train_end = int(len(shuffled) * 0.7)
        val_end = train_end + int(len(shuffled) * 0.1)
        parts = (shuffled[:train_end], shuffled[train_end:val_end], shuffled[val_end:])
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in zip(SPLITS, parts):
        frame.to_csv(out / f"{name}.csv", index=None)
    return read_splits(out)


# --------------------------------------------------------------------------- numpy's RandomState


@pytest.mark.parametrize("seed", [0, 1, 42, 123, 2**31 - 1, 2**32 - 1])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 100, 747, 1494, 4825, 70_000])
def test_numpy_permutation(n: int, seed: int) -> None:
    assert sms_spam.numpy_permutation(n, seed) == np.random.RandomState(seed).permutation(n).tolist()


def test_numpy_permutation_random_cases() -> None:
    rng = random.Random(0)
    for _ in range(30):
        n, seed = rng.randrange(0, 3000), rng.randrange(0, 2**32)
        assert sms_spam.numpy_permutation(n, seed) == np.random.RandomState(seed).permutation(n).tolist(), (n, seed)


@pytest.mark.parametrize("seed", [0, 5489, 123, 2**32 - 1])
def test_numpy_legacy_rng_state(seed: int) -> None:
    key = np.random.RandomState(seed).get_state()[1]
    state = sms_spam.numpy_legacy_rng(seed).getstate()[1]
    assert list(state[:624]) == key.tolist()
    assert state[624] == 624
    # The first 32-bit outputs agree too.
    ours = sms_spam.numpy_legacy_rng(seed)
    theirs = np.random.RandomState(seed).randint(0, 2**32, size=8, dtype=np.uint64).tolist()
    assert [ours.getrandbits(32) for _ in range(8)] == theirs


def test_pandas_sample_is_numpy_permutation() -> None:
    """What the module relies on: pandas' sample(n, random_state=s) takes permutation(len)[:n]."""
    df = pd.DataFrame({"x": range(500)})
    assert df.sample(37, random_state=123)["x"].tolist() == sms_spam.numpy_permutation(500, 123)[:37]
    assert df.sample(frac=1, random_state=7)["x"].tolist() == sms_spam.numpy_permutation(500, 7)


# --------------------------------------------------------------------------- the book's split


@pytest.fixture(scope="module")
def book_files(tmp_path_factory: pytest.TempPathFactory, sms_file: Path) -> dict[str, bytes]:
    return book_split(sms_file, tmp_path_factory.mktemp("book"))


def test_split_is_byte_identical_to_the_book(sms_dir: Path, book_files: dict[str, bytes]) -> None:
    ours = read_splits(sms_dir)
    for name in SPLITS:
        assert ours[name] == book_files[name], name


def test_row_counts(sms_dir: Path) -> None:
    counts = {}
    for name in SPLITS:
        frame = pd.read_csv(sms_dir / f"{name}.csv")
        assert list(frame.columns) == ["Label", "Text"]
        assert set(frame["Label"]) == {0, 1}
        counts[name] = len(frame)
    assert counts == {"train": 1045, "validation": 149, "test": 300}


def test_splits_are_balanced_and_disjoint(sms_dir: Path, sms_file: Path) -> None:
    frames = {name: pd.read_csv(sms_dir / f"{name}.csv", keep_default_na=False) for name in SPLITS}
    both = pd.concat(frames.values())
    assert (both["Label"] == 1).sum() == (both["Label"] == 0).sum() == 747
    source = pd.read_csv(sms_file, sep="\t", header=None, names=["Label", "Text"], keep_default_na=False)
    spam = sorted(source.loc[source["Label"] == "spam", "Text"])
    assert sorted(both.loc[both["Label"] == 1, "Text"]) == spam  # every spam message, once each


def test_dataset_json(sms_dir: Path, sms_file: Path) -> None:
    summary = json.loads((sms_dir / "dataset.json").read_text())
    digest = hashlib.sha256(sms_file.read_bytes()).hexdigest()
    assert summary["label_names"] == ["ham", "spam"]
    assert summary["matches_uci_v1"] is True
    assert summary["source_sha256"] == digest == sms_spam.SMS_SHA256
    assert summary["rows"] == {"train": 1045, "validation": 149, "test": 300}
    assert summary["seed"] == 123
    assert summary["name"] == "sms-spam"
    assert summary["source"] == str(sms_file)


def test_prepare_returns_the_summary(tmp_path: Path, sms_file: Path, sms_dir: Path) -> None:
    summary = sms_spam.prepare(tmp_path / "out", sms_file)
    assert summary == json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert read_splits(tmp_path / "out") == read_splits(sms_dir)


def test_other_seed_matches_pandas(tmp_path: Path, sms_file: Path, sms_dir: Path) -> None:
    summary = sms_spam.prepare(tmp_path / "ours", sms_file, seed=7)
    assert summary["seed"] == 7
    theirs = book_split(sms_file, tmp_path / "theirs", seed=7)
    assert read_splits(tmp_path / "ours") == theirs
    assert theirs != read_splits(sms_dir)


@pytest.mark.parametrize("case", range(4))
def test_synthetic_collections_match_the_book(tmp_path: Path, case: int) -> None:
    rng = random.Random(case)
    words = ["free", "call", "now", "ok", "lol", "£100", "win", "see", "you", "later", "a,b", 'say "hi"', "ü"]
    n_spam = rng.randrange(1, 40)
    n_ham = n_spam + rng.randrange(0, 60)
    labels = ["spam"] * n_spam + ["ham"] * n_ham
    rng.shuffle(labels)
    lines = [f"{label}\t{' '.join(rng.choices(words, k=rng.randrange(1, 8)))}" for label in labels]
    source = tmp_path / "collection"
    source.write_bytes(("\n".join(lines) + "\n").encode())
    summary = sms_spam.prepare(tmp_path / "ours", source)
    assert summary["matches_uci_v1"] is False
    assert read_splits(tmp_path / "ours") == book_split(source, tmp_path / "theirs")
    assert sum(summary["rows"].values()) == 2 * n_spam


def test_to_csv_matches_pandas() -> None:
    rows = [(0, "plain"), (1, "a,b"), (0, 'q"uote'), (1, "new\nline"), (0, "cr\rhere"), (1, " "), (0, "NA")]
    frame = pd.DataFrame(rows, columns=["Label", "Text"])
    assert sms_spam.to_csv(rows) == frame.to_csv(index=None)


@pytest.mark.parametrize(
    "content",
    [
        'ham\t"quoted" start\nspam\tsay "hi"\n\nham\tlast',
        'ham\t"a\tb"\nspam\tx\n',
        'ham\t"multi\nline"\nspam\tx',
        'ham\t"""triple"""\nspam\tend "quote"\n',
        "ham\t  spaced  \nspam\tx\r\nham\tcr\rspam\ty\n",
        "ham\t#hash\nspam\t'single'\n",
    ],
)
def test_parse_collection_reads_like_pandas(content: str) -> None:
    frame = pd.read_csv(io.StringIO(content), sep="\t", header=None, names=["Label", "Text"])
    assert sms_spam.parse_collection(content) == list(zip(frame["Label"], frame["Text"]))


# --------------------------------------------------------------------------- sources: zip, bad files


def test_zip_source_gives_the_same_files(tmp_path: Path, sms_file: Path, sms_dir: Path) -> None:
    archive = tmp_path / "sms+spam+collection.zip"
    archive.write_bytes(make_zip(sms_file.read_bytes()))
    summary = sms_spam.prepare(tmp_path / "out", archive)
    assert read_splits(tmp_path / "out") == read_splits(sms_dir)
    assert summary["matches_uci_v1"] is True
    assert summary["source_sha256"] == sms_spam.SMS_SHA256
    assert summary["source"] == str(archive)


def test_stored_zip_source(tmp_path: Path, sms_file: Path, sms_dir: Path) -> None:
    archive = tmp_path / "stored.zip"
    archive.write_bytes(make_zip(sms_file.read_bytes(), compression=zipfile.ZIP_STORED))
    sms_spam.prepare(tmp_path / "out", archive)
    assert read_splits(tmp_path / "out") == read_splits(sms_dir)


def test_zip_without_the_member(tmp_path: Path, sms_file: Path) -> None:
    archive = tmp_path / "other.zip"
    archive.write_bytes(make_zip(sms_file.read_bytes(), member="data/SMSSpamCollection.txt"))
    with pytest.raises(LoraCliError, match="no SMSSpamCollection member") as info:
        sms_spam.prepare(tmp_path / "out", archive)
    assert str(archive) in str(info.value)
    assert not (tmp_path / "out" / "train.csv").exists()


def corruptions(good: bytes) -> list[tuple[str, bytes]]:
    def flip(position: int) -> bytes:
        data = bytearray(good)
        for k in range(8):
            data[position + k] ^= 0xFF
        return bytes(data)

    return [
        ("truncated", good[: len(good) // 2]),
        ("header-only", good[:30]),
        ("deflate-start", flip(100)),  # corrupt compressed data: zlib errors
        ("deflate-early", flip(1000)),
        ("deflate-middle", flip(len(good) // 2)),  # bad CRC-32
        ("no-central-directory", good[:-22]),
        ("pk-junk", b"PK\x03\x04" + b"\x00" * 100),
    ]


def test_damaged_zips(tmp_path: Path, sms_file: Path) -> None:
    good = make_zip(sms_file.read_bytes())
    for name, data in corruptions(good):
        archive = tmp_path / f"{name}.zip"
        archive.write_bytes(data)
        with pytest.raises(LoraCliError, match="zip") as info:
            sms_spam.prepare(tmp_path / "out", archive)
        assert str(archive) in str(info.value), name
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "record"),
    [
        ("ham\thello\nspam\tbuy\nfoo\tbar\n", 3),
        ("ham\thello\nspam\n", 2),
        ("ham\thello\tworld\n", 1),
        ("Ham\thello\n", 1),
        ("label\ttext\nham\thello\n", 1),
        ("ham,hello\n", 1),
    ],
)
def test_bad_record(tmp_path: Path, content: str, record: int) -> None:
    source = tmp_path / "SMSSpamCollection"
    source.write_text(content)
    with pytest.raises(LoraCliError, match=f"record {record} is not 'ham|spam<TAB>text'"):
        sms_spam.prepare(tmp_path / "out", source)


def test_record_over_csv_field_limit(tmp_path: Path) -> None:
    source = tmp_path / "SMSSpamCollection"
    source.write_text("ham\thello\nspam\t" + "x" * 200_000 + "\n")
    with pytest.raises(LoraCliError, match="record 2"):
        sms_spam.prepare(tmp_path / "out", source)


def test_not_utf8(tmp_path: Path) -> None:
    source = tmp_path / "SMSSpamCollection"
    source.write_bytes(b"ham\thello\nspam\tcaf\xe9\n")
    with pytest.raises(LoraCliError, match="not UTF-8"):
        sms_spam.prepare(tmp_path / "out", source)


@pytest.mark.parametrize("content", ["ham\ta\nham\tb\n", "spam\ta\nspam\tb\nham\tc\n", "\n"])
def test_cannot_balance(tmp_path: Path, content: str) -> None:
    source = tmp_path / "SMSSpamCollection"
    source.write_text(content)
    with pytest.raises(LoraCliError, match="cannot balance"):
        sms_spam.prepare(tmp_path / "out", source)


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(LoraCliError, match="source not found"):
        sms_spam.prepare(tmp_path / "out", tmp_path / "absent")
    with pytest.raises(LoraCliError, match="source not found"):
        sms_spam.prepare(tmp_path / "out", tmp_path)  # a directory


# --------------------------------------------------------------------------- downloads from a local server


class Server(LoopbackServer):
    """A threaded HTTP server on 127.0.0.1 serving fixed routes; each route is (status, headers, body, mode)."""

    def __init__(self, routes: dict[str, tuple]) -> None:
        self.routes = routes
        self.requests: list[str] = []
        self.agents: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.requests.append(self.path)
                outer.agents.append(self.headers.get("User-Agent"))
                status, headers, body, mode = outer.routes.get(self.path, (404, {}, b"not found", "normal"))
                if mode == "drop":  # close without answering
                    self.close_connection = True
                    return
                if mode == "garbage":
                    self.wfile.write(b"this is not HTTP\r\n\r\n")
                    self.close_connection = True
                    return
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if mode == "chunked-cut":
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n" % (len(body) * 2) + body)  # promises twice what it sends
                elif mode == "as-is":  # only the route's own headers
                    self.end_headers()
                    self.wfile.write(body)
                elif mode == "short":
                    self.send_header("Content-Length", str(len(body) + 1000))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                self.close_connection = True

            def log_message(self, format: str, *args) -> None:  # keep test output clean
                pass

        self.start_server(Handler)


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def payloads(sms_file: Path) -> dict[str, bytes]:
    raw = sms_file.read_bytes()
    altered = raw.replace(b"ham\t", b"ham\t ", 1)
    return {"raw": raw, "zip": make_zip(raw), "altered_zip": make_zip(altered)}


@pytest.fixture
def server(no_proxy: None, payloads: dict[str, bytes]) -> Iterator[Server]:
    routes = {
        "/x.zip": (200, {"Content-Type": "application/zip"}, payloads["zip"], "normal"),
        "/SMSSpamCollection": (200, {}, payloads["raw"], "normal"),
        "/altered.zip": (200, {}, payloads["altered_zip"], "normal"),
        "/not-a-zip.zip": (200, {}, b"PK but not really a zip", "normal"),
        "/html": (200, {"Content-Type": "text/html"}, b"<html>moved</html>", "normal"),
        "/gone": (404, {}, b"gone", "normal"),
        "/error": (500, {}, b"oops", "normal"),
        "/short": (200, {}, payloads["zip"][:5000], "short"),
        "/chunked-cut": (200, {}, b"x" * 5000, "chunked-cut"),
        "/drop": (200, {}, b"", "drop"),
        "/garbage": (200, {}, b"", "garbage"),
        "/bad-length": (200, {"Content-Length": "abc"}, b"body", "as-is"),
    }
    with Server(routes) as running:
        yield running


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.zip"


def test_prepare_from_url(server: Server, tmp_path: Path, sms_dir: Path) -> None:
    url = f"{server.base}/x.zip"
    summary = sms_spam.prepare(tmp_path / "out", url)
    assert read_splits(tmp_path / "out") == read_splits(sms_dir)
    assert summary["source"] == url
    assert summary["matches_uci_v1"] is True
    assert server.requests == ["/x.zip"]


def test_prepare_from_url_to_plain_file(server: Server, tmp_path: Path, sms_dir: Path) -> None:
    sms_spam.prepare(tmp_path / "out", f"{server.base}/SMSSpamCollection")
    assert read_splits(tmp_path / "out") == read_splits(sms_dir)


def test_download_collection_first_url(server: Server, payloads: dict[str, bytes]) -> None:
    assert sms_spam.download_collection((f"{server.base}/x.zip", f"{server.base}/gone")) == payloads["raw"]
    assert server.requests == ["/x.zip"]  # the second URL is not needed


@pytest.mark.parametrize("bad", ["/gone", "/error", "/altered.zip", "/not-a-zip.zip", "/html", "/short", "/drop"])
def test_download_collection_falls_back(server: Server, payloads: dict[str, bytes], bad: str) -> None:
    data = sms_spam.download_collection((f"{server.base}{bad}", f"{server.base}/x.zip"))
    assert data == payloads["raw"]
    assert server.requests == [bad, "/x.zip"]


def test_download_collection_falls_back_from_unreachable_host(server: Server, payloads: dict[str, bytes]) -> None:
    assert sms_spam.download_collection((closed_port_url(), f"{server.base}/x.zip")) == payloads["raw"]


def test_download_collection_all_fail(server: Server) -> None:
    urls = (f"{server.base}/gone", f"{server.base}/altered.zip", f"{server.base}/not-a-zip.zip", closed_port_url())
    with pytest.raises(LoraCliError) as info:
        sms_spam.download_collection(urls)
    message = str(info.value)
    assert message.startswith("could not download the SMS Spam Collection")
    lines = message.splitlines()[1:]
    assert len(lines) == len(urls)
    for url, line in zip(urls, lines):
        assert line.strip().startswith(f"{url}:"), line
    assert "HTTP 404" in lines[0]
    assert "SHA-256" in lines[1]
    assert "damaged zip" in lines[2]
    assert "cannot reach" in lines[3]


def test_download_collection_every_url_corrupted(server: Server) -> None:
    urls = (f"{server.base}/altered.zip", f"{server.base}/html")
    with pytest.raises(LoraCliError) as info:
        sms_spam.download_collection(urls)
    message = str(info.value)
    for url in urls:
        assert f"{url}: content does not match the UCI file's SHA-256" in message


def test_download_collection_every_url_404(server: Server) -> None:
    urls = (f"{server.base}/gone", f"{server.base}/also-gone")
    with pytest.raises(LoraCliError) as info:
        sms_spam.download_collection(urls)
    for url in urls:
        assert f"{url}: download failed: {url} answered HTTP 404" in str(info.value)


def test_prepare_without_source_downloads(
    server: Server, tmp_path: Path, sms_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = sms_spam.download_collection
    local = (f"{server.base}/gone", f"{server.base}/x.zip")
    monkeypatch.setattr(sms_spam, "download_collection", lambda urls=local: original(urls))
    summary = sms_spam.prepare(tmp_path / "out")
    assert summary["source"] == "download"
    assert summary["matches_uci_v1"] is True
    assert read_splits(tmp_path / "out") == read_splits(sms_dir)
    assert server.requests == ["/gone", "/x.zip"]


def test_default_urls_are_the_uci_and_book_mirrors() -> None:
    assert sms_spam.download_collection.__defaults__ == (sms_spam.URLS,)
    assert all(url.startswith("https://") and url.endswith(".zip") for url in sms_spam.URLS)
    assert len(sms_spam.URLS) == 2


# --------------------------------------------------------------------------- download.fetch_bytes


def test_fetch_bytes(server: Server, payloads: dict[str, bytes]) -> None:
    assert download.fetch_bytes(f"{server.base}/x.zip") == payloads["zip"]
    assert download.fetch_bytes(f"{server.base}/SMSSpamCollection") == payloads["raw"]


def test_fetch_bytes_sends_a_user_agent(server: Server) -> None:
    from lora_cli import __version__

    download.fetch_bytes(f"{server.base}/x.zip")
    assert server.agents == [f"lora-cli/{__version__}"]


def test_fetch_bytes_malformed_content_length(server: Server) -> None:
    # http.client ignores a Content-Length it cannot parse and reads to the end; so do we.
    assert download.fetch_bytes(f"{server.base}/bad-length") == b"body"


def test_fetch_bytes_content_length_mismatch(server: Server) -> None:
    url = f"{server.base}/short"
    with pytest.raises(LoraCliError) as info:
        download.fetch_bytes(url)
    assert str(info.value) == f"download failed: {url} sent 5000 of 6000 bytes"


@pytest.mark.parametrize("route", ["/chunked-cut", "/drop", "/garbage"])
def test_fetch_bytes_server_breaks_off(server: Server, route: str) -> None:
    url = f"{server.base}{route}"
    with pytest.raises(LoraCliError, match="download failed") as info:
        download.fetch_bytes(url, timeout=10)
    assert url in str(info.value)


@pytest.mark.parametrize(("route", "status"), [("/gone", "HTTP 404"), ("/error", "HTTP 500")])
def test_fetch_bytes_http_errors(server: Server, route: str, status: str) -> None:
    with pytest.raises(LoraCliError, match=status):
        download.fetch_bytes(f"{server.base}{route}")


def test_fetch_bytes_unreachable(no_proxy: None) -> None:
    url = closed_port_url()
    with pytest.raises(LoraCliError, match="cannot reach") as info:
        download.fetch_bytes(url, timeout=5)
    assert url in str(info.value)


def test_fetch_bytes_timeout(no_proxy: None) -> None:
    """A server that accepts and never answers: the timeout turns into a LoraCliError."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/slow"
        with pytest.raises(LoraCliError, match="cannot reach"):
            download.fetch_bytes(url, timeout=0.5)

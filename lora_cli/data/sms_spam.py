"""The book's SMS Spam data set (chapter 6), rebuilt row for row without pandas.

The book reads the UCI file with pandas, samples 747 ham with `sample(747, random_state=123)`,
shuffles with `sample(frac=1, random_state=123)` and splits 70/10/20. pandas draws those
samples from numpy's legacy `RandomState`: MT19937 seeded with `init_genrand(123)` and a
Fisher-Yates shuffle with rejection-sampled bounded integers. Both are reproduced here
with Python's own MT19937 (`random.Random`), whose state can be set word for word.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import zipfile
import zlib
from pathlib import Path

from lora_cli.util.errors import LoraCliError
from lora_cli.util.fileio import atomic_dir, check_replaceable, write_text

SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"  # UCI v.1 SMSSpamCollection
URLS = (
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",  # the book's mirror
)
LABEL_NAMES = ["ham", "spam"]
SPLITS = ("train", "validation", "test")
FILES = (*(f"{split}.csv" for split in SPLITS), "dataset.json")  # everything a prepared directory holds


def numpy_legacy_rng(seed: int) -> random.Random:
    """A `random.Random` in the state numpy's `RandomState(seed)` starts in (MT19937 init_genrand)."""
    mt = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & 0xFFFFFFFF)
    rng = random.Random()
    rng.setstate((3, (*mt, 624), None))
    return rng


def numpy_permutation(n: int, seed: int) -> list[int]:
    """`numpy.random.RandomState(seed).permutation(n)`, which pandas' `sample` uses."""
    rng = numpy_legacy_rng(seed)
    out = list(range(n))
    for i in range(n - 1, 0, -1):
        mask = i
        for shift in (1, 2, 4, 8, 16, 32):
            mask |= mask >> shift
        j = rng.getrandbits(32) & mask
        while j > i:
            j = rng.getrandbits(32) & mask
        out[i], out[j] = out[j], out[i]
    return out


def parse_collection(content: str) -> list[tuple[str, str]]:
    """(label, text) rows as pandas' `read_csv(sep="\\t", header=None)` reads them (quotes included)."""
    rows = []
    number = 0
    try:
        for number, fields in enumerate(csv.reader(io.StringIO(content, newline=""), delimiter="\t"), start=1):
            if not fields:
                continue
            if len(fields) != 2 or fields[0] not in LABEL_NAMES:
                raise LoraCliError(f"record {number} is not 'ham|spam<TAB>text': {fields!r:.80}")
            rows.append((fields[0], fields[1]))
    except csv.Error as exc:  # e.g. a field over csv's size limit
        raise LoraCliError(f"record {number + 1} is malformed ({exc})") from exc
    return rows


def build_splits(rows: list[tuple[str, str]], seed: int = 123) -> dict[str, list[tuple[int, str]]]:
    """Balance ham to the spam count, shuffle, split 70/10/20; labels become ham=0, spam=1."""
    ham = [r for r in rows if r[0] == "ham"]
    spam = [r for r in rows if r[0] == "spam"]
    if len(ham) < len(spam) or not spam:
        raise LoraCliError(f"cannot balance {len(ham)} ham against {len(spam)} spam messages")
    ham_subset = [ham[i] for i in numpy_permutation(len(ham), seed)[: len(spam)]]
    balanced = [(LABEL_NAMES.index(label), text) for label, text in ham_subset + spam]
    shuffled = [balanced[i] for i in numpy_permutation(len(balanced), seed)]
    train_end = int(len(shuffled) * 0.7)
    val_end = train_end + int(len(shuffled) * 0.1)
    return {"train": shuffled[:train_end], "validation": shuffled[train_end:val_end], "test": shuffled[val_end:]}


def to_csv(rows: list[tuple[int, str]]) -> str:
    """The bytes pandas' `to_csv(index=None)` writes: header `Label,Text`, minimal quoting."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["Label", "Text"])
    writer.writerows(rows)
    return buffer.getvalue()


def read_source(source: str | Path) -> bytes:
    """The raw SMSSpamCollection bytes from the file itself, a UCI zip, or an http(s) URL."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        from lora_cli.util.download import fetch_bytes

        return _unzip_if_needed(fetch_bytes(text), text)
    path = Path(source)
    if not path.is_file():
        raise LoraCliError(f"SMS spam source not found: {path} (pass SMSSpamCollection or the UCI zip)")
    return _unzip_if_needed(path.read_bytes(), text)


def _unzip_if_needed(data: bytes, name: str) -> bytes:
    if not data.startswith(b"PK"):
        return data
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.read("SMSSpamCollection")
    except KeyError as exc:
        raise LoraCliError(f"{name}: the zip has no SMSSpamCollection member") from exc
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # bad CRC, corrupt or cut-short deflate data
        raise LoraCliError(f"{name}: damaged zip file ({exc})") from exc
    except (NotImplementedError, RuntimeError) as exc:  # an unsupported compression method, encryption
        raise LoraCliError(f"{name}: cannot read the zip ({exc})") from exc


def download_collection(urls: tuple[str, ...] = URLS) -> bytes:
    """Try each URL in turn; the result must be the UCI file (checked by SHA-256)."""
    errors = []
    for url in urls:
        try:
            data = read_source(url)
        except LoraCliError as exc:
            errors.append(f"{url}: {exc}")
            continue
        if hashlib.sha256(data).hexdigest() == SMS_SHA256:
            return data
        errors.append(f"{url}: content does not match the UCI file's SHA-256")
    raise LoraCliError("could not download the SMS Spam Collection:\n  " + "\n  ".join(errors))


def prepare(out_dir: str | Path, source: str | Path | None = None, seed: int = 123) -> dict:
    """Write train/validation/test CSVs and dataset.json as directory `out_dir` (replaced as a whole); return the summary."""
    out = Path(out_dir)
    check_replaceable(out, FILES)  # before a download
    data = read_source(source) if source is not None else download_collection()
    digest = hashlib.sha256(data).hexdigest()
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoraCliError(f"{source}: not UTF-8 text; is it the SMSSpamCollection file?") from exc
    splits = build_splits(parse_collection(content), seed)
    summary = {
        "name": "sms-spam",
        "source": str(source) if source is not None else "download",
        "source_sha256": digest,
        "matches_uci_v1": digest == SMS_SHA256,
        "label_names": LABEL_NAMES,
        "rows": {name: len(splits[name]) for name in SPLITS},
        "seed": seed,
    }
    with atomic_dir(out, FILES) as tmp:
        for name in SPLITS:
            write_text(tmp / f"{name}.csv", to_csv(splits[name]))
        write_text(tmp / "dataset.json", json.dumps(summary, indent=2) + "\n")
    return summary

"""Download MNIST / Fashion-MNIST where a network exists, verified by MD5.

Each file is written to a temporary name in the target directory, checked, then renamed into
place, so an interrupted or corrupt download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from bnlab.data.sources import cache_dir, get_source
from bnlab.errors import ChecksumError, ConfigError, DownloadError

# name -> (base URL, {file name: md5})
CANONICAL = {
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
}


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, dest: Path, md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically, refusing it unless its MD5 is ``md5``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    while block := resp.read(1 << 16):
                        out.write(block)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise DownloadError(f"could not download {url}: {reason}; check the network or use --mirror") from None
        got = md5sum(Path(tmp))
        if got != md5:
            raise ChecksumError(
                f"{url} has MD5 {got}, expected {md5}: the download is corrupt or the mirror serves "
                "other files; nothing was saved, try again or use another --mirror"
            )
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(name: str, data_dir: str | Path | None = None, *, mirror: str | None = None,
          progress=None) -> Path:
    """Download dataset ``name`` into ``data_dir`` (default ``~/.cache/bnlab/<name>``).

    Files already present with the right checksum are kept. ``mirror`` replaces the canonical
    base URL (the file names and checksums stay the same). Returns the directory.
    """
    get_source(name)
    if name not in CANONICAL:
        raise ConfigError(f"{name} cannot be fetched: bnlab downloads only {', '.join(CANONICAL)}")
    base, files = CANONICAL[name]
    base = mirror or base
    if not base.endswith("/"):
        base += "/"
    target = Path(data_dir).expanduser() if data_dir is not None else cache_dir(name)
    for fname, md5 in files.items():
        dest = target / fname
        if dest.is_file() and md5sum(dest) == md5:
            if progress:
                progress(f"{dest} already present and verified")
            continue
        if progress:
            progress(f"downloading {base}{fname}")
        download_file(base + fname, dest, md5)
    return target

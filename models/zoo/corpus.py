"""Text corpus for the model zoo's MoEs (``mixtral-mini``, ``train_moe.py``).

Three English sources, each split deterministically into a training part and a
held-out part:

* ``tinyshakespeare.txt``  -- Shakespeare (public domain), from the data folder.
* ``wikitext-2-valid.txt`` -- WikiText-2 raw validation split (CC BY-SA 3.0), data folder.
* Python 3.11 documentation sources (``*.rst.txt``, PSF licence) from the Debian package
  ``python3.11-doc``, fetched with ``apt-get download`` into a cache folder
  (``models/zoo/.corpus/``, git-ignored) and unpacked with ``dpkg-deb -x``.  A fixed,
  ordered subset of about 2.2 MB is used so the three sources stay roughly balanced.

Split rule: each source is cut into chunks of about ``CHUNK_BYTES`` bytes at line
boundaries; chunk number ``i`` is held out when ``i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1``
(every 20th chunk, i.e. 5%), the rest is training text.

The held-out chunks of each source are dealt in turn to two texts: :func:`search_text` (shipped
as ``search.txt``, what the bit-plan search scores plans on) and :func:`heldout_mix_text`
(evaluation only). Neither is trained on, and neither overlaps the other.

``wikitext-2-test.txt`` is never part of the training text; :func:`wikitext2_test_text`
returns it for evaluation only.

The data folder is ``$EDGEMOE_DATA_DIR`` if set, else ``<repo>/data`` (shipped with the
repository; ``data/README.md`` names each file's source and licence).  It is found from this
file's location, so it works from the checkout and from an editable install (``pip install -e``);
a wheel install has no ``<repo>/data`` and needs ``$EDGEMOE_DATA_DIR`` or ``data_dir``.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT / "data"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / ".corpus"

CHUNK_BYTES = 4096
HOLDOUT_EVERY = 20
CALIBRATION_BYTES = 16384
CALIBRATION_PIECE_BYTES = 1024

PYDOC_PACKAGE = "python3.11-doc"
PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
# Prose-heavy parts first, then the library reference fills the budget.  Order is fixed.
PYDOC_DIRS = ["tutorial", "reference", "howto", "faq", "extending", "using", "library"]
PYDOC_BUDGET_BYTES = 2_200_000

SOURCES = ("shakespeare", "wikitext2_valid", "python_docs")


class CorpusError(RuntimeError):
    """A corpus file or package is missing."""


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data folder: ``path``, else ``$EDGEMOE_DATA_DIR``, else ``<repo>/data``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("EDGEMOE_DATA_DIR")
    return Path(env) if env else DEFAULT_DATA_DIR


def _read_data_file(name: str, path: str | os.PathLike | None = None) -> str:
    f = data_dir(path) / name
    if not f.is_file():
        raise CorpusError(
            f"missing corpus file {f} (set EDGEMOE_DATA_DIR or pass data_dir to the folder "
            f"holding tinyshakespeare.txt, wikitext-2-valid.txt, wikitext-2-test.txt)"
        )
    return f.read_text(encoding="utf-8")


def _pydoc_root(cache_dir: Path) -> Path:
    """Unpack (fetching if needed) python3.11-doc into ``cache_dir`` and return its _sources dir."""
    root = cache_dir / "pydoc" / PYDOC_SOURCES
    if root.is_dir():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache_dir.glob(f"{PYDOC_PACKAGE}_*.deb"))
    if not debs:
        cmd = ["apt-get", "download", PYDOC_PACKAGE]
        r = subprocess.run(cmd, cwd=cache_dir, capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            r = subprocess.run(cmd, cwd=cache_dir, capture_output=True, text=True)
        debs = sorted(cache_dir.glob(f"{PYDOC_PACKAGE}_*.deb"))
        if not debs:
            raise CorpusError(
                f"could not fetch Debian package {PYDOC_PACKAGE} into {cache_dir} "
                f"(`apt-get download {PYDOC_PACKAGE}` failed: {r.stderr.strip()[-300:]})"
            )
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(cache_dir / "pydoc")], check=True)
    if not root.is_dir():
        raise CorpusError(f"{debs[-1]} has no {PYDOC_SOURCES}")
    return root


def python_docs_files(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """The fixed, ordered subset of python3.11-doc ``.rst.txt`` files used for the corpus."""
    root = _pydoc_root(Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
    chosen, total = [], 0
    for d in PYDOC_DIRS:
        for f in sorted(glob.glob(str(root / d / "**" / "*.txt"), recursive=True)):
            size = os.path.getsize(f)
            if total + size > PYDOC_BUDGET_BYTES:
                return chosen
            chosen.append(Path(f))
            total += size
    return chosen


def export_cache(dest: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> int:
    """Copy just the python3.11-doc files the corpus uses into ``dest`` in the cache layout, so
    that ``cache_dir=dest`` gives the same corpus on a machine without apt. Returns the bytes copied."""
    root = _pydoc_root(Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
    total = 0
    for f in python_docs_files(cache_dir):
        to = Path(dest) / "pydoc" / PYDOC_SOURCES / f.relative_to(root)
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, to)
        total += f.stat().st_size
    return total


def _python_docs_text(cache_dir=None) -> str:
    parts = [f.read_text(encoding="utf-8").strip("\n") + "\n" for f in python_docs_files(cache_dir)]
    return "\n".join(parts)


def chunks(text: str, chunk_bytes: int = CHUNK_BYTES) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_bytes`` characters, ending at line ends."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= chunk_bytes:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


def _split_chunks(text: str) -> tuple[list[str], list[str]]:
    """(train, held_out) chunks: every ``HOLDOUT_EVERY``-th chunk is held out."""
    train, held = [], []
    for i, c in enumerate(chunks(text)):
        (held if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 else train).append(c)
    return train, held


def split(text: str) -> tuple[str, str]:
    """(train, held_out) text: every ``HOLDOUT_EVERY``-th chunk is held out."""
    train, held = _split_chunks(text)
    return "".join(train), "".join(held)


def source_texts(data_path=None, cache_dir=None) -> dict[str, str]:
    """Full text of each training source, keyed by name (see ``SOURCES``)."""
    return {
        "shakespeare": _read_data_file("tinyshakespeare.txt", data_path),
        "wikitext2_valid": _read_data_file("wikitext-2-valid.txt", data_path),
        "python_docs": _python_docs_text(cache_dir),
    }


def train_texts(data_path=None, cache_dir=None) -> dict[str, str]:
    """Training part of each source."""
    return {k: split(v)[0] for k, v in source_texts(data_path, cache_dir).items()}


def heldout_texts(data_path=None, cache_dir=None) -> dict[str, str]:
    """Held-out part of each source (never trained on)."""
    return {k: split(v)[1] for k, v in source_texts(data_path, cache_dir).items()}


def train_text(data_path=None, cache_dir=None) -> str:
    """All training text, sources joined in ``SOURCES`` order."""
    return "\n\n".join(train_texts(data_path, cache_dir).values())


def heldout_text(data_path=None, cache_dir=None) -> str:
    """All held-out text, sources joined in ``SOURCES`` order."""
    return "\n\n".join(heldout_texts(data_path, cache_dir).values())


def _deal(texts, piece_bytes: int = CALIBRATION_PIECE_BYTES) -> str:
    """The texts cut into pieces of about ``piece_bytes`` characters, dealt out round robin, so
    that any prefix of the result covers every text."""
    pieces = [chunks(t, piece_bytes) for t in texts]
    return "".join(p for turn in itertools.zip_longest(*pieces, fillvalue="") for p in turn)


def calibration_text(data_path=None, cache_dir=None, per_source: int = CALIBRATION_BYTES) -> str:
    """Calibration text shipped with the model (profiling routing, rounding experts, bit-plan
    search): the first training text of each source, about ``per_source`` characters each, dealt
    out in pieces of about ``CALIBRATION_PIECE_BYTES``, so that whatever prefix the compiler reads
    (``--calibration-tokens``) covers every source. Training text only, so held-out measurements
    stay clean."""
    return _deal(_first_lines(t, per_source) for t in train_texts(data_path, cache_dir).values())


def _first_lines(text: str, n: int) -> str:
    """The whole lines of ``text`` within its first ``n`` characters."""
    return text[: text.rfind("\n", 0, n) + 1]


def _heldout_halves(data_path=None, cache_dir=None) -> tuple[list[str], list[str]]:
    """Each source's held-out chunks, alternately: (for the bit-plan search, for evaluation)."""
    search, evaluation = [], []
    for text in source_texts(data_path, cache_dir).values():
        held = _split_chunks(text)[1]
        search.append("".join(held[0::2]))
        evaluation.append("".join(held[1::2]))
    return search, evaluation


def search_text(data_path=None, cache_dir=None, per_source: int = CALIBRATION_BYTES) -> str:
    """Text shipped for the bit-plan search (``edgemoe-compile --search-text``): about ``per_source``
    characters of each source's search half of the held-out chunks, dealt out like the calibration
    text. Not trained on: a small model is more fragile on text it has memorised (uniform INT3 costs
    it 3.4% perplexity on its training text, 1.2% on held-out text), so a search scored on training
    text ranks experts by damage that unseen text does not see."""
    return _deal(_first_lines(t, per_source) for t in _heldout_halves(data_path, cache_dir)[0])


def heldout_mix_text(data_path=None, cache_dir=None) -> str:
    """The evaluation half of the held-out chunks (never trained on, never in the calibration or
    search text), dealt out like the calibration text so that a prefix scores every source."""
    return _deal(_heldout_halves(data_path, cache_dir)[1])


def wikitext2_test_text(data_path=None, max_bytes: int | None = None) -> str:
    """WikiText-2 test split (evaluation only), optionally cut to the first ``max_bytes`` characters
    at a line end."""
    text = _read_data_file("wikitext-2-test.txt", data_path)
    if max_bytes is not None and len(text) > max_bytes:
        cut = text.rfind("\n", 0, max_bytes)
        text = text[: cut + 1 if cut > 0 else max_bytes]
    return text


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Corpus statistics; optionally write the held-out texts.")
    ap.add_argument("--write-heldout", metavar="PATH", help="write heldout_mix_text() (evaluation) to PATH")
    ap.add_argument("--write-search", metavar="PATH", help="write search_text() (the bit-plan search's) to PATH")
    ap.add_argument("--export-cache", metavar="DIR", help="copy the python3.11-doc files used into DIR, a "
                    "cache folder for machines without apt (train_moe.py --cache-dir DIR)")
    args = ap.parse_args()
    if args.export_cache:
        print(f"exported {export_cache(args.export_cache):,d} bytes of python3.11-doc sources to {args.export_cache}")
    if args.write_heldout:
        Path(args.write_heldout).write_text(heldout_mix_text(), encoding="utf-8")
    if args.write_search:
        Path(args.write_search).write_text(search_text(), encoding="utf-8")
    for name, full in source_texts().items():
        tr, ho = split(full)
        print(f"{name:16s} total {len(full):>9,d}  train {len(tr):>9,d}  held-out {len(ho):>8,d}")
    print(f"python docs files: {len(python_docs_files())}")
    print(f"wikitext-2 test: {len(wikitext2_test_text()):,d} chars")

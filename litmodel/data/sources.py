"""Corpus sources for ``prepare_corpus``: a directory of text files, a Hub dataset repo, the Python stdlib.

Each returns a ``Corpus``: a re-iterable of ``(doc_id, text)`` with a ``description`` and (when known
up front) ``num_documents``. Files are listed eagerly, in sorted relative-path order (so the same
corpus gives the same documents in the same order on every machine), and read lazily.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from litmodel.utils import LitModelError

DEFAULT_TEXT_EXTENSIONS = (".txt", ".md")
DEFAULT_HUB_PATTERNS = ("*.txt", "*.jsonl", "*.json", "*.parquet")
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


class Corpus:
    """A re-iterable collection of ``(doc_id, text)`` documents."""

    def __init__(self, description: str, iterate: Callable[[], Iterator[tuple[str, str]]],
                 num_documents: int | None = None, files: Sequence[Path] = ()):
        self.description = description
        self._iterate = iterate
        self.num_documents = num_documents
        self.files = list(files)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return self._iterate()

    def __repr__(self) -> str:
        return f"Corpus({self.description!r})"


def read_text(path: Path) -> str:
    """A file's text: UTF-8 (a BOM is dropped), undecodable bytes replaced."""
    return path.read_bytes().decode("utf-8-sig", errors="replace")


def list_files(root: Path, match: Callable[[str], bool], skip_dir: Callable[[str, str], bool] = lambda rel, name: False,
               max_files: int | None = None, max_bytes: int | None = None) -> list[Path]:
    """Files under ``root`` whose relative posix path passes ``match``, sorted by that path.

    ``max_files`` keeps the first N; ``max_bytes`` keeps files (in order) until their total size
    reaches it. Symlinked directories are not followed.
    """
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else Path(rel_dir).as_posix()
        dirnames[:] = [d for d in dirnames if not skip_dir(rel_dir, d)]
        for name in filenames:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if match(rel) and os.path.isfile(os.path.join(dirpath, name)):
                found.append((rel, Path(dirpath) / name))
    found.sort(key=lambda item: item[0])
    files = [path for _, path in found]
    if max_files is not None:
        files = files[:max(0, max_files)]
    if max_bytes is not None:
        kept, total = [], 0
        for path in files:
            if total >= max_bytes:
                break
            kept.append(path)
            total += path.stat().st_size
        files = kept
    return files


def _file_documents(root: Path, files: list[Path]) -> Callable[[], Iterator[tuple[str, str]]]:
    def iterate() -> Iterator[tuple[str, str]]:
        for path in files:
            yield path.relative_to(root).as_posix(), read_text(path)

    return iterate


def _limits(max_files: int | None, max_bytes: int | None) -> str:
    parts = [f"max_files={max_files}"] if max_files is not None else []
    parts += [f"max_bytes={max_bytes}"] if max_bytes is not None else []
    return f", {', '.join(parts)}" if parts else ""


# --------------------------------------------------------------------------------------------
def text_dir_corpus(input_dir: str | os.PathLike, extensions: Sequence[str] = DEFAULT_TEXT_EXTENSIONS,
                    max_files: int | None = None, max_bytes: int | None = None) -> Corpus:
    """One document per file under ``input_dir`` (recursive) whose name ends with one of ``extensions``."""
    root = Path(input_dir)
    if not root.is_dir():
        raise LitModelError(f"input dir {root} does not exist or is not a directory; pass --input_dir "
                            "a directory of text files")
    exts = tuple(e if e.startswith(".") else f".{e}" for e in extensions) if extensions else ()
    files = list_files(root, lambda rel: not exts or rel.lower().endswith(tuple(e.lower() for e in exts)),
                       lambda rel, name: name.startswith("."), max_files, max_bytes)
    if not files:
        raise LitModelError(f"no files found: {root} holds no {'/'.join(exts) or 'regular'} files; point --input_dir "
                            "at a directory of text files or change --extensions")
    return Corpus(f"text files under {root.resolve()} (extensions {list(exts)}, {len(files)} files"
                  f"{_limits(max_files, max_bytes)})", _file_documents(root, files), len(files), files)


# --------------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(exclude_tests: bool = True, max_files: int | None = None, max_bytes: int | None = None,
                  root: str | os.PathLike | None = None) -> Corpus:
    """The ``.py`` files of the running Python's standard library (the embedded default corpus).

    ``site-packages``/``dist-packages``/``__pycache__`` are always skipped; with ``exclude_tests`` the
    ``test``/``tests``/``idle_test`` directories too. Order: sorted relative paths.
    """
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise LitModelError(f"the Python standard library dir {root} does not exist; use "
                            "scripts/prepare_text.py with a directory of text files instead")
    excluded = STDLIB_EXCLUDED_DIRS | (STDLIB_TEST_DIRS if exclude_tests else frozenset())
    files = list_files(root, lambda rel: rel.endswith(".py"), lambda rel, name: name in excluded,
                       max_files, max_bytes)
    if not files:
        raise LitModelError(f"no files found: no .py files under {root}; use scripts/prepare_text.py "
                            "with a directory of text files instead")
    version = ".".join(map(str, sys.version_info[:3]))
    return Corpus(f"Python {version} standard library .py files under {root} ({len(files)} files, "
                  f"exclude_tests={exclude_tests}{_limits(max_files, max_bytes)})",
                  _file_documents(root, files), len(files), files)


# --------------------------------------------------------------------------------------------
def _text_of(record: object, text_key: str, where: str) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise LitModelError(f"{where} is a {type(record).__name__}, not an object with a {text_key!r} field; "
                            "use a dataset of JSON objects or narrow --patterns")
    if text_key not in record:
        keys = ", ".join(sorted(map(str, record))[:10])
        raise LitModelError(f"{where} has no {text_key!r} field (it has: {keys}); pass --text_key with the "
                            "field that holds the text")
    text = record[text_key]
    if text is None:
        return None
    if not isinstance(text, str):
        raise LitModelError(f"{where}: field {text_key!r} is a {type(text).__name__}, not text; pass --text_key "
                            "with the field that holds the text")
    return text


def iter_data_file(path: Path, doc_prefix: str, text_key: str = "text") -> Iterator[tuple[str, str]]:
    """Documents of one data file: ``.txt`` (the whole file), ``.jsonl`` (one object per line),
    ``.json`` (a list of objects/strings, or an object whose ``text_key`` is a string or list of
    strings), ``.parquet`` (the ``text_key`` column; needs pyarrow)."""
    name = path.name.lower()
    if name.endswith(".txt"):
        yield doc_prefix, read_text(path)
    elif name.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"line {line_no} of {doc_prefix}"
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise LitModelError(f"{where} is not valid JSON ({err}); fix the file or exclude it with "
                                        "--patterns") from err
                text = _text_of(record, text_key, where)
                if text is not None:
                    yield f"{doc_prefix}:{line_no}", text
    elif name.endswith(".json"):
        try:
            data = json.loads(read_text(path))
        except ValueError as err:
            raise LitModelError(f"{doc_prefix} is not valid JSON ({err}); fix the file or exclude it with "
                                "--patterns") from err
        if isinstance(data, dict):
            value = data.get(text_key)
            if isinstance(value, str):
                yield doc_prefix, value
                return
            if not isinstance(value, list):
                raise LitModelError(f"{doc_prefix} is a JSON object without a {text_key!r} string or list; pass "
                                    "--text_key, or use a list of records")
            data = value
        if not isinstance(data, list):
            raise LitModelError(f"{doc_prefix} holds a JSON {type(data).__name__}; expected a list of records")
        for i, record in enumerate(data):
            text = _text_of(record, text_key, f"record {i} of {doc_prefix}")
            if text is not None:
                yield f"{doc_prefix}:{i}", text
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq  # optional dependency, only .parquet files need it (hub_corpus checked it)

        parquet = pq.ParquetFile(path)
        if text_key not in parquet.schema_arrow.names:
            raise LitModelError(f"{doc_prefix} has no {text_key!r} column (it has: "
                                f"{', '.join(parquet.schema_arrow.names[:10])}); pass --text_key")
        row = 0
        for batch in parquet.iter_batches(columns=[text_key], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield f"{doc_prefix}:{row}", _text_of({text_key: text}, text_key, f"row {row} of {doc_prefix}")
                row += 1
    else:
        raise LitModelError(f"cannot read {doc_prefix}: only .txt, .jsonl, .json and .parquet files are supported; "
                            "narrow --patterns")


def hub_corpus(repo_id: str, text_key: str = "text", patterns: Sequence[str] = DEFAULT_HUB_PATTERNS,
               revision: str | None = None, max_files: int | None = None, max_bytes: int | None = None,
               cache_dir: str | os.PathLike | None = None) -> Corpus:
    """Documents of a dataset repo on the Hub, fetched with ``snapshot_download(repo_type="dataset")``.

    Only files matching ``patterns`` (fnmatch on the repo path, as ``allow_patterns``) are fetched
    and read, in sorted path order. Honors ``HF_HOME``/``HF_HUB_OFFLINE`` (an offline run uses the
    local cache).
    """
    # deferred: ~0.3 s of imports that only this source needs (text dirs and the stdlib do not)
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    patterns = list(patterns)
    try:
        folder = snapshot_download(repo_id=repo_id, repo_type="dataset", revision=revision,
                                   allow_patterns=patterns, cache_dir=cache_dir)
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as err:
        raise LitModelError(f"dataset repo {repo_id!r} was not found or is gated/private on the Hub; check --repo_id "
                            "or log in with `hf auth login`") from err
    except hf_errors.RevisionNotFoundError as err:
        raise LitModelError(f"dataset repo {repo_id!r} has no revision {revision!r}; check --revision") from err
    except hf_errors.HFValidationError as err:
        raise LitModelError(f"{repo_id!r} is not a valid Hub repo id ({err}); pass --repo_id as org/name") from err
    except (hf_errors.LocalEntryNotFoundError, hf_errors.IncompleteSnapshotError, hf_errors.HfHubHTTPError,
            OSError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        fix = ("it is not in the local Hub cache and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download it"
               if offline else "check the network connection and --repo_id")
        raise LitModelError(f"could not fetch dataset {repo_id!r} from the Hub ({type(err).__name__}): {fix}") from err
    root = Path(folder)
    files = list_files(root, lambda rel: any(fnmatch.fnmatch(rel, p) for p in patterns),
                       lambda rel, name: name.startswith("."), max_files, max_bytes)
    if not files:
        raise LitModelError(f"no files found: dataset {repo_id!r} has no files matching {patterns}; change --patterns")
    if any(p.name.lower().endswith(".parquet") for p in files):
        try:
            import pyarrow.parquet  # noqa: F401  (optional: only .parquet files need it)
        except ImportError as err:
            raise LitModelError(f"dataset {repo_id!r} has .parquet files but pyarrow is not installed; "
                                "`pip install pyarrow`, or pass --patterns without *.parquet") from err
    commit = root.name

    def iterate() -> Iterator[tuple[str, str]]:
        for path in files:
            yield from iter_data_file(path, path.relative_to(root).as_posix(), text_key)

    return Corpus(f"Hub dataset {repo_id} at {commit} ({len(files)} files matching {patterns}, "
                  f"text_key={text_key!r}{_limits(max_files, max_bytes)})", iterate, None, files)


def corpus_from_documents(documents: Iterable[tuple[str, str]], description: str) -> Corpus:
    """Wrap a list of ``(doc_id, text)`` as a Corpus."""
    docs = list(documents)
    return Corpus(description, lambda: iter(docs), len(docs))

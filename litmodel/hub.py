"""The Hugging Face Hub: fetch a repo (or take it from the local cache) and convert it into a checkpoint dir.

    download(repo_id, checkpoint_root)   # Hub (or its cache) -> checkpoints/<org>/<name>

Repo ids are `org/name` or a registry short name (``resolve_repo_id``). The token comes from
``--access_token`` or ``HF_TOKEN``; ``HF_HUB_OFFLINE=1`` uses the cache only. huggingface_hub's
errors (gated repo, no network, incomplete cache) become one-line ``LitModelError``s that say what to do.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import (CachedRepoTreeNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                    IncompleteSnapshotError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError)

from litmodel.atomic import publish, staging_dir
from litmodel.config import Config
from litmodel.config_registry import configs, name_to_config
from litmodel.hf import BIN_INDEX, HF_CONFIG, SAFE_INDEX, convert_hf_checkpoint
from litmodel.tokenizer import TOKENIZER_FILES, copy_tokenizer_files
from litmodel.utils import LitModelError, parse_dtype


def resolve_repo_id(repo_id: str) -> str:
    """`org/name` as given, or the Hub id of a registry short name (e.g. `pythia-70m`)."""
    if "/" not in repo_id:
        if repo_id in name_to_config:
            return name_to_config[repo_id]["hf_repo_id"]
        Config.from_name(repo_id)  # raises with the closest names
    return repo_id


def registry_table() -> str:
    width = max(len(c["name"]) for c in configs)
    return "\n".join(f"{c['name']:<{width}}  {c['hf_repo_id']}" for c in configs)


def weight_patterns(files: Iterable[str]) -> list[str]:
    """Which weight files to fetch: safetensors when the repo has them, else the .bin files."""
    files = [f for f in files if "/" not in f]
    if any(re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", f) for f in files):
        return ["model*.safetensors", SAFE_INDEX]
    if any(re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", f) for f in files):
        return ["pytorch_model*.bin", BIN_INDEX]
    return ["model*.safetensors", SAFE_INDEX]  # let the conversion report the missing weights


def _connection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        for attr in ("TransportError", "ConnectionError", "Timeout", "TimeoutException"):
            cls = getattr(mod, attr, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


@contextlib.contextmanager
def hub_errors(repo_id: str, token: str | None) -> Iterator[None]:
    """Turn huggingface_hub's errors into one-line LitModelErrors that say what to do."""
    fix = ("connect to the network, or set HF_HUB_OFFLINE=1 with a filled Hub cache (HF_HOME / HF_HUB_CACHE), or "
           "convert a local HF dir with `python scripts/convert_hf_checkpoint.py --checkpoint_dir <dir>`")
    page = f"https://huggingface.co/{repo_id}"
    try:
        yield
    except (GatedRepoError, RepositoryNotFoundError) as err:
        what = "is gated" if isinstance(err, GatedRepoError) else "was not found, or is gated or private"
        hint = "your token has no access: " if token else ""
        raise LitModelError(f"{repo_id} {what} on the Hugging Face Hub; {hint}accept the license on the Hub page "
                            f"({page}) and pass --access_token or set HF_TOKEN (check the name with "
                            "`--repo_id list`)") from None
    except HFValidationError as err:
        raise LitModelError(f"invalid repo id {repo_id!r} ({_first_line(err)}); use <org>/<name>, e.g. "
                            "EleutherAI/pythia-70m, or a name from `--repo_id list`") from None
    except LocalEntryNotFoundError as err:
        cause = err.__cause__ or err.__context__
        if isinstance(err, IncompleteSnapshotError):
            what = "the Hub is unreachable and its cached snapshot is incomplete"
        elif constants.is_offline_mode():
            what = f"HF_HUB_OFFLINE=1 is set and it is not in the local Hub cache ({constants.HF_HUB_CACHE})"
        else:
            reason = f" ({_first_line(cause)})" if cause is not None else ""
            what = f"the Hugging Face Hub is unreachable{reason} and it is not in the local Hub cache"
        raise LitModelError(f"cannot get {repo_id}: {what}; {fix}") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise LitModelError(f"the Hub refused access to {repo_id} (HTTP {status}); accept the license on the Hub "
                                f"page ({page}) and pass --access_token or set HF_TOKEN") from None
        raise LitModelError(f"the Hugging Face Hub failed for {repo_id} ({_first_line(err)}); try again later, or "
                            "set HF_HUB_OFFLINE=1 to use the local cache") from None
    except _connection_errors() as err:
        raise LitModelError(f"cannot get {repo_id}: the Hugging Face Hub is unreachable ({_first_line(err)}); "
                            f"{fix}") from None


def list_repo_files(repo_id: str, token: str | None) -> list[str]:
    """The repo's file list: from the Hub, else from the cache (its tree listing or snapshot folder)."""
    api_error: BaseException | None = None
    if not constants.is_offline_mode():
        try:  # one request, no retries (list_repo_tree retries a dead connection for ~30 s)
            return [s.rfilename for s in HfApi(token=token).model_info(repo_id).siblings or []]
        except (HfHubHTTPError, *_connection_errors()) as err:
            api_error = err
    try:
        return [f.path for f in get_cached_repo_tree(repo_id)]
    except CachedRepoTreeNotFoundError:
        pass
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError as err:
        if isinstance(api_error, HfHubHTTPError):
            raise api_error from None
        raise err from api_error
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def download(repo_id: str, checkpoint_root: str | Path = "checkpoints", access_token: str | None = None,
             tokenizer_only: bool = False, dtype: str | None = None) -> Path:
    """Fetch the config, tokenizer and (safetensors-preferred) weights, convert to checkpoints/<org>/<name>."""
    repo_id = resolve_repo_id(repo_id)
    token = access_token or os.environ.get("HF_TOKEN") or None
    parse_dtype(dtype)  # fail on a bad --dtype before downloading gigabytes
    out_dir = Path(checkpoint_root) / repo_id
    with hub_errors(repo_id, token):
        patterns = [HF_CONFIG, *TOKENIZER_FILES]
        if not tokenizer_only:
            patterns += weight_patterns(list_repo_files(repo_id, token))
        snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, token=token))
    if tokenizer_only:
        if not any((snapshot / n).is_file() for n in TOKENIZER_FILES):
            raise LitModelError(f"{repo_id} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        with staging_dir(out_dir) as tmp:
            copy_tokenizer_files(snapshot, tmp)
            publish(tmp, out_dir)
        print(f"tokenizer of {repo_id} -> {out_dir}")
        return out_dir
    return convert_hf_checkpoint(snapshot, out_dir, dtype=dtype, name=repo_id, verbose=True)

"""Record files for finetuning (SFT and DPO): reading a ``.json`` or ``.jsonl`` file and validating its records,
with one-line errors naming the file, the record and what to fix.

Data files (``--data JSON --data.json_path FILE``): ``.json`` holding a list of records, or ``.jsonl``
with one record per line (`read_records`). An SFT record (`load_records`) is either

* Alpaca form: ``{"instruction": str, "input": str (optional), "output": str}``, or
* chat form: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``.

Preference records (``prompt``, ``chosen``, ``rejected``) are checked by `litmodel.data.preference`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from litmodel.utils import LitModelError

ROLES = ("system", "user", "assistant", "tool")


def load_records(json_path: str | os.PathLike) -> list[dict]:
    """The validated records of a ``.json`` (list) or ``.jsonl`` file; one-line errors otherwise."""
    path = Path(json_path)
    records = read_records(path, "add Alpaca records (instruction, input, output) or chat records (messages)")
    for i, rec in enumerate(records):
        _check_record(rec, i, path)
    return records


def read_records(json_path: str | os.PathLike, what: str) -> list:
    """The records of a ``.json`` (list) or ``.jsonl`` file, unchecked; one-line errors for a missing, unreadable
    or empty file (``what``: how to fill an empty one)."""
    path = Path(json_path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise LitModelError(f"unknown data file format {path.suffix or path.name!r} ({path}); pass a .json file "
                            "holding a list of records or a .jsonl file with one record per line")
    if not path.is_file():
        raise LitModelError(f"data file {path} does not exist; pass an existing --data.json_path")
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            records = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as err:
            raise LitModelError(f"{path} is not valid JSON ({err}); fix the file (a list of records)") from None
        if isinstance(records, dict) and not records:
            records = []
        if not isinstance(records, list):
            raise LitModelError(f"{path} holds a JSON {type(records).__name__}, not a list of records; wrap the "
                                "records in [...] or use .jsonl with one record per line")
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LitModelError(f"{path} line {lineno} is not valid JSON ({err.msg}); "
                                    "a .jsonl file needs one JSON object per line") from None
    if not records:
        raise LitModelError(f"{path} contains no records; {what}")
    return records


def check_messages(msgs: Any, where: str, key: str = "messages") -> None:
    """A non-empty list of ``{role, content}`` string objects with known roles, else a one-line error."""
    if not isinstance(msgs, list) or not msgs:
        raise LitModelError(f"{where}: '{key}' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise LitModelError(f"{where}: {key}[{j}] is not an object; use {{\"role\": ..., \"content\": ...}}")
        for field in ("role", "content"):
            if field not in m:
                raise LitModelError(f"{where}: {key}[{j}] is missing key {field!r}")
            if not isinstance(m[field], str):
                raise LitModelError(f"{where}: {key}[{j}].{field} must be a string, got {type(m[field]).__name__}")
        if m["role"] not in ROLES:
            raise LitModelError(f"{where}: {key}[{j}] has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")


def _check_record(rec: Any, i: int, path: Path) -> None:
    where = f"{path}: record {i}"
    if not isinstance(rec, dict):
        raise LitModelError(f"{where} is a JSON {type(rec).__name__}, not an object; each record needs "
                            "instruction/output keys (Alpaca) or a messages key (chat)")
    if "messages" in rec:
        msgs = rec["messages"]
        check_messages(msgs, where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise LitModelError(f"{where} has no assistant message, so nothing to learn; add one or remove the record")
        return
    if "instruction" in rec or "output" in rec:
        for key in ("instruction", "output"):
            if key not in rec:
                raise LitModelError(f"{where} is missing key {key!r}; Alpaca records need instruction, "
                                    "output and an optional input")
        for key in ("instruction", "input", "output"):
            if key in rec and rec[key] is not None and not isinstance(rec[key], str):
                raise LitModelError(f"{where}: key {key!r} must be a string, got {type(rec[key]).__name__}")
        return
    keys = ", ".join(sorted(map(str, rec))) or "none"
    raise LitModelError(f"{where} has an unknown format (keys: {keys}); use Alpaca keys instruction/input/output "
                        "or chat key messages")

"""JSONL records: the field lists of every file, strict reading, atomic writing, manifests.

A bad row stops the stage with `file:line: what is wrong` before anything is written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# Field name -> accepted Python types. `None` in a tuple means the value may be null.
IFT = {"id": (str,), "prompt": (str,), "completion": (str,)}
EFT = {"id": (str,), "prompt": (str,), "response": (str,), "score": (int,), "justification": (str,)}
PROMPT = {"prompt_id": (str,), "prompt": (str,), "source": (str,), "iteration": (int,)}
RESPONSE = {
    "prompt_id": (str,),
    "response_id": (str,),
    "prompt": (str,),
    "response": (str,),
    "sample_index": (int,),
    "finish_reason": (str,),
    "num_tokens": (int,),
}
SCORE = {**RESPONSE, "score": (int, float, type(None)), "judgments": (list,)}
PREFERENCE = {
    "prompt_id": (str,),
    "prompt": (str,),
    "chosen": (str,),
    "rejected": (str,),
    "score_chosen": (int, float),
    "score_rejected": (int, float),
}


class RecordError(ValueError):
    """A JSONL file that cannot be used; the message names the file, line and field."""


def _type_names(types: tuple) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def read_jsonl(path: str | Path, fields: dict[str, tuple] | None = None, id_field: str | None = None) -> list[dict]:
    """Read every row of `path`, checking that each has `fields` with the right types and unique ids."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found")
    rows: list[dict] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for name, types in (fields or {}).items():
                if name not in row:
                    raise RecordError(f"{path}:{lineno}: missing field '{name}'")
                value = row[name]
                if isinstance(value, bool) or not isinstance(value, types):
                    raise RecordError(
                        f"{path}:{lineno}: field '{name}' should be {_type_names(types)}, got {json.dumps(value)[:60]}"
                    )
            if id_field is not None:
                key = row[id_field]
                if key in seen:
                    raise RecordError(f"{path}:{lineno}: duplicate {id_field} '{key}' (first on line {seen[key]})")
                seen[key] = lineno
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write all rows at once: readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique: torchrun ranks may write together
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_manifest(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def write_manifest(
    path: str | Path,
    *,
    stage: str,
    iteration: int,
    rows_in: int,
    rows_out: int,
    started: float,
    inputs: list[str],
    outputs: list[str],
    extra: dict | None = None,
) -> dict:
    manifest = {
        "stage": stage,
        "iteration": iteration,
        "complete": True,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "seconds": round(time.time() - started, 2),
        "inputs": inputs,
        "outputs": outputs,
        **(extra or {}),
    }
    write_json(path, manifest)
    return manifest


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""JSONL records: the field lists of every file, strict reading, atomic writing, manifests.

A bad row stops the stage with `file:line: what is wrong` before anything is written.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

from selfreward.run import failpoints

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
    "prompt_truncated": (bool,),  # the prompt was longer than model.max_prompt_tokens and was cut
}
SCORE = {**RESPONSE, "score": (int, float, type(None)), "judgments": (list,), "judge_input_truncated": (bool,)}
PREFERENCE = {
    "prompt_id": (str,),
    "prompt": (str,),
    "chosen": (str,),
    "rejected": (str,),
    "score_chosen": (int, float, type(None)),  # null where no judge scored the pair (algorithm spin)
    "score_rejected": (int, float, type(None)),
}
SELECTED = {"prompt_id": (str,), "response_id": (str,), "prompt": (str,), "completion": (str,), "score": (int, float)}


class RecordError(ValueError):
    """A JSONL file that cannot be used; the message names the file, line and field."""


def _type_names(types: tuple) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        list: "a list",
        bool: "true or false",
        type(None): "null",
    }
    return " or ".join(names.get(t, t.__name__) for t in types)


def read_jsonl(
    path: str | Path, fields: dict[str, tuple] | None = None, id_field: str | None = None, check=None
) -> list[dict]:
    """Read every row of `path`, checking that each has `fields` with the right types and unique ids;
    `check(row, "file:line")` may check more and raise RecordError."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found")
    rows: list[dict] = []
    seen: dict[str, int] = {}
    opener = gzip.open if path.suffix == ".gz" else open  # e.g. a message table exported as .jsonl.gz
    with opener(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RecordError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                ) from None
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
                if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                    raise RecordError(
                        f"{path}:{lineno}: field '{name}' should be {_type_names(types)}, got {json.dumps(value)[:60]}"
                    )
            if id_field is not None:
                key = row[id_field]
                if key in seen:
                    raise RecordError(f"{path}:{lineno}: duplicate {id_field} '{key}' (first on line {seen[key]})")
                seen[key] = lineno
            if check is not None:
                check(row, f"{path}:{lineno}")
            rows.append(row)
    return rows


def write_text(path: str | Path, text: str) -> None:
    """Write a whole file at once: readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique: torchrun ranks may write together
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary file behind
        raise


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json(path: str | Path, data: dict | list) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_manifest(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError:  # not JSON, or not UTF-8: a manifest that cannot be trusted is no manifest
        return None
    return manifest if isinstance(manifest, dict) else None


def memory_text(peak: dict) -> str:
    """'peak RAM 1.2 GiB, GPU 14.0 GiB' from a manifest's peak_memory_mb."""
    if not peak:
        return ""
    text = f"peak RAM {max(peak.get('ram', 0), peak.get('ram_child', 0)) / 1024:.1f} GiB"
    return text + (f", GPU {peak['gpu'] / 1024:.1f} GiB" if "gpu" in peak else "")


def path_fingerprint(path: str | Path) -> str:
    """A content hash of a file or a model folder, cheap even for multi-GB weights.

    Small files are hashed whole; files over 16 MiB by their size and first and last MiB, which
    changes whenever a training run writes new weights.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return "missing"
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if file != path else file.name}\x00{size}\x00".encode())
        with file.open("rb") as handle:
            if size <= 16 << 20:
                digest.update(handle.read())
            else:
                digest.update(handle.read(1 << 20))
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()


def read_chunks(path: Path, fingerprint: str) -> tuple[dict[int, dict], int]:
    """The whole chunks of a ChunkLog file written for `fingerprint` (none when it was written for another, or is
    not there), and how many bytes they and the header take; reading only, as a node reads another's part."""
    done: dict[int, dict] = {}
    if not path.is_file():
        return done, 0
    with path.open("rb") as handle:
        lines = handle.read().split(b"\n")
    try:
        header = json.loads(lines[0])
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = {}
    if not isinstance(header, dict) or header.get("fingerprint") != fingerprint:
        return done, 0
    good_bytes = len(lines[0]) + 1
    for line in lines[1:-1]:  # the part after the last newline is torn or empty
        try:
            chunk = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        done[chunk["chunk"]] = chunk
        good_bytes += len(line) + 1
    return done, good_bytes


class ChunkLog:
    """An append-only log of finished chunks beside a stage's output, so a killed stage resumes exactly.

    Each line is one chunk {"chunk": k, "rows": [...], "state": {...}}, written with one write() and
    fsync'd: after a SIGKILL the log holds whole chunks plus at most one torn last line, which is cut
    off on reopening. The first line records the stage's fingerprint (config + inputs); a log from a
    different fingerprint is discarded, since its rows would not match what this run computes.
    """

    def __init__(self, path: str | Path, fingerprint: str):
        self.path = Path(path)
        self.done: dict[int, dict] = {}
        self._load(fingerprint)

    def _load(self, fingerprint: str) -> None:
        self.done, good_bytes = read_chunks(self.path, fingerprint)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if good_bytes == 0:
            self.path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n", encoding="utf-8")
        else:
            with self.path.open("r+b") as handle:
                handle.truncate(good_bytes)

    def append(self, index: int, rows: list[dict], state: dict | None = None) -> None:
        chunk = {"chunk": index, "rows": rows, "state": state or {}}
        line = (json.dumps(chunk, ensure_ascii=False) + "\n").encode("utf-8")
        with self.path.open("ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.done[index] = chunk
        failpoints.reach("after_chunk")

    def rows(self) -> list[dict]:
        return [row for k in sorted(self.done) for row in self.done[k]["rows"]]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

"""Input and output file formats on the client side (no server dependencies): JSON Lines, a JSON array, CSV,
Parquet, Hugging Face ``save_to_disk`` folders and OpenAI/vLLM batch files in; Parquet and batch output out.
Readers stream: a million-row file goes through in bounded memory (pyarrow reads Parquet and Arrow files
batch by batch; CSV and JSON Lines are read line by line)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

FORMATS = ("auto", "jsonl", "json", "csv", "parquet", "hf-dataset", "openai-batch")
ACCEPTED = "JSON Lines, a JSON array, CSV, Parquet, a Hugging Face save_to_disk folder, or an OpenAI batch file"
ARROW_BATCH = 8192
_GZIP_MAGIC = b"\x1f\x8b"
# The first line of JSON Lines is read whole to tell the format (one item, its texts included, is at most this).
_FIRST_LINE_MAX = 64 << 20


class FormatError(ValueError):
    """A file rewardq cannot read; the message says which formats it accepts."""


@dataclass(frozen=True)
class Columns:
    prompt: str = "prompt"
    response: str = "response"
    id: str | None = None  # None: "id" when the file has it


def compressed(path: Path) -> bool:
    """Whether ``path`` is a gzip file (by its first bytes, whatever its name): it is read through gzip."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def open_binary(path: Path) -> IO[bytes]:
    return cast(IO[bytes], gzip.open(path, "rb")) if compressed(path) else open(path, "rb")


def open_text(path: Path) -> IO[str]:
    """The file as UTF-8 text (a leading BOM dropped), gzip or not; newlines as they are (CSV needs them so)."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline="")


def detect(path: Path) -> str:
    """The format of ``path`` from its name (a ``.gz`` ending aside), then from its first bytes."""
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_info.json").is_file() or any(path.glob("*.arrow")):
            return "hf-dataset"
        if any(path.glob("*.parquet")):
            return "parquet"
        raise FormatError(
            f"{path} is a folder but not a Hugging Face dataset (save_to_disk) nor Parquet files; "
            f"rewardq reads {ACCEPTED}"
        )
    suffix = Path(path.name.removesuffix(".gz").removesuffix(".GZ")).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    with open_binary(path) as fh:
        head = fh.read(4096)
        start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if start.startswith(b"{") and b"\n" not in start:  # a first line longer than 4 KB: read it whole
            head += fh.readline(_FIRST_LINE_MAX)
    head = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        raise FormatError(f"{path} is empty: nothing to submit (rewardq reads {ACCEPTED})")
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        first = head.split(b"\n", 1)[0]
        try:
            obj = json.loads(first)
        except ValueError:
            raise FormatError(
                f"{path}: the first line is not a complete JSON object; JSON Lines expected (one "
                f"object per line; a pretty-printed file must be a JSON array). rewardq reads "
                f"{ACCEPTED}"
            ) from None
        return "openai-batch" if isinstance(obj, dict) and "custom_id" in obj and "body" in obj else "jsonl"
    shown = head[:20].decode("utf-8", "replace")
    raise FormatError(f"{path} is not {ACCEPTED} (it starts with {shown!r})")


def conversational(prompt: Any, response: Any) -> tuple[Any, Any]:
    """Prompt and response from conversational columns (lists of {role, content}): the last assistant turn is the
    response and the conversation before it the prompt, kept as messages (the server applies the reward model's
    chat template to them: rewardq.conversations). Plain strings pass."""
    if isinstance(response, list):
        turns = [m for m in response if isinstance(m, dict)]
        last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise FormatError("a conversational response has no assistant turn")
        before = turns[:last]
        response = str(turns[last].get("content", ""))
        if before:  # the whole conversation sat in the response column
            prompt = (prompt if isinstance(prompt, list) else []) + before if prompt is not None else before
    if isinstance(prompt, list):
        prompt = [
            {"role": m.get("role", "user"), "content": m.get("content", "")} for m in prompt if isinstance(m, dict)
        ]
    return prompt, response


def to_item(row: dict[str, Any], cols: Columns, index: int) -> dict[str, Any]:
    where = f"row {index}"
    if cols.response not in row:
        raise FormatError(
            f"{where}: no column {cols.response!r} (columns: {', '.join(map(str, row))}); name it with --response-col"
        )
    prompt, response = conversational(row.get(cols.prompt), row[cols.response])
    if prompt is None:
        raise FormatError(
            f"{where}: no column {cols.prompt!r} (columns: {', '.join(map(str, row))}); name it with --prompt-col"
        )
    item: dict[str, Any] = {"prompt": prompt, "response": response}
    id_col = cols.id or ("id" if "id" in row else None)
    if id_col is not None:
        if id_col not in row:
            raise FormatError(f"{where}: no column {id_col!r}")
        item["id"] = row[id_col] if isinstance(row[id_col], str | int) else str(row[id_col])
    return item


def _arrow_rows(batches: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield from batch.to_pylist()


def _arrow_files(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa

    files = sorted(path.glob("*.arrow")) or sorted(path.glob("*/*.arrow"))
    if not files:
        raise FormatError(f"{path}: no .arrow files; for a DatasetDict pass one split's folder (e.g. {path}/train)")
    for f in files:
        with pa.memory_map(str(f)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                yield from _arrow_rows(reader.get_batch(i) for i in range(reader.num_record_batches))
                continue
            yield from _arrow_rows(reader)


def _parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for f in sorted(path.glob("*.parquet")) if path.is_dir() else [path]:
        yield from _arrow_rows(pq.ParquetFile(f).iter_batches(batch_size=ARROW_BATCH))


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except ValueError as exc:
                    raise FormatError(
                        f"{path}, line {lineno}: not valid JSON ({exc}); JSON Lines expected: one object per line"
                    ) from None


def rows(path: Path, fmt: str = "auto") -> Iterator[dict[str, Any]]:
    """The file's records as dicts, streamed (a JSON array is the one format read whole)."""
    fmt = detect(path) if fmt == "auto" else fmt
    if fmt == "parquet":
        yield from _parquet(path)
    elif fmt == "hf-dataset":
        yield from _arrow_files(path)
    elif fmt == "csv":
        with open_text(path) as fh:
            tsv = path.name.lower().removesuffix(".gz").endswith(".tsv")
            yield from csv.DictReader(fh, delimiter="\t" if tsv else ",")
    elif fmt == "json":
        try:
            with open_text(path) as fh:
                doc = json.loads(fh.read())
        except ValueError as exc:
            raise FormatError(f"{path} starts like a JSON array but is not valid JSON ({exc})") from None
        if not isinstance(doc, list):
            raise FormatError(f"{path}: a JSON file must hold an array of objects")
        for i, obj in enumerate(doc):
            if not isinstance(obj, dict):
                raise FormatError(f"{path}: element {i} of the array is not an object")
            yield obj
    elif fmt == "jsonl":
        for lineno, obj in _json_lines(path):
            if not isinstance(obj, dict):
                raise FormatError(
                    f"{path}, line {lineno}: a {type(obj).__name__}, not an object; JSON Lines of objects expected"
                )
            yield obj
    else:
        raise FormatError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def items(path: Path, fmt: str = "auto", cols: Columns | None = None) -> Iterator[dict[str, Any]]:
    """Scoring items {id?, prompt, response} from any accepted file."""
    fmt = detect(path) if fmt == "auto" else fmt
    if fmt == "openai-batch":
        yield from batch_items(_json_lines(path))
        return
    for i, row in enumerate(rows(path, fmt)):
        yield to_item(row, cols or Columns(), i)


class NdjsonBody:
    """The items of a file as an ndjson request body in ~1 MiB pieces; iterable again from the start (a request
    answered 429 or 503 is sent again), with an upload progress bar counting items."""

    def __init__(self, path: Path, fmt: str, cols: Columns, progress: bool):
        self.path, self.fmt, self.cols, self.progress = path, fmt, cols, progress

    def __iter__(self) -> Iterator[bytes]:
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(unit="item", desc="upload", dynamic_ncols=True)
        buf = io.StringIO()
        try:
            for n, item in enumerate(items(self.path, self.fmt, self.cols), start=1):
                buf.write(json.dumps(item, ensure_ascii=False) + "\n")
                if buf.tell() >= 1 << 20:
                    yield buf.getvalue().encode("utf-8")
                    buf = io.StringIO()
                    if bar is not None:
                        bar.n = n
                        bar.refresh()
            yield buf.getvalue().encode("utf-8")
        finally:
            if bar is not None:
                bar.close()


# -- vLLM / OpenAI batch files ---------------------------------------------------------------------------------


def score_pairs_of(body: Any) -> list[tuple[str, str]]:
    """The (text_1, text_2) pairs of a vLLM /score body: one-to-many when text_1 is one text, else zipped."""
    if not isinstance(body, dict):
        raise FormatError("body: must be an object with text_1 and text_2")
    t1, t2 = body.get("text_1"), body.get("text_2")
    for name, value in (("text_1", t1), ("text_2", t2)):
        ok = isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, str) for t in value))
        if not ok:
            raise FormatError(f"{name}: must be a string or a non-empty list of strings")
    firsts = [t1] if isinstance(t1, str) else list(t1)  # type: ignore[arg-type]
    seconds = [t2] if isinstance(t2, str) else list(t2)  # type: ignore[arg-type]
    if len(firsts) == 1:
        return [(firsts[0], t) for t in seconds]
    if len(firsts) != len(seconds):
        raise FormatError(f"text_2: {len(seconds)} texts for {len(firsts)} in text_1: give one text_1, or as many")
    return list(zip(firsts, seconds, strict=True))


def batch_items(lines: Iterable[tuple[int, Any]]) -> Iterator[dict[str, Any]]:
    """Scoring items from batch-file requests: request ``custom_id`` with k pairs becomes items ``custom_id/0`` ..
    ``custom_id/k-1`` (``batch_output`` groups them back)."""
    seen: set[str] = set()
    for lineno, req in lines:
        where = f"line {lineno}: "
        if not isinstance(req, dict) or not isinstance(req.get("custom_id"), str) or not req["custom_id"]:
            raise FormatError(f"{where}a batch request needs a string custom_id")
        if req.get("url") not in ("/score", "/v1/score") or req.get("method", "POST") != "POST":
            raise FormatError(
                f"{where}only POST /score requests can be scored, got {req.get('method')} {req.get('url')}"
            )
        cid = req["custom_id"]
        if cid in seen:
            raise FormatError(f"{where}duplicate custom_id {cid!r}")
        seen.add(cid)
        try:
            pairs = score_pairs_of(req.get("body"))
        except FormatError as exc:
            raise FormatError(f"{where}{exc}") from None
        for k, (a, b) in enumerate(pairs):
            yield {"id": f"{cid}/{k}", "prompt": a, "response": b}


def score_response(version: str, scores: list[float], tokens: int = 0, request_id: str | None = None) -> dict[str, Any]:
    import time
    import uuid

    return {
        "id": request_id or f"score-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": version,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }


def batch_output(rows: Iterable[dict[str, Any]], version: str, job_id: str) -> Iterator[dict[str, Any]]:
    """Batch output lines, one per request, from a job's rows in index order (item ids ``custom_id/k``)."""
    current: str | None = None
    scores: list[float] = []
    error: dict[str, Any] | None = None
    n = 0

    def line() -> dict[str, Any]:
        nonlocal n
        n += 1
        rid = f"batch_req_{job_id}_{n}"
        if error is not None:
            return {"id": rid, "custom_id": current, "response": None, "error": error}
        body = score_response(version, scores, request_id=f"score-{job_id}-{n}")
        return {
            "id": rid,
            "custom_id": current,
            "response": {"status_code": 200, "request_id": body["id"], "body": body},
            "error": None,
        }

    for row in rows:
        cid = str(row["id"]).rsplit("/", 1)[0]
        if cid != current:
            if current is not None:
                yield line()
            current, scores, error = cid, [], None
        if row.get("error_code"):
            error = {"code": row["error_code"], "message": row.get("error") or ""}
        else:
            scores.append(float(row["score"]))
    if current is not None:
        yield line()


# The columns of every export of a job's results (JSON Lines, CSV, Parquet), in order: a failed item has no score
# and says why in error_code and error; a scored one has None there.
RESULT_FIELDS = ("index", "id", "prompt", "response", "score", "score_z", "percentile", "cos", "model_version",
                 "truncated", "n_tokens", "components", "error_code", "error")  # fmt: skip


def write_parquet(lines: Iterable[str | bytes], path: Path, rows_per_group: int = 10_000) -> int:
    """Rows of a jsonl results stream written as Parquet, a row group at a time; returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"index": pa.int64(), "score": pa.float64(), "score_z": pa.float64(), "percentile": pa.float64(),
             "cos": pa.list_(pa.float64()), "truncated": pa.bool_(), "n_tokens": pa.int64(),
             "components": pa.list_(pa.struct([("version", pa.string()), ("weight", pa.float64()),
                                               ("score", pa.float64())]))}  # fmt: skip
    schema = pa.schema([(name, types.get(name, pa.string())) for name in RESULT_FIELDS])
    n = 0
    pending: list[dict[str, Any]] = []
    with pq.ParquetWriter(str(path), schema) as writer:
        for line in lines:
            if line.strip():
                pending.append(json.loads(line))
            if len(pending) >= rows_per_group:
                writer.write_table(pa.Table.from_pylist(pending, schema=schema))
                n += len(pending)
                pending.clear()
        if pending or n == 0:
            writer.write_table(pa.Table.from_pylist(pending, schema=schema))
            n += len(pending)
    return n

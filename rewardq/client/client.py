"""Python client for the rewardq HTTP API; the CLI is built on it."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from httpx_retries import Retry, RetryTransport

from rewardq.client.formats import Columns, FormatError, NdjsonBody, compressed, detect, open_binary, open_text

DEFAULT_URL = "http://127.0.0.1:8000"
_FINISHED = ("succeeded", "failed", "cancelled", "rejected")  # jobs and training runs


class _FileBody:
    """A file sent in 1 MiB pieces (a large job is never read into memory whole), from the start again each time
    it is iterated, so a request answered 429 or 503 can be sent again."""

    def __init__(self, path: Path, progress: bool, chunk: int = 1 << 20):
        self.path, self.progress, self.chunk = path, progress, chunk

    def __iter__(self) -> Iterator[bytes]:
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.path.stat().st_size, unit="B", unit_scale=True, desc="upload", dynamic_ncols=True)
        try:
            with open(self.path, "rb") as fh:
                while data := fh.read(self.chunk):
                    if bar is not None:
                        bar.update(len(data))
                    yield data
        finally:
            if bar is not None:
                bar.close()


def _plain_jsonl(path: Path) -> bool:
    """Whether a JSON Lines file's first record has string prompt and response (else it needs converting)."""
    with open_text(path) as fh:
        for line in fh:
            if line.strip():
                try:
                    first = json.loads(line)
                except ValueError:
                    return True  # let the server name the bad line
                return isinstance(first, dict) and all(isinstance(first.get(k), str) for k in ("prompt", "response"))
    return True


def retrying_transport(retries: int, on_refused: bool = True) -> RetryTransport:
    """Retries on 429 and 503 (rewardq processed nothing: rate-limited, or a service briefly down) honouring
    Retry-After, and (``on_refused``) on connections refused or reset before a request was sent; any method, since a
    refused request changed nothing (job submissions also carry an Idempotency-Key)."""
    retry = Retry(
        total=retries,
        backoff_factor=0.5,
        max_backoff_wait=30,
        status_forcelist=[429, 503],
        allowed_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
        respect_retry_after_header=True,
        retry_on_exceptions=[httpx.ConnectError, httpx.ConnectTimeout] if on_refused else [],
        total_timeout=300,
    )
    return RetryTransport(retry=retry)


class FirstContactTransport(httpx.BaseTransport):
    """For the CLI: until the API has answered once, a refused connection is said at once (no API at that URL: one
    not started, a wrong --url), not after 15 s of retries; once it has answered, a refused connection is a restart
    under way and is retried with backoff, as the library's client always does."""

    def __init__(self, retries: int):
        self._first = retrying_transport(retries, on_refused=False)
        self._after = retrying_transport(retries)
        self._answered = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = (self._after if self._answered else self._first).handle_request(request)
        self._answered = True
        return resp

    def close(self) -> None:
        self._first.close()
        self._after.close()


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        resp.read()
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        raise ClientError(resp.status_code, body)


class PartialResults(RuntimeError):
    """The job has not finished: its results would be partial."""

    def __init__(self, job_id: str, status: str, done: int, failed: int, total: int):
        self.job_id, self.status, self.done, self.failed, self.total = job_id, status, done, failed, total
        super().__init__(
            f"job {job_id} is {status}: {done:,} of {total:,} items scored" + (f", {failed:,} failed" if failed else "")
        )


class ClientError(RuntimeError):
    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        detail = body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {detail}")


class Client:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 5,
        wait_for_api: bool = True,
    ):
        """``retries``: how many times a request refused (429, 503, a refused connection) is sent again, with
        backoff. ``wait_for_api`` False: a connection refused before the API has ever answered this client fails at
        once (the CLI: no API there), and only later ones are retried."""
        self.base_url = (base_url or os.environ.get("REWARDQ_API_URL") or DEFAULT_URL).rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        transport: httpx.BaseTransport | None = None
        if retries:
            transport = retrying_transport(retries) if wait_for_api else FirstContactTransport(retries)
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        resp = self._http.request(method, path, **kw)
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = resp.text
            raise ClientError(resp.status_code, body)
        return resp.json() if resp.content else None

    # -- jobs --------------------------------------------------------------------------------

    def submit(
        self,
        items: Iterable[Mapping[str, Any]] | str | Path,
        *,
        model_version: str | Mapping[str, float] | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        progress: bool = False,
        fmt: str = "auto",
        columns: Columns | None = None,
    ) -> str:
        """Create a job from a list of {id?, prompt, response} dicts or a file (streamed, with an upload progress
        bar when ``progress``): JSON Lines, a JSON array, CSV, Parquet, a Hugging Face dataset folder or an
        OpenAI batch file (``fmt`` auto-detects; ``columns`` maps prompt, response and id columns). Returns the
        job's id. An Idempotency-Key is made when none is given, so a retried submission never creates two jobs.
        ``model_version``: a version's id or name, or ``{version: weight}`` for their weighted ensemble."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        model_version = self._version(model_version)
        if isinstance(items, str | Path):
            path = Path(items)
            fmt = detect(path) if fmt == "auto" else fmt
            plain = fmt == "jsonl" and columns in (None, Columns()) and not compressed(path) and _plain_jsonl(path)
            # Plain JSON Lines go as they are (the server names a bad line); anything else (gzip included) is
            # converted on the fly.
            content: Any = _FileBody(path, progress) if plain else NdjsonBody(path, fmt, columns or Columns(), progress)
            params = {"model_version": model_version} if model_version else {}
            body = self._request(
                "POST",
                "/v1/jobs",
                content=content,
                params=params,
                headers={**headers, "Content-Type": "application/x-ndjson"},
            )
        else:
            payload: dict[str, Any] = {"items": list(items), "metadata": metadata or {}}
            if model_version:
                payload["model_version"] = model_version
            body = self._request("POST", "/v1/jobs", json=payload, headers=headers)
        return str(body["job_id"])

    def job(self, job_id: str, summary: bool = True, wait: float = 0) -> dict[str, Any]:
        """The job's status and progress, with its score summary unless ``summary`` is false; with
        ``wait``, the server answers when the job ends or after that many seconds (a long poll)."""
        params = {**({} if summary else {"summary": "false"}), **({"wait": wait} if wait else {})}
        return dict(self._request("GET", f"/v1/jobs/{job_id}", params=params or None))

    def jobs(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
        return list(self._request("GET", "/v1/jobs", params=params)["jobs"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/jobs/{job_id}/cancel"))

    def delete_job(self, job_id: str) -> dict[str, Any]:
        """Delete a job and everything it holds (cancelled first if it has not ended); returns the rows deleted per
        table. A big job takes a while: the request waits for the whole deletion."""
        read = self._http.timeout.read
        return dict(self._request("DELETE", f"/v1/jobs/{job_id}", timeout=None if read is None else max(read, 600.0)))

    def _follow(
        self,
        fetch: Callable[[], dict[str, Any]],
        position: Callable[[dict[str, Any]], tuple[int, int, str]],
        *,
        what: str,
        unit: str,
        progress: bool,
        poll: float,
        timeout: float | None,
    ) -> dict[str, Any]:
        """Call ``fetch`` (at most once per ``poll`` seconds) until its status is final; a progress bar on
        stderr from ``position`` (total, n, note)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        told: str | None = None
        try:
            while True:
                started = time.monotonic()
                obj = fetch()
                if obj.get("notice") and obj["notice"] != told:  # e.g. no live worker consumes its queue
                    told = obj["notice"]
                    print(f"note: {told}", file=sys.stderr, flush=True)
                total, n, note = position(obj)
                if progress and total:
                    if bar is None:
                        from tqdm import tqdm

                        # initial: work done before the bar existed is not counted in its rate (a job that was
                        # already finished would otherwise show millions of pairs a second).
                        bar = tqdm(total=total, initial=n, unit=unit, desc=what, dynamic_ncols=True)
                    bar.n = n
                    bar.set_postfix_str(note)
                    bar.refresh()
                if obj["status"] in _FINISHED:
                    return obj
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{what} still {obj['status']} after {timeout}s")
                time.sleep(max(0.0, poll - (time.monotonic() - started)))  # a long poll has waited already
        finally:
            if bar is not None:
                bar.close()

    def wait(
        self, job_id: str, progress: bool = True, poll: float = 0.5, timeout: float | None = None
    ) -> dict[str, Any]:
        """Poll until the job finishes (or ``timeout`` seconds pass); show a progress bar on stderr."""

        def position(job: dict[str, Any]) -> tuple[int, int, str]:
            p = job["progress"]
            return p["total"], p["done"] + p["failed"], job["status"]

        # Each poll is a long poll: the server answers as soon as the job ends, or after ``poll`` seconds with
        # the progress for the bar; with no bar to draw, one request waits up to 15 s. Polls skip the score
        # summary (a pass over every result: on a big job it would compete with the workers); the finished
        # job is fetched once with it.
        deadline = None if timeout is None else time.monotonic() + timeout

        def fetch() -> dict[str, Any]:
            hold = poll if progress else 15.0  # a notice (no worker on the queue) is seen within 15 s
            if deadline is not None:
                hold = max(0.0, min(hold, deadline - time.monotonic()))
            return self.job(job_id, summary=False, wait=round(hold, 3))

        self._follow(fetch, position, what=f"job {job_id}", unit="pair", progress=progress, poll=poll, timeout=timeout)
        return self.job(job_id)

    def results(self, job_id: str, sort: str = "index", page: int = 1000) -> Iterator[dict[str, Any]]:
        """Every result of a job, following the cursor page by page."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"sort": sort, "limit": page, **({"cursor": cursor} if cursor else {})}
            body = self._request("GET", f"/v1/jobs/{job_id}/results", params=params)
            yield from body["results"]
            cursor = body["next_cursor"]
            if not cursor:
                return

    def download(
        self, job_id: str, path: str | Path, fmt: str = "jsonl", progress: bool = False, partial: bool = False
    ) -> int:
        """Stream the job's results into ``path`` as jsonl, csv, openai-batch (output lines of a batch-file job) or
        parquet (written a row group at a time from the jsonl stream); return the rows written. A job that has not
        finished is refused with PartialResults (how far it got) unless ``partial``: the export then holds what is
        scored so far and, except Parquet, ends with a line saying it is partial."""
        job = self.job(job_id, summary=False)
        job_id, p = job["job_id"], job["progress"]  # the full id when a short one was given
        unfinished = job["status"] not in _FINISHED
        if unfinished and not partial:
            raise PartialResults(job_id, job["status"], p["done"], p["failed"], p["total"])
        url = f"/v1/jobs/{job_id}/results"
        if fmt == "parquet":
            from rewardq.client.formats import write_parquet

            with self._http.stream("GET", url, params={"format": "jsonl"}) as resp:
                _raise_for(resp)
                rows = (line for line in resp.iter_lines() if not line.startswith('{"partial"'))
                return write_parquet(rows, Path(path))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=p["done"] + p["failed"], unit="row", desc="results", dynamic_ncols=True)
        extra = (1 if fmt == "csv" else 0) + (1 if unfinished else 0)  # lines that are not rows: header, trailer
        lines = 0
        try:
            with self._http.stream("GET", url, params={"format": fmt}) as resp:
                _raise_for(resp)
                with open(path, "wb") as out:
                    for chunk in resp.iter_bytes():
                        out.write(chunk)
                        lines += chunk.count(b"\n")
                        if bar is not None:
                            bar.n = min(max(lines - (1 if fmt == "csv" else 0), 0), bar.total)
                            bar.refresh()
        finally:
            if bar is not None:
                bar.close()
        return max(lines - extra, 0)

    def score(
        self,
        pairs: Sequence[tuple[Any, str]] | Sequence[Mapping[str, Any]],
        model_version: str | Mapping[str, float] | None = None,
        persist: bool = False,
    ) -> dict[str, Any]:
        """Score pairs now through the interactive lane (POST /v1/score): (prompt, response) tuples or
        {id?, prompt, response} dicts, at most the server's REWARDQ_INTERACTIVE_MAX_ITEMS (2,048); ``model_version``
        as for submit."""
        model_version = self._version(model_version)
        items = [dict(p) if isinstance(p, Mapping) else {"prompt": p[0], "response": p[1]} for p in pairs]
        body: dict[str, Any] = {"items": items, **({"model_version": model_version} if model_version else {})}
        if persist:
            body["persist"] = True
        return dict(self._request("POST", "/v1/score", json=body))

    # -- feedback, training, models, schedules ------------------------------------------------

    def add_feedback(self, rows: Iterable[Mapping[str, Any]] | str | Path) -> dict[str, Any]:
        """Add preferences {prompt, chosen, rejected} and ratings {prompt, response, rating}, or a file of them
        (JSON Lines, or a JSON array)."""
        # Sent as JSON Lines, which the server streams (an application/json body is capped at
        # REWARDQ_MAX_JSON_BYTES, 32 MiB by default, since it is parsed in memory).
        if isinstance(rows, str | Path):
            fmt = detect(Path(rows))
            if fmt not in ("jsonl", "json"):
                raise FormatError(f"{rows}: feedback files are JSON Lines or a JSON array, not {fmt}")
            with open_binary(Path(rows)) as fh:
                body = fh.read()
            if fmt == "json":
                try:
                    array = json.loads(body)
                except ValueError as exc:
                    raise FormatError(f"{rows}: not valid JSON: {exc}") from exc
                if not isinstance(array, list):
                    raise FormatError(f"{rows}: a JSON feedback file holds an array of objects")
                body = _ndjson(array)
        else:
            body = _ndjson(rows)
        headers = {"Content-Type": "application/x-ndjson"}
        return dict(self._request("POST", "/v1/feedback", content=body, headers=headers))

    def feedback_stats(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/feedback"))

    def delete_feedback(self, before: datetime | str | None = None) -> dict[str, Any]:
        """Delete your feedback, or only the rows added before ``before`` (a datetime, or an ISO 8601 date or time;
        UTC unless it names a zone); returns {"deleted", "before", "total" (left)}."""
        params = {"before": before.isoformat() if isinstance(before, datetime) else before} if before else None
        return dict(self._request("DELETE", "/v1/feedback", params=params))

    def train(self, **params: Any) -> dict[str, Any]:
        """Start a fine-tuning run now (parameters as in POST /v1/training-runs); returns the run."""
        return dict(self._request("POST", "/v1/training-runs", json=params or None))

    def training_defaults(self) -> dict[str, dict[str, Any]]:
        """Every parameter a run of each trainable kind uses when it is not given (GET /v1/training-runs/defaults)."""
        return dict(self._request("GET", "/v1/training-runs/defaults")["kinds"])

    def training_run(self, run_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/training-runs/{run_id}"))

    def training_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/training-runs", params={"limit": limit})["runs"])

    def wait_training(
        self, run_id: str, progress: bool = True, poll: float = 1.0, timeout: float | None = None
    ) -> dict[str, Any]:
        """Poll a training run until it ends; a progress bar over its optimisation steps on stderr."""

        def position(run: dict[str, Any]) -> tuple[int, int, str]:
            p = run["progress"]
            total = int(p.get("total_steps") or 0)
            step = total if run["status"] in _FINISHED else int(p.get("step") or 0)
            return total, step, f"epoch {p.get('epoch')}/{p.get('epochs')} loss {p.get('loss', 0):.4f}"

        return self._follow(
            lambda: self.training_run(run_id),
            position,
            what=f"run {run_id}",
            unit="step",
            progress=progress,
            poll=poll,
            timeout=timeout,
        )

    def models(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/models"))

    def activate(self, version: str, default: bool = False) -> dict[str, Any]:
        """Make ``version`` the one your new jobs use; ``default``: every tenant's default (admin keys)."""
        params = {"default": "true"} if default else None
        return dict(self._request("POST", f"/v1/models/{version}/activate", params=params))

    def follow_default(self) -> dict[str, Any]:
        """Drop your own choice of version: new jobs use the operator's default again."""
        return dict(self._request("DELETE", "/v1/models/active"))

    def import_model(self, path: str | Path, kind: str, name: str | None = None, **options: Any) -> dict[str, Any]:
        """Register a Hugging Face folder on the API's machine as a shared version (admin keys): ``kind`` is
        'classifier' or 'likelihood'; options: max_length, truncation_side, reduction, dtype."""
        body = {"path": str(Path(path).expanduser().resolve()), "kind": kind, "name": name, **options}
        return dict(self._request("POST", "/v1/models/import", json={k: v for k, v in body.items() if v is not None}))

    def ensemble(self, weights: Mapping[str, float], name: str | None = None) -> dict[str, Any]:
        """The ensemble of these versions (ids or names) with these weights, R = sum of weight x R_member, as a version
        of your own: made on first use, the same one after (POST /v1/models/ensemble)."""
        body: dict[str, Any] = {"members": [{"version": v, "weight": float(w)} for v, w in weights.items()]}
        if name:
            body["name"] = name
        return dict(self._request("POST", "/v1/models/ensemble", json=body))

    def _version(self, model_version: str | Mapping[str, float] | None) -> str | None:
        """A version as named (its id or name), or the ensemble that ``{version: weight}`` stands for."""
        if model_version is None or isinstance(model_version, str):
            return model_version
        return str(self.ensemble(model_version)["version"])

    def schedules(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/schedules")["schedules"])

    def add_schedule(self, cron: str, min_new_feedback: int = 0, **params: Any) -> dict[str, Any]:
        body = {"cron": cron, "min_new_feedback": min_new_feedback, "params": params}
        return dict(self._request("POST", "/v1/schedules", json=body))

    def delete_schedule(self, schedule_id: str) -> None:
        self._request("DELETE", f"/v1/schedules/{schedule_id}")

    def health(self) -> bool:
        try:
            return self._http.get("/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


def _ndjson(rows: Iterable[Any]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)

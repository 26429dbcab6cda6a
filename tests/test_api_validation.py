"""Bad input gets a 4xx whose JSON names the field (and the item index), and leaves no job behind."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from rewardq.storage.db import get_sessionmaker
from rewardq.storage.models import Item, Job

GOOD = {"prompt": "p", "response": "r"}


def _counts(db_url: str) -> tuple[int, int]:
    with get_sessionmaker(db_url)() as s:
        return s.query(Job).count(), s.query(Item).count()


def _first_error(resp) -> dict:
    body = resp.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["errors"], body
    return body["errors"][0]


@pytest.mark.parametrize(
    ("payload", "field", "index"),
    [
        ({"items": [GOOD, {"response": "r"}]}, "prompt", 1),
        ({"items": [GOOD, GOOD, {"prompt": "p"}]}, "response", 2),
        ({"items": [{"prompt": 3, "response": "r"}]}, "prompt", 0),
        ({"items": [GOOD, {"prompt": "p", "response": ["r"]}]}, "response", 1),
        ({"items": [GOOD, "not an object"]}, "item", 1),
        ({"items": []}, "items", None),
        ({"items": "nope"}, "items", None),
        ({}, "items", None),
        ({"items": [{"id": "a", **GOOD}, {"id": "b", **GOOD}, {"id": "a", **GOOD}]}, "id", 2),
        ({"items": [{"id": 7, **GOOD}, {"id": "7", **GOOD}]}, "id", 1),
        ({"items": [{"id": True, **GOOD}]}, "id", 0),
        ({"items": [GOOD, {"prompt": "a\x00b", "response": "r"}]}, "prompt", 1),
        ({"items": [GOOD], "model_version": "no-such-version"}, "model_version", None),
        ({"items": [GOOD], "metadata": [1]}, "metadata", None),
    ],
)
def test_bad_json_items_are_refused_with_field_and_index(api: TestClient, db_url: str, payload, field, index):
    before = _counts(db_url)
    resp = api.post("/v1/jobs", json=payload)
    assert resp.status_code == 422, resp.text
    err = _first_error(resp)
    assert err["field"] == field
    assert err.get("index") == index
    assert _counts(db_url) == before


@pytest.mark.parametrize(
    ("body", "field", "index"),
    [
        (b'{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": \n', "line", 1),
        (b'{"prompt": "p", "response": "r"}\n\n{"prompt": "p"}\n', "response", 1),
        (b'{"prompt": "p", "response": NaN}\n', "line", 0),
        (b"\xff\xfe not utf-8\n", "line", 0),
        ('{"prompt": "p", "response": "r"}'.encode("utf-16"), "line", 0),  # ndjson is UTF-8 only
        (b"", "items", None),
    ],
)
def test_bad_ndjson_is_refused(api: TestClient, db_url: str, body: bytes, field: str, index):
    before = _counts(db_url)
    resp = api.post("/v1/jobs", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert resp.status_code == 422, resp.text
    err = _first_error(resp)
    assert err["field"] == field
    assert err.get("index") == index
    assert _counts(db_url) == before


def test_ndjson_items_are_stored_exactly_on_the_fast_insert_path(api: TestClient, db_url: str):
    # A file saved with a byte order mark (common on Windows) is still UTF-8 ndjson; texts with
    # quotes, tabs, newlines and non-ASCII characters go through the bulk insert unchanged.
    texts = [("caf\u00e9 \u2615", 'say "hi"\tthen\nleave'), ("\U0001f600 emoji", "x" * 3000)]
    lines = [json.dumps({"id": f"k{i}", "prompt": p, "response": r}) for i, (p, r) in enumerate(texts)]
    body = b"\xef\xbb\xbf" + "\n".join(lines).encode()
    resp = api.post("/v1/jobs", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert resp.status_code == 202, resp.text
    with get_sessionmaker(db_url)() as s:
        rows = s.query(Item).filter_by(job_id=resp.json()["job_id"]).order_by(Item.idx).all()
    assert [(r.idx, r.item_id, r.prompt, r.response) for r in rows] == [
        (i, f"k{i}", p, r) for i, (p, r) in enumerate(texts)
    ]


def test_not_json_and_wrong_content_type(api: TestClient, db_url: str):
    before = _counts(db_url)
    resp = api.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 422 and _first_error(resp)["field"] == "body"
    resp = api.post("/v1/jobs", content=b"prompt=p", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 415 and _first_error(resp)["field"] == "content-type"
    resp = api.post("/v1/jobs", content=json.dumps({"items": [GOOD]}).replace('"r"', "Infinity"),
                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert resp.status_code == 422
    assert _counts(db_url) == before


def test_unknown_job_is_404(api: TestClient):
    for method, path in (("GET", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/results"), ("POST", "/v1/jobs/nope/cancel")):
        resp = api.request(method, path)
        assert resp.status_code == 404, (path, resp.text)
        assert _first_error(resp)["field"] == "job_id"


def test_bad_query_parameters_are_422(api: TestClient):
    resp = api.get("/v1/jobs", params={"status": "bogus"})
    assert resp.status_code == 422 and _first_error(resp)["field"] == "status"
    resp = api.get("/v1/jobs", params={"limit": 0})
    assert resp.status_code == 422 and _first_error(resp)["field"] == "limit"


def test_job_summary_can_be_left_out_of_a_poll(api: TestClient):
    job_id = api.post("/v1/jobs", json={"items": [GOOD]}).json()["job_id"]
    full = api.get(f"/v1/jobs/{job_id}").json()
    assert full["summary"]["count"] == 0 and full["progress"]["total"] == 1
    lean = api.get(f"/v1/jobs/{job_id}", params={"summary": "false"}).json()
    assert lean["summary"] is None and lean["progress"] == full["progress"] and lean["status"] == full["status"]
    resp = api.get(f"/v1/jobs/{job_id}", params={"summary": "maybe"})
    assert resp.status_code == 422 and _first_error(resp)["field"] == "summary"


def test_bad_results_parameters_are_422(api: TestClient):
    resp = api.post("/v1/jobs", json={"items": [GOOD]})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    for params, field in (({"format": "xml"}, "format"), ({"sort": "prompt"}, "sort"),
                          ({"cursor": "!!!"}, "cursor"), ({"limit": 10**6}, "limit")):  # fmt: skip
        resp = api.get(f"/v1/jobs/{job_id}/results", params=params)
        assert resp.status_code == 422, (params, resp.text)
        assert _first_error(resp)["field"] == field


def test_job_metadata_is_small_and_shallow(api: TestClient, db_url: str):
    """Metadata comes back with every job listed: at most 16 KB as JSON and 4 levels deep, else 422 naming it."""
    item = [{"prompt": "p", "response": "r"}]
    with get_sessionmaker(db_url)() as s:
        before = s.query(Job).count()
    for metadata, why in (
        ({"blob": "x" * 17_000}, "bytes as JSON"),
        ({"a": {"b": {"c": {"d": {"e": 1}}}}}, "levels deep"),
        (["not", "an", "object"], "must be an object"),
    ):
        resp = api.post("/v1/jobs", json={"items": item, "metadata": metadata})
        assert resp.status_code == 422, resp.text
        [err] = resp.json()["errors"]
        assert err["field"] == "metadata" and why in err["message"], err
        resp = api.post("/v1/score", json={"items": item, "persist": True, "metadata": metadata})
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "metadata", resp.text
    with get_sessionmaker(db_url)() as s:
        assert s.query(Job).count() == before
    ok = api.post("/v1/jobs", json={"items": item, "metadata": {"run": "x" * 16_000, "a": {"b": {"c": 1}}}})
    assert ok.status_code == 202, ok.text


def test_csv_exports_do_not_carry_formulas(api: TestClient, db_url: str):
    """A prompt like =HYPERLINK(...) must not reach a spreadsheet as a formula: cells that start with = + - @, a
    tab or a carriage return get a leading apostrophe; numbers (a negative score) stay numbers."""
    import csv
    import io

    from rewardq.storage import repository as repo
    from rewardq.storage.db import session_scope

    evil = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "plain"]
    items = [{"id": f"e{i}", "prompt": t, "response": t} for i, t in enumerate(evil)]
    job_id = api.post("/v1/jobs", json={"items": items}).json()["job_id"]
    with session_scope(db_url) as s:
        version = s.get(Job, job_id).model_version
        scores = [-0.5] * len(evil)
        cos = [[0.1]] * len(evil)
        repo.save_results(s, job_id=job_id, batch_no=0, start_idx=0, scores=scores, cos=cos, model_version=version)
    table = list(csv.DictReader(io.StringIO(api.get(f"/v1/jobs/{job_id}/results", params={"format": "csv"}).text)))
    assert [r["prompt"] for r in table] == ["'" + t for t in evil[:5]] + ["plain"]
    assert all(r["response"] == r["prompt"] for r in table)
    assert {r["score"] for r in table} == {"-0.5"}


def test_result_pages_are_capped_in_bytes_and_errors_come_in_pages(db_url: str, redis_url: str):
    """A page of long texts ends early (next_cursor goes on from there, nothing skipped or repeated), and the error
    ledger is paginated with a Link header instead of coming back whole."""
    from rewardq.storage import repository as repo
    from rewardq.storage.db import session_scope
    from tests.conftest import make_client

    big = "x" * 3000  # each row costs about 6 KB: a 16 KB page holds two
    items = [{"id": f"b{i}", "prompt": f"{i} {big}", "response": big} for i in range(9)]
    with make_client(db_url, "test-idle-pages", max_page_bytes=16 * 1024) as api:
        job_id = api.post("/v1/jobs", json={"items": items}).json()["job_id"]
        with session_scope(db_url) as s:
            version = s.get(Job, job_id).model_version
            repo.save_results(s, job_id=job_id, batch_no=0, start_idx=0, scores=[0.5] * 5, cos=[[0.1]] * 5,
                              model_version=version)  # fmt: skip
            for i in range(5, 9):
                repo.record_item_failure(s, job_id=job_id, batch_no=0, idx=i, code="poison", message=f"bad {i}")
        seen, cursor, pages = [], None, 0
        while True:
            page = api.get(
                f"/v1/jobs/{job_id}/results", params={"limit": 100, **({"cursor": cursor} if cursor else {})}
            )
            assert page.status_code == 200 and len(page.content) < 16 * 1024 + 2048
            body = page.json()
            seen += [r["index"] for r in body["results"]]
            pages, cursor = pages + 1, body["next_cursor"]
            if cursor is None:
                break
        assert seen == [0, 1, 2, 3, 4] and pages == 3
        # Exports still carry everything: the 5 scored rows and the 4 failed ones.
        lines = api.get(f"/v1/jobs/{job_id}/results", params={"format": "jsonl"}).text.splitlines()
        assert [json.loads(x)["index"] for x in lines] == list(range(9))

        first = api.get(f"/v1/jobs/{job_id}/errors", params={"limit": 3})
        assert [e["index"] for e in first.json()] == [5, 6, 7]
        link = first.headers["link"]
        assert link.endswith('; rel="next"') and "after=7" in link
        rest = api.get(link[1 : link.index(">")])
        assert [e["index"] for e in rest.json()] == [8] and "link" not in rest.headers
        assert len(api.get(f"/v1/jobs/{job_id}/errors").json()) == 4


def test_out_of_range_numbers_and_dates_are_422_not_500(api: TestClient):
    """Found by review: each of these reached the database or datetime arithmetic and answered 500."""
    job_id = api.post("/v1/jobs", json={"items": [GOOD]}).json()["job_id"]
    resp = api.get(f"/v1/jobs/{job_id}/errors", params={"after": 10**20})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "after"
    resp = api.post("/v1/schedules", json={"cron": "0 3 * * *", "min_new_feedback": 10**12})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "min_new_feedback"
    resp = api.delete("/v1/feedback", params={"before": "0001-01-01T00:00:00+01:00"})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "before"


def test_every_export_format_carries_the_same_fields(api: TestClient, db_url: str, tmp_path):
    """JSON Lines, CSV and Parquet carry the same columns in the same order (issue #38, item 5: Parquet lacked
    score_z and percentile, and a scored JSON Lines row lacked the error fields a failed one has), with the same
    values; the results page carries the same fields but the error ones."""
    from sqlalchemy import update

    from rewardq.storage import registry
    from rewardq.storage.db import session_scope
    from rewardq.storage.models import ModelVersion
    from rewardq.storage.score_stats import summarize

    items = [{"id": f"f{i}", "prompt": f"p{i}", "response": f"r{i}"} for i in range(3)]
    job_id = api.post("/v1/jobs", json={"items": items}).json()["job_id"]
    with session_scope(db_url) as s:
        version = s.get(Job, job_id).model_version
        before = registry.score_stats(s, version=version)
        # A worker calibrates a version on first load; here none runs: stats, so score_z and percentile have values.
        registry.set_score_stats(s, version=version, stats=summarize([0.1 * i for i in range(11)], "test"))
        assert registry.score_stats(s, version=version)
    try:
        _same_fields(api, db_url, job_id, version, tmp_path)
    finally:  # the session's database is shared: leave the version as a worker's calibration would find it
        with session_scope(db_url) as s:
            s.execute(update(ModelVersion).where(ModelVersion.version == version).values(score_stats=before))


def _same_fields(api: TestClient, db_url: str, job_id: str, version: str, tmp_path) -> None:
    import csv
    import io
    import math

    import pyarrow.parquet as pq

    from rewardq.client.formats import RESULT_FIELDS, write_parquet
    from rewardq.storage import repository as repo
    from rewardq.storage.db import session_scope

    with session_scope(db_url) as s:
        repo.save_results(s, job_id=job_id, batch_no=0, start_idx=0, scores=[0.4, 0.6], cos=[[0.2], [0.1]],
                          model_version=version)  # fmt: skip
        repo.record_item_failure(s, job_id=job_id, batch_no=0, idx=2, code="poison", message="bad")
    jsonl = api.get(f"/v1/jobs/{job_id}/results", params={"format": "jsonl"}).text
    rows = [json.loads(line) for line in jsonl.splitlines() if line.strip()]
    assert [list(r) for r in rows] == [list(RESULT_FIELDS)] * 3
    assert rows[0]["score_z"] is not None and rows[0]["percentile"] is not None and rows[2]["error_code"] == "poison"
    table = list(csv.DictReader(io.StringIO(api.get(f"/v1/jobs/{job_id}/results", params={"format": "csv"}).text)))
    assert list(table[0]) == list(RESULT_FIELDS) and len(table) == 3
    write_parquet(jsonl.splitlines(), tmp_path / "r.parquet")
    parquet = pq.read_table(tmp_path / "r.parquet")
    assert parquet.column_names == list(RESULT_FIELDS)
    got = parquet.to_pylist()
    for row, cells, pq_row in zip(rows, table, got, strict=True):
        for name in ("score", "score_z", "percentile"):
            if row[name] is None:
                assert cells[name] == "" and pq_row[name] is None
            else:
                assert math.isclose(float(cells[name]), row[name]) and math.isclose(pq_row[name], row[name])
        assert cells["error_code"] == (row["error_code"] or "") and pq_row["error_code"] == row["error_code"]
    page = api.get(f"/v1/jobs/{job_id}/results").json()["results"]
    assert [list(r) for r in page] == [[f for f in RESULT_FIELDS if not f.startswith("error")]] * 2
    assert [(r["score_z"], r["percentile"]) for r in page] == [(r["score_z"], r["percentile"]) for r in rows[:2]]

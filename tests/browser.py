"""Headless Chromium driven over the Chrome DevTools protocol, for tests that look at what a real browser
renders (the Prefect UI is a JavaScript app: its pages exist only after the browser has run it).

No new dependency: Chromium is the Debian package `chromium` (`.ci/run` installs it), the protocol client
is `websockets`' sync client, which Prefect already requires. One browser, one page:

    with Chromium(profile_dir) as browser:
        browser.navigate("http://127.0.0.1:4200/runs")
        text = browser.wait_for("document.body.innerText.includes('Completed') && document.body.innerText")
        browser.screenshot(path)
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium executable on PATH (CHROMIUM names one explicitly), or None."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


class BrowserError(AssertionError):
    """The browser did not start, answered a protocol error, or a page never got where a test waited for."""


# Loopback only, never through a proxy the environment may name.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Chromium:
    """`chromium --headless=new` with a throwaway profile, its DevTools port on 127.0.0.1, and one page."""

    def __init__(self, profile_dir: Path, *, executable: str | None = None, width: int = 1440,
                 height: int = 1100) -> None:
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError("no Chromium found (apt-get install chromium)")
        self.profile_dir = Path(profile_dir)
        self.size = (width, height)
        self.process: subprocess.Popen | None = None
        self._ws: Any = None
        self._next_id = 0
        self.console: list[str] = []  # the page's console errors and uncaught exceptions, for failure messages

    # ---- lifetime ---------------------------------------------------------------------------------

    def __enter__(self) -> Chromium:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self, timeout_s: float = 60.0) -> None:
        from websockets.sync.client import connect

        self.profile_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.profile_dir / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        log = open(self.profile_dir / "chromium.log", "wb")  # noqa: SIM115 - closed with the process
        command = [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                   f"--user-data-dir={self.profile_dir}", f"--window-size={self.size[0]},{self.size[1]}",
                   "about:blank"]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BrowserError(f"Chromium did not open its DevTools port: {self.log_tail()}")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with _NO_PROXY.open(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.load(response)
        page = next(target for target in targets if target.get("type") == "page")
        self._ws = connect(page["webSocketDebuggerUrl"], max_size=None, proxy=None, open_timeout=20)
        for domain in ("Page.enable", "Runtime.enable"):
            self.call(domain)
        self.call("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                  deviceScaleFactor=1, mobile=False)

    def close(self) -> None:
        if self._ws is not None:
            try:
                self.call("Browser.close", timeout_s=5)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            try:
                self._ws.close()
            except Exception:  # noqa: BLE001
                pass
            self._ws = None
        if self.process is not None:
            for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                if self.process.poll() is not None:
                    break
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    pass
            try:  # Chromium's helpers (zygote, renderers) share its process group
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process = None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.profile_dir / "chromium.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # ---- the protocol -----------------------------------------------------------------------------

    def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are noted or dropped."""
        self._next_id += 1
        request_id = self._next_id
        self._ws.send(json.dumps({"id": request_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"{method}: no answer within {timeout_s:.0f} s")
            try:
                message = json.loads(self._ws.recv(timeout=remaining))
            except TimeoutError:
                continue
            if message.get("id") == request_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._note_event(message)

    def _note_event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append("exception: " + str(details.get("exception", {}).get("description")
                                                   or details.get("text"))[:300])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            self.console.append(f"console.{params['type']}: {args[:300]}")

    def navigate(self, url: str) -> None:
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited; JSON-serialisable values)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 90.0, interval_s: float = 0.5) -> Any:
        """Evaluate `expression` until it is truthy and return that value; BrowserError (with the page's
        text and console errors) after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = self.evaluate(expression)
            except BrowserError:  # the page is between documents, or the app not loaded yet
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"waited {timeout_s:.0f} s for: {expression[:200]}\n{self.describe()}")
            time.sleep(interval_s)

    def text(self) -> str:
        """What the page shows as text (`document.body.innerText`)."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def describe(self) -> str:
        """The page's URL, visible text and console errors, for a failure message."""
        try:
            url, text = self.evaluate("location.href"), self.text()
        except BrowserError as err:
            url, text = "?", f"(no text: {err})"
        errors = "\n".join(self.console[-10:]) or "(none)"
        return f"page {url}\n--- text ---\n{text[:3000]}\n--- console errors ---\n{errors}"

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (not only the window) at `path`."""
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics.get("contentSize") or {}
        width = max(int(size.get("width", self.size[0])), self.size[0])
        height = min(max(int(size.get("height", self.size[1])), self.size[1]), 8000)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


# ---- reading the Prefect UI's pages (both of Prefect 3.9's UIs: V1 at /, V2 at /v2) -------------------

PREFECT_STATES = ("Scheduled", "Late", "Resuming", "AwaitingRetry", "AwaitingConcurrencySlot", "Pending", "Paused",
                  "Suspended", "Running", "Retrying", "Completed", "Cached", "Cancelled", "Cancelling", "Crashed",
                  "Failed", "TimedOut")

# A tab of a run page, by its label (V1: <li class="p-tab">, V2: role="tab"); true when one was clicked.
_CLICK_TAB = """(label => {
  const tab = [...document.querySelectorAll('[role=tab], li.p-tab')].find(x => x.innerText.trim() === label);
  if (!tab) return false;
  tab.dispatchEvent(new MouseEvent('mousedown', {bubbles: true}));
  tab.click();
  return true;
})(%s)"""

# Task run name -> the state name shown in its row. A row: the largest element around a task run's link
# that holds no other task run's link; its state: the first line of its text that is a state name.
_TASK_RUN_ROWS = """(states => {
  const rows = {};
  const links = [...document.querySelectorAll('a[href*="/runs/task-run/"]')].filter(a => a.innerText.trim());
  const hrefsIn = el => new Set([...el.querySelectorAll('a[href*="/runs/task-run/"]')]
    .map(a => a.getAttribute('href')));
  for (const link of links) {
    let row = link;
    while (row.parentElement && hrefsIn(row.parentElement).size === 1) row = row.parentElement;
    const lines = row.innerText.split('\\n').map(s => s.trim());
    rows[link.innerText.trim()] = lines.find(line => states.includes(line)) || null;
  }
  return rows;
})(%s)"""

# Artifact key -> {type, href} for the artifact cards of the page (each a link to its artifact page).
_ARTIFACT_CARDS = """(() => {
  const cards = {};
  for (const a of document.querySelectorAll('a[href*="/artifacts/artifact/"]')) {
    const lines = a.innerText.split('\\n').map(s => s.trim()).filter(Boolean);
    const type = lines.find(line => /^[A-Z]+$/.test(line));
    const key = lines.find(line => /^[a-z0-9][a-z0-9-]*$/.test(line));
    if (type && key) cards[key] = {type: type, href: a.getAttribute('href')};
  }
  return cards;
})()"""

# The first rendered <table> with body rows: {header: [...], rows: [[...], ...]} (cell texts).
_TABLE = """(() => {
  const table = [...document.querySelectorAll('table')].find(t => t.querySelectorAll('tbody tr').length);
  if (!table) return null;
  const cells = tr => [...tr.querySelectorAll('th, td')].map(c => (c.innerText || c.textContent).trim());
  return {header: [...table.querySelectorAll('thead tr')].map(cells)[0] || [],
          rows: [...table.querySelectorAll('tbody tr')].map(cells)};
})()"""


def open_tab(browser: Chromium, label: str, timeout_s: float = 90.0) -> None:
    """Click a run page's tab once the page shows it."""
    browser.wait_for(_CLICK_TAB % json.dumps(label), timeout_s)


def task_run_states(browser: Chromium, names: list[str], timeout_s: float = 90.0) -> dict[str, str | None]:
    """On a flow run's Task Runs tab: the state each named task run's row shows, once every name has a row
    with a state (BrowserError naming what the page shows otherwise)."""
    expression = _TASK_RUN_ROWS % json.dumps(list(PREFECT_STATES))
    wanted = json.dumps(names)
    browser.wait_for(f"(rows => {wanted}.every(name => rows[name]))({expression})", timeout_s)
    return browser.evaluate(expression)


def artifact_cards(browser: Chromium, keys: list[str], timeout_s: float = 90.0) -> dict[str, dict[str, str]]:
    """On a flow run's Artifacts tab: key -> {type, href} once every key in `keys` has a card."""
    wanted = json.dumps(keys)
    browser.wait_for(f"(cards => {wanted}.every(key => cards[key]))({_ARTIFACT_CARDS})", timeout_s)
    return browser.evaluate(_ARTIFACT_CARDS)


def rendered_table(browser: Chromium, timeout_s: float = 90.0) -> dict[str, list]:
    """On a table artifact's page: the header and the body rows of the table it renders."""
    return browser.wait_for(_TABLE, timeout_s)

"""A real browser for tests: headless Chromium (Debian's ``chromium`` package) driven over the Chrome
DevTools protocol on a pipe (``--remote-debugging-pipe``: commands on the child's fd 3, replies on
its fd 4, each a JSON message ended by a NUL byte), so no port, no websocket library and no
download are needed.

``open_page(path)`` loads a local HTML file, waits for it and for its media's metadata, and returns
what a person would check: the section ids, whether every image decoded, whether every audio
player read its file, a full-page screenshot, and every console error, uncaught exception and
failed or blocked load the browser logged.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# What the brief asks for a root, display-less, network-quiet browser.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe",
)  # fmt: skip
COMMAND_FD, REPLY_FD = 3, 4  # where Chromium's pipe mode reads commands and writes replies
FIRST_FREE_FD = 10  # the pipes are first copied above the standard and pipe descriptors
TIMEOUT_S = 60.0
WIDTH, HEIGHT = 1400, 900
# Runs in the page once it has loaded: waits (at most 10 s) for every audio element's metadata.
INSPECT = """(async () => {
  const audio = [...document.querySelectorAll('audio')];
  await Promise.all(audio.map(a => a.readyState >= 1 ? null : new Promise(done => {
    a.addEventListener('loadedmetadata', done); a.addEventListener('error', done); setTimeout(done, 10000); })));
  return JSON.stringify({
    title: document.title,
    sections: [...document.querySelectorAll('section')].map(s => s.id),
    images: [...document.images].map(i => ({alt: i.alt, decoded: i.complete && i.naturalWidth > 0})),
    audio: audio.map(a => ({ready: a.readyState, error: a.error ? a.error.code : null, duration: a.duration})),
    scripts: document.scripts.length,
    height: document.documentElement.scrollHeight,
  });
})()"""


def find_chromium() -> str | None:
    """The browser's executable, or None when none is installed."""
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


@dataclasses.dataclass(frozen=True)
class Page:
    """What the browser saw.

    Attributes:
        title: the document title.
        sections: the ids of the ``<section>`` elements, in order.
        images: per ``<img>``, its alt text and whether it decoded (loaded, non-zero width).
        audio: per ``<audio>``, its readyState, error code (None: no error) and duration.
        scripts: how many ``<script>`` elements the page has.
        height: the page's full height in CSS pixels.
        screenshot: the full page as PNG bytes.
        errors: console errors, uncaught exceptions and failed or blocked loads, as text.
    """

    title: str
    sections: list[str]
    images: list[dict[str, Any]]
    audio: list[dict[str, Any]]
    scripts: int
    height: int
    screenshot: bytes
    errors: list[str]


class DevTools:
    """One Chromium process and its DevTools pipe."""

    def __init__(self, executable: str, profile: str) -> None:
        command_read, self._write = os.pipe()
        self._read, reply_write = os.pipe()

        def wire() -> None:  # in the child: the pipe ends onto fds 3 and 4
            for source, target in ((command_read, COMMAND_FD), (reply_write, REPLY_FD)):
                os.dup2(fcntl.fcntl(source, fcntl.F_DUPFD, FIRST_FREE_FD), target)

        args = [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        self.process = subprocess.Popen(
            args, pass_fds=(COMMAND_FD, REPLY_FD), preexec_fn=wire, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(command_read)
        os.close(reply_write)
        self._buffer, self._next_id, self.events = b"", 0, []

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and return its result; events that arrive meanwhile go to ``events``."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str) -> dict:
        """The first ``event`` (already received or next to come)."""
        for seen in self.events:
            if seen.get("method") == event:
                return seen
        while True:
            message = self._receive()
            self.events.append(message)
            if message.get("method") == event:
                return message

    def _receive(self) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise TimeoutError(f"Chromium sent nothing for {TIMEOUT_S:.0f} s (exit code {self.process.poll()})")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed its DevTools pipe (exit code {self.process.wait()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._write)
        os.close(self._read)


def open_page(path: str | Path, executable: str) -> Page:
    """Load the local file ``path`` in headless Chromium and inspect it (see ``Page``)."""
    with tempfile.TemporaryDirectory() as profile:
        browser = DevTools(executable, profile)
        try:
            return _inspect(browser, Path(path).resolve())
        finally:
            browser.close()


def _inspect(browser: DevTools, path: Path) -> Page:
    target = next(t for t in browser.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
    session = browser.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.call(f"{domain}.enable", session=session)
    browser.call("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session)
    browser.call("Page.navigate", {"url": path.as_uri()}, session)
    browser.wait_for("Page.loadEventFired")
    found = browser.call("Runtime.evaluate", {"expression": INSPECT, "awaitPromise": True, "returnByValue": True}, session)
    if "exceptionDetails" in found:
        raise RuntimeError(f"inspecting the page failed: {found['exceptionDetails']}")
    seen = json.loads(found["result"]["value"])
    shot = browser.call(
        "Page.captureScreenshot",
        {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": WIDTH, "height": seen["height"], "scale": 1}},
        session,
    )
    return Page(
        seen["title"], seen["sections"], seen["images"], seen["audio"], seen["scripts"], seen["height"],
        base64.b64decode(shot["data"]), _errors(browser.events),
    )  # fmt: skip


def _errors(events: list[dict]) -> list[str]:
    """Console errors, exceptions, error log entries (CSP blocks, failed loads) and failed requests."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
        elif method == "Network.loadingFailed":
            errors.append(f"load failed: {params.get('errorText')} {params.get('blockedReason', '')}")
    return errors

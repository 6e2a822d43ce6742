"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol, for the
softphone tests. No browser is downloaded and no node is needed.

The protocol runs over a pipe (`--remote-debugging-pipe`: JSON messages ending in NUL,
commands on fd 3, replies and events on fd 4), so the driver opens no socket and works
across a network namespace: Chromium runs inside the test's namespace (`NetNs.popen`),
the driver stays outside. A fake microphone plays a WAV file the test wrote.

    with Chromium(ns, tmp_path, fake_audio=wav) as browser:
        page = browser.open(url)
        page.click("#call")                       # a real (trusted) mouse click
        page.wait_for("softphone.state === 'in-call'", timeout=20)
        page.evaluate("softphone.callId")
        page.screenshot(path)

Every wait is bounded; `close()` kills Chromium by PID (and the namespace removes
whatever it left).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .netns import NetNs

__all__ = ["Chromium", "Page", "BrowserError", "chromium_binary"]

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--use-fake-ui-for-media-stream",
                  "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-gpu", "--mute-audio", "--disable-features=Translate,MediaRouter",
                  "--no-default-browser-check", "--password-store=basic")
_COMMAND_TIMEOUT = 30.0
_POLL = 0.05  # seconds between condition checks in wait_for (the deadline bounds it)


class BrowserError(RuntimeError):
    """Chromium failed, a command failed, or a wait ran out; says which."""


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    def __init__(self, ns: NetNs, workdir: Path, *, fake_audio: Path | None = None,
                 fake_devices: bool = True, window: tuple[int, int] = (600, 740)) -> None:
        binary = chromium_binary()
        if binary is None:
            raise BrowserError("chromium is not installed: apt-get install chromium "
                               "(scripts/system-packages.txt lists it)")
        self._ns = ns
        self.profile = workdir / f"chromium-profile-{os.getpid()}-{time.monotonic_ns()}"
        self.profile.mkdir(parents=True)
        self.log_path = workdir / "chromium.log"
        args = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
                f"--window-size={window[0]},{window[1]}"]
        if fake_devices:  # without: a machine with no sound card has no microphone at all
            args.append("--use-fake-device-for-media-stream")
        if fake_audio is not None:
            args.append(f"--use-file-for-fake-audio-capture={fake_audio}")
        args.append("about:blank")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Chromium wants the pipe on fds 3 (commands in) and 4 (replies out).
        log = open(self.log_path, "wb")
        try:
            self.proc = ns.popen(args, stdout=log, stderr=subprocess.STDOUT,
                                 pass_fds=(3, 4), preexec_fn=_dup_to(to_browser_r, from_browser_w))
        finally:
            log.close()
            os.close(to_browser_r)
            os.close(from_browser_w)
        self._lock = threading.Lock()
        self._next_id = 0
        self._pending: dict[int, dict] = {}
        self._cond = threading.Condition()
        self.console: list[str] = []
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()
        self.command("Browser.getVersion")

    # ---- protocol -------------------------------------------------------------------

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                message = json.loads(raw)
                with self._cond:
                    if "id" in message:
                        self._pending[message["id"]] = message
                        self._cond.notify_all()
                    elif message.get("method") == "Runtime.consoleAPICalled":
                        params = message["params"]
                        text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
                        self.console.append(f"{params['type']}: {text}")
                    elif message.get("method") == "Runtime.exceptionThrown":
                        self.console.append("exception: " + json.dumps(message["params"]["exceptionDetails"])[:500])

    def command(self, method: str, params: dict | None = None, session: str | None = None,
                timeout: float = _COMMAND_TIMEOUT) -> dict:
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
            if session:
                message["sessionId"] = session
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._pending:
                if self._closed:
                    raise BrowserError(f"chromium exited during {method}: {self.log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError(f"{method}: no reply within {timeout} s")
                self._cond.wait(left)
            reply = self._pending.pop(ident)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    # ---- pages ----------------------------------------------------------------------

    def open(self, url: str) -> "Page":
        target = self.command("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.command("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.command("Page.enable")
        page.command("Runtime.enable")
        page.navigate(url)
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("Browser.close", timeout=5)
            except BrowserError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._ns.kill(self.proc)
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dup_to(read_fd: int, write_fd: int):
    def child() -> None:  # runs in the child between fork and exec
        high_r, high_w = os.dup(read_fd), os.dup(write_fd)  # either may be 3 or 4 itself
        high_r, high_w = os.dup2(high_r, 100), os.dup2(high_w, 101)
        os.dup2(high_r, 3)
        os.dup2(high_w, 4)
    return child


class Page:
    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session

    def command(self, method: str, params: dict | None = None, timeout: float = _COMMAND_TIMEOUT) -> dict:
        return self.browser.command(method, params, self.session, timeout)

    def navigate(self, url: str, timeout: float = 20.0) -> None:
        self.command("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && typeof window.softphone === 'object'", timeout)

    def evaluate(self, expression: str, *, await_promise: bool = False, timeout: float = _COMMAND_TIMEOUT) -> Any:
        result = self.command("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": await_promise}, timeout)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {json.dumps(result['exceptionDetails'])[:500]}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> Any:
        """Poll a JavaScript condition until it is truthy (its value is returned); raise
        BrowserError with the page's console when the bounded time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"waited {timeout} s for {expression!r}; page console:\n" +
                                   "\n".join(self.browser.console[-20:]))
            time.sleep(_POLL)

    def click(self, selector: str) -> None:
        """A trusted mouse click in the middle of the element (a user gesture: it may
        start audio and ask for the microphone)."""
        box = self.evaluate(f"""(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2]; }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.command("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                      "clickCount": 1})

    def screenshot(self, path: Path) -> None:
        data = self.command("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))

"""Drive the course's notebooks through JupyterLab in headless Chromium, as a learner would.

`JupyterLab` starts a server on a scratch copy of `notebooks/` (so neither autosave nor the
test's own save ever writes outputs into the committed notebooks), offline, on the reference
solutions, in quick mode. `run_notebook` opens one notebook in a browser page, clicks
Run > Run All Cells, waits for the kernel, saves the scratch copy, and returns what the page
showed: execution counts, error outputs, check results, figures, circuitsvis pictures, and
every request the page made. The tests in `test_notebooks_in_browser.py` judge it.

Playwright comes from PyPI (the `browser` extra); its own browser download needs the internet,
so it drives the operating system's Chromium (`chromium` on Debian/Ubuntu).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
SCREENSHOTS = REPO / "runs" / "browser"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SERVER_START_TIMEOUT_S = 120
NOTEBOOK_TIMEOUT_S = 600  # one notebook, quick mode, from opening it to idle
# circuitsvis' container: visuals.offline() keeps circuitsvis' own id scheme
CIRCUITSVIS_CONTAINER = 'div[id^="circuits-vis-"]'
CHECK_CALL = re.compile(r"""\bcheck\(\s*((?:["'][^"']+["']\s*,?\s*)+)\)""")
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\w*(Error|Exception)\b", re.M)

# What JupyterLab would otherwise do on its own: autosave into the notebook, fetch news,
# and draw only the cells in view (then the page would not hold every output to inspect).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


class BrowserMissing(RuntimeError):
    """No Chromium to drive: the browser test cannot run (and must not pass)."""


def find_chromium() -> str:
    """The system Chromium: $GPT2_COURSE_CHROMIUM, else the first of CHROMIUM_NAMES on PATH."""
    given = os.environ.get("GPT2_COURSE_CHROMIUM")
    if given:
        if not (Path(given).is_file() and os.access(given, os.X_OK)):
            raise BrowserMissing(f"GPT2_COURSE_CHROMIUM={given} is not an executable file")
        return given
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserMissing(
        "no Chromium found (looked for "
        + ", ".join(CHROMIUM_NAMES)
        + "). Install it from the OS packages (Debian/Ubuntu, as root: "
        "`apt-get install chromium`; `make test-browser` does this when it runs as root) "
        "or point GPT2_COURSE_CHROMIUM at a Chromium or Chrome executable. Playwright's own "
        "browser download is not used: it needs the internet."
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JupyterLab:
    """A JupyterLab server on a scratch copy of the notebooks; a context manager."""

    def __init__(self, notebooks: list[Path]):
        self.scratch = Path(tempfile.mkdtemp(prefix="gpt2-course-browser-"))
        self.root = self.scratch / "notebooks"
        self.root.mkdir()
        for notebook in notebooks:
            shutil.copy2(notebook, self.root / notebook.name)
        self.port = free_port()
        self.token = os.urandom(16).hex()
        self.log_path = self.scratch / "jupyter.log"
        self.process: subprocess.Popen | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MPLBACKEND", None)  # the notebooks draw inline, as for a learner
        settings = self.scratch / "lab-settings"
        for plugin, values in LAB_SETTINGS.items():
            path = settings / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env.update(
            GPT2_COURSE_SOLUTIONS="1",
            GPT2_COURSE_QUICK="1",
            GPT2_COURSE_OFFLINE="1",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(self.scratch / "lab-workspaces"),
            JUPYTER_RUNTIME_DIR=str(self.scratch / "runtime"),
            JUPYTER_CONFIG_DIR=str(self.scratch / "config"),
            IPYTHONDIR=str(self.scratch / "ipython"),
        )
        return env

    def __enter__(self) -> JupyterLab:
        command = [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--LabApp.news_url=",  # no news fetched by the server either
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-root")  # CI containers run as root
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, env=self.environment(), stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited at start:\n{self.log_tail()}")
            try:
                self.api("GET", "status")
                return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"JupyterLab did not answer in {SERVER_START_TIMEOUT_S} s")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def api(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            f"{self.origin}/api/{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def kernel_of(self, notebook: str) -> dict | None:
        """The kernel of `notebook`'s session, as the server reports it (None: no session yet)."""
        for session in self.api("GET", "sessions"):
            if session["path"] == notebook and session.get("kernel"):
                return session["kernel"]
        return None

    def shut_down(self, notebook: str) -> None:
        for session in self.api("GET", "sessions"):
            if session["path"] == notebook:
                self.api("DELETE", f"sessions/{session['id']}")

    def url(self, notebook: str) -> str:
        # /doc: JupyterLab's single-document view (no side panels), what the screenshot shows
        return f"{self.origin}/doc/tree/{notebook}?token={self.token}&reset"


@dataclass
class CodeCell:
    source: str
    execution_count: int | None
    outputs: list[dict]  # from the saved notebook
    prompt: str  # the "[n]:" the page shows
    text: str  # the text of the cell's outputs on the page
    stderr: str  # the part of it in stderr areas: warnings are fine, tracebacks are not


@dataclass
class NotebookRun:
    name: str
    seconds: float
    cells: list[CodeCell]
    images: list[dict]  # every output <img>: natural size
    pictures: list[dict]  # every circuitsvis container: what it drew
    requests: list[str]  # every URL the page asked for
    page_errors: list[str]
    screenshot: Path
    origin: str

    def foreign_requests(self) -> list[str]:
        """What the page asked of any host but the Jupyter server."""
        return [url for url in self.requests if not is_local(url, self.origin)]


def is_local(url: str, origin: str) -> bool:
    """Served by the Jupyter server at `origin`, or never on the network (data:, blob:)."""
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob") or parts.netloc == urlsplit(origin).netloc


def chromium_args() -> list[str]:
    args = ["--disable-background-networking", "--disable-component-update", "--no-first-run"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to start as root with its sandbox
    return args


class NotebookPage:
    """One notebook in its own browser page: start() clicks Run All, finish() reads the page."""

    def __init__(self, browser: Any, lab: JupyterLab, notebook: Path):
        self.lab, self.notebook, self.name = lab, notebook, notebook.name
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.requests: list[str] = []
        self.page_errors: list[str] = []
        self.context.on("request", lambda request: self.requests.append(request.url))
        # recorded above, then stopped here: a test run never reaches the internet
        self.context.route(
            re.compile(r"^(?!data:|blob:)"),
            lambda route: (
                route.continue_()
                if is_local(route.request.url, lab.origin)
                else route.abort("blockedbyclient")
            ),
        )
        self.page = self.context.new_page()
        self.page.on("websocket", lambda socket: self.requests.append(socket.url))
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        self.started_at = time.monotonic()
        self.seconds = 0.0
        self.begun = False  # a prompt has left "[ ]:": Run All is under way
        self.calm_since: float | None = None

    def pause(self, seconds: float) -> None:
        # Playwright's sync API answers the routes above only while it is called: never sleep
        self.page.wait_for_timeout(seconds * 1000)

    def start(self) -> None:
        self.page.goto(self.lab.url(self.name))
        self.page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        deadline = time.monotonic() + 60  # Run All before the kernel connects runs nothing
        while not self._kernel_ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no kernel after 60 s:\n{self.lab.log_tail()}")
            self.pause(0.5)
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

    def _kernel_ready(self) -> bool:
        kernel = self.lab.kernel_of(self.name)
        return bool(kernel and kernel["execution_state"] == "idle" and kernel["connections"])

    def done(self) -> bool:
        """No cell queued or running, and the kernel idle for a few seconds."""
        if time.monotonic() - self.started_at > NOTEBOOK_TIMEOUT_S:
            raise TimeoutError(f"{self.name} was still running after {NOTEBOOK_TIMEOUT_S} s")
        prompts = self.page.eval_on_selector_all(
            ".jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.textContent.trim())"
        )
        self.begun = self.begun or any(p not in ("", "[ ]:") for p in prompts)
        kernel = self.lab.kernel_of(self.name)
        busy = kernel is None or kernel["execution_state"] != "idle"
        if busy or not self.begun or any("*" in p for p in prompts):
            self.calm_since = None
            return False
        if self.calm_since is None:
            self.calm_since = time.monotonic()
            self.seconds = self.calm_since - self.started_at
        return time.monotonic() - self.calm_since > 3

    def finish(self, shots: Path) -> NotebookRun:
        """Save the scratch copy, read the page, take the screenshot, close the page."""
        saved = self._save_and_read()
        on_page = self.page.eval_on_selector_all(
            ".jp-Notebook .jp-CodeCell",
            """cells => cells.map(cell => ({
                prompt: (cell.querySelector('.jp-InputPrompt') || {}).textContent || '',
                text: Array.from(cell.querySelectorAll('.jp-OutputArea-output'))
                           .map(o => o.innerText).join('\\n'),
                stderr: Array.from(cell.querySelectorAll(
                    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
                           .map(o => o.innerText).join('\\n'),
            }))""",
        )
        images = self.page.eval_on_selector_all(
            ".jp-OutputArea .jp-RenderedImage img",  # figures (image/png outputs)
            """imgs => imgs.map(img => ({complete: img.complete,
                width: img.naturalWidth, height: img.naturalHeight}))""",
        )
        pictures = self.page.eval_on_selector_all(
            CIRCUITSVIS_CONTAINER,
            """divs => divs.map(div => {
                const box = div.getBoundingClientRect();
                return {id: div.id, elements: div.querySelectorAll('*').length,
                        drawn: div.querySelectorAll('svg, canvas, table, img').length,
                        width: box.width, height: box.height,
                        text: div.innerText.slice(0, 200)};
            })""",
        )
        shot = shots / f"{self.notebook.stem}.png"
        _full_screenshot(self.page, shot)
        code = [cell for cell in saved["cells"] if cell["cell_type"] == "code"]
        if len(code) != len(on_page):
            raise AssertionError(
                f"{self.name}: {len(code)} code cells saved but {len(on_page)} on the page"
            )
        cells = [
            CodeCell(
                source="".join(cell["source"]),
                execution_count=cell.get("execution_count"),
                outputs=cell.get("outputs", []),
                prompt=shown["prompt"].strip(),
                text=shown["text"],
                stderr=shown["stderr"],
            )
            for cell, shown in zip(code, on_page, strict=True)
        ]
        return NotebookRun(
            self.notebook.stem,
            self.seconds,
            cells,
            images,
            pictures,
            list(self.requests),
            list(self.page_errors),
            shot,
            self.lab.origin,
        )

    def _save_and_read(self) -> dict:
        path = self.lab.root / self.name
        before = path.stat().st_mtime_ns
        self.page.keyboard.press("Control+s")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if path.stat().st_mtime_ns != before:
                self.pause(0.5)  # the write may still be under way
                return json.loads(path.read_text(encoding="utf-8"))
            self.pause(0.25)
        raise TimeoutError(f"JupyterLab did not save {self.name}")

    def close(self, shots: Path, failed: bool) -> None:
        if failed:  # what the page showed when it went wrong (a dialog, a stuck cell)
            shot = shots / f"{self.notebook.stem}-FAILED.png"
            shots.mkdir(parents=True, exist_ok=True)
            try:
                self.page.screenshot(path=str(shot))
                print(f"screenshot of the failure: {shot}")
            except Exception as error:  # the page may be gone; the first error matters
                print(f"no screenshot of the failure: {error}")
        self.context.close()
        self.lab.shut_down(self.name)


def run_notebooks(
    browser: Any, lab: JupyterLab, notebooks: list[Path], shots: Path, jobs: int = 1
) -> dict[str, NotebookRun | Exception]:
    """Each notebook in its own page, `jobs` at a time; a failure is returned, not raised."""
    results: dict[str, NotebookRun | Exception] = {}
    waiting = list(notebooks)
    running: list[NotebookPage] = []
    while waiting or running:
        while waiting and len(running) < jobs:
            notebook = waiting.pop(0)
            page = NotebookPage(browser, lab, notebook)
            try:
                page.start()
                running.append(page)
            except Exception as error:
                page.close(shots, failed=True)
                results[notebook.stem] = error
        for page in list(running):
            try:
                if not page.done():
                    continue
                results[page.notebook.stem] = page.finish(shots)
                page.close(shots, failed=False)
            except Exception as error:
                page.close(shots, failed=True)
                results[page.notebook.stem] = error
            running.remove(page)
        if running:
            running[0].pause(1)
    return results


def run_notebook(browser: Any, lab: JupyterLab, notebook: Path, shots: Path) -> NotebookRun:
    """Open `notebook` in a fresh page, Run All Cells, and record what the page shows."""
    result = run_notebooks(browser, lab, [notebook], shots)[notebook.stem]
    if isinstance(result, Exception):
        raise result
    return result


def _full_screenshot(page: Any, path: Path) -> None:
    """The whole notebook: JupyterLab scrolls inside a panel, so grow the viewport to fit it."""
    height = page.evaluate(
        """() => {
            const panel = document.querySelector('.jp-WindowedPanel-outer');
            const cells = document.querySelectorAll('.jp-Notebook .jp-Cell');
            if (!panel || !cells.length) return document.body.scrollHeight;
            const top = panel.getBoundingClientRect().top;
            const end = cells[cells.length - 1].getBoundingClientRect().bottom;
            const below = window.innerHeight - panel.getBoundingClientRect().bottom;
            return top + (end - top + panel.scrollTop) + 40 + below;
        }"""
    )
    page.set_viewport_size({"width": 1400, "height": int(min(max(height, 1000), 30000))})
    page.evaluate(
        "() => document.querySelectorAll('.jp-WindowedPanel-outer').forEach(p => p.scrollTop = 0)"
    )
    page.wait_for_timeout(500)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)


# ------------------------------------------------------------------ what a run must show


def check_ids(source: str) -> list[str]:
    """The ids a cell checks: `check("a.B")`, `check("a.B", "c.D")`."""
    ids: list[str] = []
    for match in CHECK_CALL.finditer(source):
        ids += re.findall(r"""["']([^"']+)["']""", match.group(1))
    return ids


def problems(run: NotebookRun) -> list[str]:
    """Everything wrong with a run, each said so that the failure needs no debugger."""
    found: list[str] = []
    for number, cell in enumerate(run.cells, start=1):
        first_line = cell.source.strip().splitlines()[0][:60] if cell.source.strip() else ""
        where = f"code cell {number} ({first_line!r})"
        if cell.execution_count is None or not re.fullmatch(r"\[\d+\]:", cell.prompt):
            found.append(f"{where} did not run (prompt {cell.prompt or 'empty'!r})")
        for output in cell.outputs:
            if output.get("output_type") == "error":
                found.append(f"{where} raised {output.get('ename')}: {output.get('evalue')}")
        if TRACEBACK.search(cell.stderr) and not any(
            o.get("output_type") == "error" for o in cell.outputs
        ):
            found.append(f"{where} shows a traceback on the page: {cell.stderr[:300]!r}")
        for check_id in check_ids(cell.source):
            if f"{check_id}: passed" not in cell.text:
                shown = cell.text.strip()[:300] or "nothing"
                found.append(f"{where}: check {check_id!r} does not show its pass; page: {shown!r}")
    saved_images = sum("image/png" in o.get("data", {}) for c in run.cells for o in c.outputs)
    drawn = [image for image in run.images if image["complete"] and image["width"] > 0]
    if len(drawn) != saved_images or len(run.images) != saved_images:
        found.append(
            f"{saved_images} figures in the outputs but {len(drawn)} of {len(run.images)} "
            "<img> elements on the page have a natural size"
        )
    expected = sum(
        "CircuitsVis.render(" in "".join(o.get("data", {}).get("text/html", ""))
        for c in run.cells
        for o in c.outputs
    )
    if len(run.pictures) != expected:
        found.append(f"{expected} circuitsvis pictures in the outputs, {len(run.pictures)} on page")
    for picture in run.pictures:
        if picture["drawn"] == 0 or picture["height"] < 20 or picture["width"] < 20:
            found.append(f"circuitsvis picture {picture['id']} drew nothing: {picture}")
    foreign = run.foreign_requests()
    if foreign:
        found.append(
            f"the page made {len(foreign)} request(s) to hosts other than {run.origin}: "
            + ", ".join(sorted(set(foreign))[:20])
        )
    for error in run.page_errors:
        found.append(f"JavaScript error on the page: {error[:300]}")
    return found

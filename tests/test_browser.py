"""What a person sees, in a real browser: headless Chromium (Debian's ``chromium``) driven over the DevTools
protocol with aiohttp's websocket client (installed with mlflow). The report's ``pareto.html`` opened from
disk draws one point per trial without a JavaScript error; an ``mlflow server``'s UI shows a sweep's parent
run on the experiment's runs table with its trials nested under it. Screenshots are left in the test's tmp dir.

Skipped, saying why, only when ``chromium`` is missing and ``SGEXP_REQUIRE_BROWSER`` is unset (CI installs it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from conftest import mlflow_server
from optuna.trial import TrialState
from PIL import Image
from test_sweep_report import make_study, synthetic_specs

from sgexp.sweeps import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("SGEXP_REQUIRE_BROWSER"):
    pytest.skip("no chromium on PATH (apt-get install -y chromium; .ci/run installs it)", allow_module_level=True)


class Chromium:
    """One headless Chromium and its first tab; ``visit`` loads a URL, waits, evaluates, screenshots."""

    def __init__(self, tmp: Path):
        if CHROMIUM is None:
            raise RuntimeError("SGEXP_REQUIRE_BROWSER is set but there is no chromium on PATH")
        flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
        flags += ["--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1400,900"]
        args = [CHROMIUM, *flags, f"--user-data-dir={tmp / 'profile'}", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port, deadline = None, time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = int(found.group(1)) if found else None
            if not line and self.proc.poll() is not None:
                break
        if port is None:
            self.close()
            raise RuntimeError(f"chromium did not start (rc={self.proc.poll()})")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            self.page = next(t["webSocketDebuggerUrl"] for t in json.load(response) if t["type"] == "page")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def visit(self, url: str, ready: str, script: str, screenshot: Path, timeout: float = 90) -> tuple:
        """Load ``url``, wait until the JS expression ``ready`` is true, then return (value of ``script``,
        JavaScript errors: uncaught exceptions, console.error, failed loads) and write a PNG."""
        return asyncio.run(self._visit(url, ready, script, screenshot, timeout))

    async def _visit(self, url: str, ready: str, script: str, screenshot: Path, timeout: float) -> tuple:
        errors, calls = [], iter(range(1, 10**6))

        def note(event: dict) -> None:
            method, p = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = p["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text"))
            elif method == "Runtime.consoleAPICalled" and p["type"] == "error":
                errors.append(
                    "console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                )
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(f"{p['entry']['source']}: {p['entry']['text']} {p['entry'].get('url', '')}")

        async with aiohttp.ClientSession() as session, session.ws_connect(self.page, max_msg_size=0) as ws:

            async def call(method: str, **params) -> dict:
                ident = next(calls)
                await ws.send_json({"id": ident, "method": method, "params": params})
                while True:
                    message = json.loads((await ws.receive(timeout=timeout)).data)
                    if message.get("id") == ident:
                        if "error" in message:
                            raise RuntimeError(f"{method}: {message['error']}")
                        return message["result"]
                    note(message)

            async def evaluate(expression: str):
                result = await call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
                if "exceptionDetails" in result:
                    raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
                return result["result"].get("value")

            for domain in ("Page", "Runtime", "Log"):
                await call(f"{domain}.enable")
            await call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            while not await evaluate(f"document.readyState === 'complete' && !!({ready})"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url}: not ready ({ready}) after {timeout:g} s; errors: {errors}")
                await asyncio.sleep(0.25)
            value = await evaluate(script)
            shot = await call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            await evaluate("new Promise(r => setTimeout(r, 300))")  # late errors arrive as events meanwhile
        return value, errors


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = Chromium(tmp_path_factory.mktemp("chromium"))
    yield chromium
    chromium.close()


def looks_like_a_page(png: Path) -> None:
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width >= 1000 and image.height >= 600  # the viewport
        assert len(image.convert("L").getcolors(1 << 16) or []) > 10  # not a blank page


# Per plotly trace: its name, how many x values it has and how many marker points the SVG drew, and the trial
# numbers in the hover texts ("trial N: ...").
PLOTTED = """(() => {
  const plot = document.querySelector('.js-plotly-plot');
  const drawn = [...plot.querySelectorAll('.scatterlayer .trace')];
  return plot.data.map((trace, i) => ({
    name: trace.name, mode: trace.mode, n: (trace.x || []).length,
    points: drawn[i].querySelectorAll('path.point').length,
    trials: (trace.hovertext || []).map(h => Number(/^trial (\\d+):/.exec(h)[1])),
  }));
})()"""


def test_pareto_html_draws_one_point_per_trial(browser, tmp_path):
    specs = synthetic_specs()
    study = make_study(specs)
    files = report.write_report(study, tmp_path / "report")
    shot = tmp_path / "pareto_html.png"
    traces, errors = browser.visit(
        files["pareto.html"].resolve().as_uri(),
        "document.querySelector('.js-plotly-plot .scatterlayer')",
        PLOTTED,
        shot,
    )
    assert errors == []
    screening = [t for t in traces if t["mode"] == "markers+text"]  # rescored finals: open markers, no text
    assert screening and all(t["points"] == t["n"] for t in traces if "markers" in t["mode"])
    complete = sorted(i for i, s in enumerate(specs) if s["state"] == TrialState.COMPLETE)
    assert sorted(n for t in screening for n in t["trials"]) == complete  # each COMPLETE trial once
    assert sum(t["points"] for t in screening) == len(complete)
    front = [t for t in traces if t["name"].startswith("Pareto front")]
    assert len(front) == 1 and front[0]["n"] == len(report.pareto_trials(study))
    looks_like_a_page(shot)


# The runs table's rows (run names), after expanding the sweep's parent row so its nested trials show.
RUNS_TABLE = """(async () => {
  const rows = () => [...document.querySelectorAll('[role=row]')];
  const parent = rows().find(r => r.innerText.includes('sweep '));
  const expand = parent.querySelector('button');
  if (expand) expand.click();
  const shown = () => document.body.innerText.includes('/trial-0001');
  for (let i = 0; i < 40 && !shown(); i++) await new Promise(r => setTimeout(r, 250));
  return {url: location.href, rows: rows().map(r => r.innerText.replace(/\\s+/g, ' ').trim()).filter(Boolean)};
})()"""


def test_mlflow_ui_lands_on_the_sweeps_runs_table(browser, tmp_path):
    """A sweep's parent and trial runs as the sweep tracker makes them, seen on an mlflow server's UI from the
    link sgexp prints (``tracking.ui_url``)."""
    import optuna

    from sgexp import tracking
    from sgexp.sweeps.study import load_study
    from sgexp.sweeps.tracker import Tracker

    (tmp_path / "server").mkdir()
    with mlflow_server(tmp_path / "server") as server:
        cfg = load_study("sparsity_pareto", [f"paths.root={tmp_path}", "logger.experiment=sweeps-ui"])
        study = optuna.create_study(study_name=cfg.name, directions=["minimize"] * 2)
        storage = str(tmp_path / "optuna" / "sparsity_pareto.log")
        tracker = Tracker.open_parent(study, cfg, server["uri"], {"checkpoint": "x.ckpt", "storage": storage})
        for number in range(2):
            child = tracker.start_child(number, "sg", {"scale": 2.0 + number, "gamma_strong": 0.5})
            tracker.end_child(child, "FINISHED", None, {"fid": 30.0 - number, "gflops_per_sample": 1.5})
        tracker.end_parent()
        url = tracking.ui_url(server["uri"], tracker.experiment_id)
        shot = tmp_path / "mlflow_runs.png"
        page, _ = browser.visit(url, "document.body.innerText.includes('sweep sparsity_pareto @ ')", RUNS_TABLE, shot)
    # MLflow's own page logs a 404 for /users/current (no auth configured): its errors are not ours to assert.
    assert f"/experiments/{tracker.experiment_id}/runs" in page["url"]  # the runs view, not the GenAI overview
    names = " | ".join(page["rows"])
    assert "sweep sparsity_pareto @ optuna/sparsity_pareto.log (" in names
    assert "sparsity_pareto/trial-0000" in names and "sparsity_pareto/trial-0001" in names
    looks_like_a_page(shot)

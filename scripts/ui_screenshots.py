"""Screenshots of MLflow's UI for docs/ui.md, taken as tests/cli/test_ecosystem.py loads it: ``deepsports ui``
on a store made by the CLI, opened in headless Chromium (Debian's ``chromium``).

    python scripts/ui_screenshots.py [--out docs] [--workdir DIR] [--trials 3] [--epochs 3]

Makes a store in ``--workdir`` (a temporary folder by default): ``deepsports tune`` of a tiny two-parameter
space on the tiny synthetic set, then ``deepsports best --retrain`` (evaluated, so its quality plots exist).
Then it starts ``deepsports ui``, drives Chromium over the DevTools protocol (aiohttp, an MLflow dependency)
and writes three PNGs: the runs table with the study's trials nested under its parent run (expanded by a
click, as a user does), the retrained run's metric charts, and its per-group quality plot.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e_helpers import TINY, TUNE_SPACE, free_port  # noqa: E402

WIDTH, HEIGHT = 1400, 860


def _deepsports(workdir: Path, env: dict, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "deepsports.cli", *args], cwd=workdir, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"deepsports {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def make_store(workdir: Path, env: dict, trials: int, epochs: int) -> dict:
    (workdir / "space.yaml").write_text(TUNE_SPACE)
    sets = [x for k, v in {**TINY, "cache_dir": str(workdir / "cache"), "epochs": epochs, "evaluate": "false"}.items()
            if k != "learning_rate" for x in ("--set", f"{k}={v}")]
    tune = _deepsports(workdir, env, "tune", "space.yaml", "--study", "divers", "--n-trials", str(trials), *sets)
    best = _deepsports(workdir, env, "best", "divers", "--retrain", "--epochs", str(epochs))
    return {"tune": tune, "best": best}


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, session, ws):
        self.session, self.ws, self.next_id = session, ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied: {expression}")
            await asyncio.sleep(0.5)

    async def shot(self, url: str, ready: str, path: Path, before=None) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_for(ready)
        if before is not None:
            await before(self)
        await asyncio.sleep(3)  # charts and images finish drawing
        await self.evaluate("document.querySelectorAll('[aria-label=\"Close\"]').forEach(b => b.click()); true")
        await asyncio.sleep(1)
        data = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


async def take(urls: dict, parent_run_id: str, out: Path) -> None:
    import aiohttp

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (Debian: apt-get install chromium)")
    port = free_port()
    profile = tempfile.mkdtemp(prefix="deepsports-chromium-")
    browser = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}", f"--user-data-dir={profile}",
                                f"--remote-debugging-port={port}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        ws_url = next(p["webSocketDebuggerUrl"] for p in pages if p.get("type") == "page")
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
            page = Browser(session, ws)
            await page.call("Page.enable")
            await page.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                            mobile=False)
            row = f'[row-id="{parent_run_id}"]'

            async def expand(p: Browser) -> None:
                await p.evaluate(f"document.querySelector('{row} button').click(); true")
                await p.wait_for("document.body.innerText.includes('divers-trial-0000')")

            await page.shot(urls["runs"], f"!!document.querySelector('{row}')", out / "ui-runs-table.png", expand)
            await page.shot(urls["charts"], "document.body.innerText.includes('val_spearman')", out / "ui-run-charts.png")
            await page.shot(urls["quality"], "!!document.querySelector('img')", out / "ui-quality-plot.png")
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder of the PNGs [docs/]")
    parser.add_argument("--workdir", default=None, help="where the store is made [a temporary folder]")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="deepsports-ui-shots-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("MLFLOW_RUN_ID", None)
    made = make_store(workdir, env, args.trials, args.epochs)
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "deepsports.cli", "ui", "--port", str(port)], cwd=workdir, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        runs = ui.stdout.readline().strip()
        if not runs.startswith("http"):
            sys.exit(f"deepsports ui printed no URL (exit {ui.poll()})")
        retrain = made["best"]["retrain"]["ui"].replace("127.0.0.1:5000", f"127.0.0.1:{port}")
        page, query = retrain.split("?", 1)
        urls = {"runs": runs, "charts": f"{page}/model-metrics?{query}",
                "quality": f"{page}/artifacts/quality/groups_test.png?{query}"}
        asyncio.run(take(urls, made["tune"]["parent_run_id"], Path(args.out)))
    finally:
        ui.terminate()
        ui.wait(timeout=60)


if __name__ == "__main__":
    main()

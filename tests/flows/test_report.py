"""flows.report: one self-contained HTML file, loaded in a real headless Chromium (the system's
package, driven by its chromedriver through Selenium): no script errors, every section shown
with its plots."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.governance.report import section_ids
from flows.report import main as report_main
from state.client import FeatureClient
from state.servedlog import ServedLog
from tests.helpers import make_events, run_command

AT = 1_780_000_000 + 4 * 86_400  # after the newest test event


def chromium() -> tuple[str, str]:
    """The system Chromium and its driver; under CI their absence fails the test."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = "no chromium/chromedriver: apt-get install chromium chromium-driver (scripts/test)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def open_page(path: Path, screenshot: Path | None = None) -> tuple[dict, list[dict]]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,2400"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(path.as_uri())
        state = driver.execute_script(
            """
            const ids = arguments[0];
            return {
              plotly: typeof window.Plotly === "object",
              sections: ids.map(id => {
                const el = document.getElementById(id);
                if (!el) return {id, shown: false, plots: 0, rendered: 0};
                const box = el.getBoundingClientRect();
                return {id, shown: box.height > 0 && getComputedStyle(el).display !== "none",
                        plots: el.querySelectorAll(".plotly-graph-div").length,
                        rendered: [...el.querySelectorAll(".plotly-graph-div")]
                                  .filter(d => d.querySelector(".main-svg")).length,
                        text: el.innerText.slice(0, 200)};
              }),
            };
            """,
            list(section_ids()),
        )
        if screenshot is not None:
            driver.save_screenshot(str(screenshot))
        return state, driver.get_log("browser")
    finally:
        driver.quit()


def test_report_loads_in_chromium_with_every_section(deployment: Path, tmp_path: Path) -> None:
    root = tmp_path / "dep"
    shutil.copytree(deployment, root)
    features = root / "defs" / "features.py"
    bad = make_events(20, 3, seed=2)
    bad = bad.set_column(0, "user_id", pa.array([None] * 20, pa.string()))  # dead letters
    pq.write_table(bad, root / "bad.parquet")
    ingested = run_command("flows.ingest", "--features", str(features), "--warehouse",
                           str(root / "wh"), str(root / "bad.parquet"))  # fmt: skip
    assert ingested.returncode == 0, ingested.stderr
    with FeatureClient(root / "state", served_log=ServedLog(root / "wh")) as client:
        client.get_many("spend", [f"user{i}" for i in range(20)], at=AT)
    out = tmp_path / "report.html"
    args = ["--features", str(features), "--warehouse", str(root / "wh"),
            "--state", str(root / "state"), "--out", str(out)]  # fmt: skip
    assert report_main(args) == 0
    page = out.read_text()
    assert "<script src=" not in page  # self-contained: plotly.js is inlined
    state, log = open_page(out)
    errors = [e for e in log if e["level"] == "SEVERE"]
    assert errors == []
    assert state["plotly"]
    sections = {s["id"]: s for s in state["sections"]}
    assert list(sections) == list(section_ids())
    for section in sections.values():
        assert section["shown"], section
        assert section["plots"] >= 1, section
        assert section["rendered"] == section["plots"], section  # each chart drew its SVG
    assert "dead letters in the warehouse" in sections["dead-letters"]["text"]
    assert "0 unexplained" in sections["skew"]["text"]

"""The report in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by
Selenium) opens the written file from disk, as a person would open a mailed report.

Skips where no Chromium or chromedriver is installed (``apt-get install chromium chromium-driver``), except
under CI (``CI`` set), whose ``.ci/run`` installs them. A screenshot of an opened item is saved as an artefact: under ``$TEST_ARTIFACTS_DIR`` if
set, else under pytest's temporary folder; its path is printed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from mics_agents.report import write_report

from .test_report import XSS, make_run, scale_up

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the driver fixture says why the tests do not run
    webdriver = None

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None)
ARTIFACTS = os.environ.get("TEST_ARTIFACTS_DIR")

NO_BROWSER = "no headless browser: install Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    missing = (
        "selenium is not installed (pip install -e '.[dev]')" if webdriver is None
        else NO_BROWSER if CHROMIUM is None or CHROMEDRIVER is None else None
    )
    if missing:
        if os.environ.get("CI"):  # .ci/run installs both: there, their absence is a failure, not a skip
            pytest.fail(missing + " (.ci/run should have installed it)")
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                     "--window-size=1440,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    browser.set_page_load_timeout(20)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("report_browser_run"))


@pytest.fixture(scope="module")
def page(run_files, tmp_path_factory):
    path = tmp_path_factory.mktemp("report_browser") / "report.html"
    data = write_report(run_files["output"], path, image_dir=run_files["images"])
    return path, data


def severe(browser) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def open_report(browser, path: Path, fragment: str = "", timeout: float = 10) -> None:
    browser.get(path.as_uri() + fragment)
    WebDriverWait(browser, timeout).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
        or "Cannot open" in b.find_element(By.ID, "loading").text
    )
    assert not severe(browser), "the page loads without console errors"
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", browser.find_element(By.ID, "loading").text


def text_of(browser, selector: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, selector).text


def count_text(browser) -> str:
    return browser.find_element(By.ID, "count").text


def search(browser, text: str) -> None:
    box = browser.find_element(By.ID, "search")
    box.send_keys(Keys.CONTROL + "a", Keys.BACKSPACE)  # typed, as a person would (clear() fires no input event)
    if text:
        box.send_keys(text)


def test_the_summary_shows_the_run(driver, page):
    path, data = page
    open_report(driver, path)
    summary = data.summary
    assert text_of(driver, ".donut-number") == str(summary["items"])
    for status, count in summary["status"].items():
        legend = driver.find_element(By.CSS_SELECTOR, f'.legend-row[data-status="{status}"]')
        assert legend.find_element(By.CSS_SELECTOR, ".legend-count").text == str(count)
    cards = {card.find_element(By.TAG_NAME, "h2").text.lower(): card.text for card in driver.find_elements(By.CSS_SELECTOR, ".card")}
    assert set(cards) >= {"items", "final depth (successes)", "path trend (successes)", "mentor wins (last step)",
                          "intern accuracy (all samples)", "calls, cache and cost"}
    for intern, stats in summary["interns"].items():
        assert f"{100 * stats['accuracy']:.1f}% · {stats['correct']}/{stats['samples']}" in cards["intern accuracy (all samples)"]
    for mentor, wins in summary["mentor_wins"].items():
        assert mentor in cards["mentor wins (last step)"] and f"{wins} · " in cards["mentor wins (last step)"]
    usage = cards["calls, cache and cost"]
    assert f"{summary['usage']['cost_usd']:.4f}" in usage and summary["usage"]["cached_calls"] > 0
    assert count_text(driver) == f"{summary['items']} items"


def test_searching_and_filtering_narrow_the_list(driver, page):
    path, data = page
    open_report(driver, path)
    search(driver, "case-01")
    expected = [item["rid"] for item in data.items if "case-01" in (item["rid"] + item["q"] + item["a"] + item.get("err", "")).lower()]
    assert 1 < len(expected) < len(data.items)
    WebDriverWait(driver, 5).until(lambda b: count_text(b) == f"{len(expected)} of {len(data.items)} items")
    assert sorted(row.text.split("\n")[0].split()[0] for row in driver.find_elements(By.CSS_SELECTOR, ".row")) == sorted(expected)
    search(driver, "")
    WebDriverWait(driver, 5).until(lambda b: count_text(b) == f"{len(data.items)} items")
    driver.find_element(By.CSS_SELECTOR, '.legend-row[data-status="no_path"]').click()  # the chart filters too
    no_path = data.summary["status"]["no_path"]
    WebDriverWait(driver, 5).until(lambda b: count_text(b) == f"{no_path} of {len(data.items)} items")
    assert all("no path" in row.text for row in driver.find_elements(By.CSS_SELECTOR, ".row"))
    assert not severe(driver)


def test_clicking_an_item_shows_its_tree_and_samples(driver, page):
    path, data = page
    deepest = max((item for item in data.items if item["status"] == "success"), key=lambda item: (item["depth"], -item["i"]))
    assert deepest["depth"] >= 2
    open_report(driver, path)
    search(driver, deepest["rid"])
    WebDriverWait(driver, 5).until(lambda b: count_text(b).startswith("1 of"))
    driver.find_element(By.CSS_SELECTOR, ".row").click()
    WebDriverWait(driver, 5).until(lambda b: text_of(b, "#detail .rid") == deepest["rid"])
    detail = driver.find_element(By.ID, "detail")
    assert deepest["q"].splitlines()[0] in text_of(driver, "#detail .question")
    assert len(detail.find_elements(By.CSS_SELECTOR, ".node")) == len(deepest["tree"])
    selected = detail.find_elements(By.CSS_SELECTOR, ".node.selected")
    assert len(selected) == deepest["depth"], "the selected path is highlighted, one candidate per iteration"
    assert [data.mentors[m] for m in deepest["path"]] == [node.find_element(By.CSS_SELECTOR, ".mentor").text for node in selected]
    assert len(detail.find_elements(By.CSS_SELECTOR, ".path .path-step")) == deepest["depth"]
    thumbnails = detail.find_elements(By.CSS_SELECTOR, ".thumb img")
    assert len(thumbnails) == len(deepest["img"]) and all(
        driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img) for img in thumbnails)

    first = detail.find_element(By.CSS_SELECTOR, "details.samples")
    assert not first.find_elements(By.CSS_SELECTOR, "tbody tr"), "samples are folded until asked for"
    first.find_element(By.TAG_NAME, "summary").click()
    node = deepest["tree"][0]
    rows = WebDriverWait(driver, 5).until(lambda b: first.find_elements(By.CSS_SELECTOR, "tbody tr"))  # built on toggle
    assert len(rows) == len(node["x"])
    assert [("✓" in row.text) for row in rows] == [bool(sample[4]) for sample in node["x"]]
    assert data.interns[node["x"][0][0]] in rows[0].text and node["x"][0][3] in rows[0].text
    driver.find_element(By.XPATH, "//button[text()='expand all samples']").click()
    assert len(detail.find_elements(By.CSS_SELECTOR, "details.samples[open] tbody tr")) == sum(len(n["x"]) for n in deepest["tree"])
    assert driver.current_url.endswith("#item=" + deepest["rid"]), "the item has a link of its own"
    assert not severe(driver)

    # The artefact: the summary, the list and this item's tree with the first candidate's samples open.
    driver.find_element(By.XPATH, "//button[text()='collapse all']").click()
    first.find_element(By.TAG_NAME, "summary").click()
    search(driver, "")
    WebDriverWait(driver, 5).until(lambda b: count_text(b) == f"{len(data.items)} items")
    folder = Path(ARTIFACTS) if ARTIFACTS else path.parent.parent / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    screenshot = folder / "report.png"
    driver.set_window_size(1440, 2000)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.2)
    assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    driver.set_window_size(1440, 1000)
    print(f"\nscreenshot: {screenshot}")


def test_untrusted_text_is_shown_as_text(driver, page):
    path, _ = page
    open_report(driver, path, "#item=case-007")
    WebDriverWait(driver, 5).until(lambda b: text_of(b, "#detail .rid") == "case-007")
    assert XSS in text_of(driver, "#detail .question")
    assert driver.execute_script("return document.querySelectorAll('img[src=\"x\"], img[onerror]').length") == 0
    assert driver.execute_script("return [...document.scripts].length") == 2, "no script element was injected"
    assert not severe(driver)


def test_failures_show_their_error_and_input(driver, page):
    path, data = page
    open_report(driver, path, "#item=bad-no-answer")
    WebDriverWait(driver, 5).until(lambda b: text_of(b, "#detail .rid") == "bad-no-answer")
    assert "missing or empty" in text_of(driver, "#detail .error-box")
    assert '"question": "Which lobe is affected?"' in text_of(driver, "#detail details.fold[open] pre")
    model_error = next(item for item in data.items if item["status"] == "model_error")
    open_report(driver, path, "#item=" + model_error["rid"])
    WebDriverWait(driver, 5).until(lambda b: text_of(b, "#detail .rid") == model_error["rid"])
    assert "HTTP 503" in text_of(driver, "#detail .error-box")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#detail .node")) == len(model_error["tree"])
    assert not severe(driver)


def test_ten_thousand_items_open_fast_and_stay_virtualised(driver, run_files, tmp_path):
    big = scale_up(run_files, tmp_path, 10_000)
    path = tmp_path / "big.html"
    data = write_report(big["output"], path)
    started = time.perf_counter()
    open_report(driver, path, timeout=20)
    opened = time.perf_counter() - started
    load_ms = int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-load-ms"))
    print(f"\n10,000 items: page ready in {opened:.2f} s (unpack + parse + first render {load_ms} ms), {path.stat().st_size / 1e6:.1f} MB")
    assert opened < 8 and load_ms < 5000
    assert count_text(driver) == "10,000 items"
    assert len(driver.find_elements(By.CSS_SELECTOR, ".row")) < 60, "only the visible rows are in the DOM"
    driver.execute_script("const list = document.getElementById('list'); list.scrollTop = list.scrollHeight;")
    last = data.items[-1]["rid"]
    WebDriverWait(driver, 5).until(lambda b: last in b.find_element(By.ID, "list").text)
    started = time.perf_counter()
    search(driver, "item-0999")
    WebDriverWait(driver, 5).until(lambda b: count_text(b) == "10 of 10,000 items")
    print(f"search to filtered list: {time.perf_counter() - started:.2f} s")
    driver.find_element(By.CSS_SELECTOR, ".row").click()
    WebDriverWait(driver, 5).until(lambda b: text_of(b, "#detail .rid") == "item-09990")
    assert not severe(driver)


def test_an_empty_run_opens_cleanly(driver, tmp_path):
    output = tmp_path / "empty.jsonl"
    output.write_text("")
    path = tmp_path / "empty.html"
    write_report(output, path)
    open_report(driver, path)
    assert text_of(driver, ".donut-number") == "0" and count_text(driver) == "0 items"
    assert "No item" in driver.find_element(By.ID, "list").text
    assert not severe(driver)

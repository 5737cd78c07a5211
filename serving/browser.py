"""Driving the page in Debian's headless Chromium (selenium): the browser test and the README's
screenshot (`bench/serve.py --screenshot`) walk it the same way. Chromium and its driver come
from apt (`make browser`), never from a download at run time; selenium is imported lazily."""

from __future__ import annotations

import shutil
from typing import Any


def chromium() -> tuple[str, str] | None:
    """(browser, chromedriver) paths, or None where either is not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def headless_chromium(*, window: tuple[int, int] = (900, 700)) -> Any:
    """A headless Chromium webdriver (the caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium()
    if paths is None:
        raise FileNotFoundError("chromium and chromium-driver are not installed (make browser)")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 f"--window-size={window[0]},{window[1]}"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(paths[1]), options=options)


def generate_on_page(
    driver: Any, url: str, *, prompt: str, images: int, fields: dict[str, Any] | None = None,
    timeout_s: float = 60.0,
) -> list[Any]:  # fmt: skip
    """Open the page, pick `prompt`, fill the form `fields` (element id -> value), press
    Generate and wait until `images` images are shown; returns their <img> elements."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(url + "/")
    wait = WebDriverWait(driver, timeout_s)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt option"))
    Select(driver.find_element(By.ID, "prompt")).select_by_visible_text(prompt)
    for field, value in (fields or {}).items():
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(str(value))
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#images img")) == images)
    return driver.find_elements(By.CSS_SELECTOR, "#images img")

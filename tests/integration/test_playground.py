"""The web playground at / in headless Chromium (Debian's chromium + chromedriver) against the embedded stack:
a user types a key and a message, attaches a picture, asks for an image and a sound, and sees the reply's text
and both media appear in the page, loaded from their signed URLs."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from services.bundle.loader import load_bundle
from services.cli.compose import embedded_app
from services.contracts.settings import Settings
from tests.support import media
from tests.support.embedded import engines_here
from tests.support.servers import UvicornThread

KEY = "browser-key"
CHROMIUM = os.environ.get("NEXTGPT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("NEXTGPT_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def app(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    settings = engines_here(Settings(cache_dir=tmp_path_factory.mktemp("cache"), api_keys=KEY))
    return embedded_app(settings, load_bundle(tiny_bundle_dir))


@pytest.fixture(scope="module")
def url(app: FastAPI) -> Iterator[str]:
    with UvicornThread(app) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(f"{CHROMIUM} / {CHROMEDRIVER} missing: run `make browser` (make test does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # This machine's network is closed: no background connections, no sandbox as root.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--autoplay-policy=no-user-gesture-required", "--window-size=1100,1400",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_chat_with_an_upload_shows_text_and_media_as_they_arrive(url: str, browser: webdriver.Chrome,
                                                                 tmp_path: Path) -> None:
    picture = tmp_path / "cat.png"
    picture.write_bytes(media.png())
    browser.get(f"{url}/")
    assert browser.title == "nextgpt-serve playground"
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "message").send_keys("draw this and make a sound")
    browser.find_element(By.ID, "files").send_keys(str(picture))
    for box in browser.find_elements(By.CSS_SELECTOR, "input[name=modality]"):
        if box.get_attribute("value") in ("image", "audio"):
            box.click()
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("40")
    browser.find_element(By.ID, "send").click()

    wait = WebDriverWait(browser, 180)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn[data-done=true]"))
    image = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "img.artifact-image"))
    # Loaded from its signed URL by the browser itself, not just put in the page.
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    audio = browser.find_element(By.CSS_SELECTOR, "audio.artifact-audio")
    wait.until(lambda d: d.execute_script("return arguments[0].readyState >= 1 && arguments[0].duration > 0", audio))
    reply = browser.find_elements(By.CSS_SELECTOR, ".turn")[-1]
    assert reply.find_element(By.CSS_SELECTOR, ".text").text.strip()
    assert not browser.find_elements(By.CSS_SELECTOR, ".error")
    assert "conversation" in browser.find_element(By.ID, "conversation").text
    browser.save_screenshot(str(tmp_path / "playground.png"))


def test_two_photos_of_the_same_name_both_go(url: str, browser: webdriver.Chrome, tmp_path: Path) -> None:
    """A phone names every photo it shares "image.jpg": the API refuses a name used twice (names are how messages
    refer to uploads), so the playground sends them under names of their own."""
    paths = []
    for seed in (1, 2):
        folder = tmp_path / str(seed)
        folder.mkdir()
        paths.append(folder / "image.png")
        paths[-1].write_bytes(media.png(seed=seed))
    browser.get(f"{url}/")
    key = browser.find_element(By.ID, "key")
    key.clear()  # the page keeps the last key
    key.send_keys(KEY)
    browser.find_element(By.ID, "message").send_keys("what are these?")
    browser.find_element(By.ID, "files").send_keys("\n".join(str(path) for path in paths))
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 120).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".turn[data-done=true], .error"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".error")
    sent = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".turn")[-2].find_elements(By.CSS_SELECTOR, ".job")]
    assert sent == ["image.png", "image (2).png"]


def test_a_wrong_key_is_shown_as_an_error(url: str, browser: webdriver.Chrome) -> None:
    browser.get(f"{url}/")
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys("not-the-key")
    browser.find_element(By.ID, "message").send_keys("hello")
    browser.find_element(By.ID, "send").click()
    error = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, ".error"))
    assert error.text.startswith("invalid_api_key")


def test_stop_cancels_the_reply_being_written(url: str, browser: webdriver.Chrome) -> None:
    browser.get(f"{url}/")
    key = browser.find_element(By.ID, "key")
    key.clear()  # the browser may restore what an earlier test typed
    key.send_keys(KEY)
    browser.find_element(By.ID, "message").send_keys("say a lot")
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("400")
    stop = browser.find_element(By.ID, "stop")
    assert not stop.is_enabled()
    browser.find_element(By.ID, "send").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn")[-1].find_element(By.CSS_SELECTOR, ".text").text)
    wait.until(lambda d: stop.is_enabled())
    stop.click()
    error = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".error"))
    assert error.text.startswith("stream_cancelled")
    assert not browser.find_elements(By.CSS_SELECTOR, ".turn[data-done=true]")
    wait.until(lambda d: not stop.is_enabled() and d.find_element(By.ID, "send").is_enabled())


def test_a_system_prompt_opens_a_conversation_and_is_locked_while_it_goes_on(url: str, app: FastAPI,
                                                                              browser: webdriver.Chrome) -> None:
    """The System field goes with a conversation's first request (the API takes it there only), shown above it;
    the field is locked until "New conversation", and the next message goes without it."""
    browser.get(f"{url}/")
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(KEY)
    system = browser.find_element(By.ID, "system")
    system.send_keys("Answer in one short sentence.")
    wait = WebDriverWait(browser, 120)

    def say(text: str, done: int) -> None:
        browser.find_element(By.ID, "message").send_keys(text)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn[data-done=true]")) == done
                   or d.find_elements(By.CSS_SELECTOR, ".error"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")

    say("hello", 1)
    turns = browser.find_elements(By.CSS_SELECTOR, ".turn")
    assert [t.find_element(By.CSS_SELECTOR, ".who").text.lower() for t in turns] == ["system", "you", "nextgpt"]
    assert not system.is_enabled()
    say("and again", 2)  # the conversation goes on: no system message in a later request (that would be a 400)
    gateway = app.state.gateway
    stored = asyncio.run(gateway.chat.conversations.load(browser.execute_script("return conversationId"),
                                                         gateway.keys.owner(f"Bearer {KEY}")))
    assert stored is not None
    assert stored.system == ["Answer in one short sentence."]
    assert [t.text for t in stored.turns if t.role == "user"] == ["hello", "and again"]
    browser.find_element(By.ID, "reset").click()
    assert system.is_enabled() and system.get_attribute("value") == "Answer in one short sentence."

"""``omnifast serve`` in a real browser (headless Chromium driven by Selenium): the page served by
a tiny model takes a spoken question and a picture, the answer's text and streamed speech arrive
with their latencies, a bad file gets a message and the page keeps answering; a script gets the
same answer through ``gradio_client``. Skips, saying why, where Gradio, Selenium or a browser is
missing."""

import shutil
import socket
import urllib.request

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

gr = pytest.importorskip("gradio", reason="omnifast serve needs Gradio (pip install 'omnifast[serve]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests drive Chromium with Selenium")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer  # noqa: E402
from omnifast.serve import build_page, read_upload  # noqa: E402
from omnifast.speech import SpeechTokenizer, SpeechTokenizerConfig, UnitVocoder  # noqa: E402

BROWSER, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    BROWSER is None or DRIVER is None,
    reason="no Chromium and chromedriver on PATH (make setup installs Debian's chromium and chromium-driver)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = OmniConfig.tiny()
    model, processor = OmniModel(config).eval(), OmniProcessor(build_tiny_tokenizer(), config)
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(8000)).astype(np.float32) for _ in range(2)]
    vocoder = UnitVocoder(SpeechTokenizer(SpeechTokenizerConfig.tiny()), n_iter=2)
    return model, processor, vocoder.fit_centroids(clips, {"emotion": ["happy", "sad"]})


@pytest.fixture(scope="module")
def served(tiny):
    port = free_port()
    page = build_page(*tiny, max_new_tokens=12, max_upload_mb=1)
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, max_file_size="1mb", quiet=True)
    yield f"http://127.0.0.1:{port}/"
    page.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(1)
    soundfile.write(root / "question.wav", (0.1 * rng.standard_normal(12000)).astype(np.float32), 16000)
    Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(root / "picture.png")
    (root / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt not a wave file at all")
    soundfile.write(root / "long.wav", np.zeros(16000 * 3, np.float32), 16000)  # the tiny model hears 1 s
    return root


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    options.add_argument("--autoplay-policy=no-user-gesture-required")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def ask(driver, url, audio=None, picture=None, text=None):
    driver.get(url)
    wait = WebDriverWait(driver, 90)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question-audio input[type=file]"))
    if audio is not None:
        driver.find_element(By.CSS_SELECTOR, "#question-audio input[type=file]").send_keys(str(audio))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question-audio audio, #question-audio .error"))
    if picture is not None:
        driver.find_element(By.CSS_SELECTOR, "#picture input[type=file]").send_keys(str(picture))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#picture img"))
    if text is not None:
        driver.find_element(By.CSS_SELECTOR, "#question-text textarea").send_keys(text)
    driver.find_element(By.ID, "ask").click()
    return wait


@needs_browser
def test_the_page_answers_a_spoken_question_about_a_picture_with_streamed_speech(served, files, browser):
    wait = ask(browser, served, audio=files / "question.wav", picture=files / "picture.png")
    wait.until(lambda d: "first token" in d.find_element(By.ID, "stats").text)
    stats = browser.find_element(By.ID, "stats").text
    assert "first audio" in stats and "real-time factor" in stats and " units" in stats
    conversation = browser.find_element(By.ID, "conversation").text
    assert "[picture] [spoken question]" in conversation
    answer = conversation.split("[picture] [spoken question]", 1)[1].strip()
    assert answer, conversation  # text arrived
    sources = browser.execute_script(
        "return Array.from(document.querySelectorAll('#answer-audio audio')).map(a => a.src)"
    )
    assert any(sources), sources  # the player was handed the stream
    link = browser.find_element(By.CSS_SELECTOR, "#answer-audio a[download]").get_attribute("href")
    with urllib.request.urlopen(link, timeout=30) as response:
        assert len(response.read()) > 0  # and the stream holds audio


@needs_browser
def test_a_bad_file_gets_a_message_and_the_page_keeps_answering(served, files, browser):
    ask(browser, served, audio=files / "long.wav")
    WebDriverWait(browser, 60).until(lambda d: "speech window" in d.find_element(By.TAG_NAME, "body").text)
    wait = ask(browser, served, text="what colour is the sun")
    wait.until(lambda d: "first token" in d.find_element(By.ID, "stats").text)


def test_a_script_gets_the_answer_through_gradio_client(served):
    client = pytest.importorskip("gradio_client").Client(served, verbose=False)
    chat, _, stats = client.predict("what colour is the sun", None, None, None, api_name="/answer")
    assert chat[-1]["role"] == "assistant" and "first token" in stats
    chat, _, _ = client.predict("and the lemon", None, None, None, api_name="/answer")
    assert [m["role"] for m in chat] == ["user", "assistant"] * 2  # the conversation keeps its turns


def test_a_units_only_vocoder_speaks_without_a_style_choice(tiny):
    model, processor, _ = tiny
    torch.manual_seed(0)
    vocoder = UnitVocoder(SpeechTokenizer(SpeechTokenizerConfig.tiny(style_dim=0)), n_iter=2)
    page = build_page(model, processor, vocoder, max_new_tokens=8)
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = pytest.importorskip("gradio_client").Client(f"http://127.0.0.1:{port}/", verbose=False)
        chat, _, stats = client.predict("hi", None, None, "the units carry the style", api_name="/answer")
        assert chat[-1]["role"] == "assistant" and "first token" in stats
    finally:
        page.close()


def test_uploads_are_checked_before_the_model_sees_them(tiny, files):
    model, processor, _ = tiny
    with pytest.raises(ValueError, match="the spoken question cannot be used: .*broken.wav"):
        read_upload("spoken question", files / "broken.wav", model, processor, 10**6)
    with pytest.raises(ValueError, match="longer than the model's 1 s speech window"):
        read_upload("spoken question", files / "long.wav", model, processor, 10**6)
    with pytest.raises(ValueError, match="the page takes at most 0.001 MB"):
        read_upload("picture", files / "picture.png", model, processor, 1000)
    assert read_upload("picture", files / "picture.png", model, processor, 10**6).shape == (40, 40, 3)

"""genllava-serve: the batching queue alone, then the Gradio server on a (two-step) trained micro model driven
over HTTP by the Gradio client and by headless Chromium."""

import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from genllava_jax.serve.batcher import Batcher, Busy


def _answer_all(batch):
    for r in batch:
        r.put("text", "x")
        r.put("done", r.payload * 10)


def test_batcher_fills_a_batch_per_key_within_the_wait():
    b = Batcher(_answer_all, max_batch=3, wait_s=5.0, max_pending=10)
    reqs = [b.submit("a" if i % 2 == 0 else "b", i) for i in range(6)]  # 3 a's and 3 b's: two full batches
    assert [list(r.results(timeout=10)) for r in reqs] == [[("text", "x"), ("done", 10 * i)] for i in range(6)]
    assert sorted(b.batches) == [("a", 3), ("b", 3)]
    t0 = time.monotonic()
    lone = b.submit("a", 7)  # a batch that cannot fill leaves after the wait
    b.wait_s = 0.05
    assert list(lone.results(timeout=10))[-1] == ("done", 70) and time.monotonic() - t0 < 6
    b.close()


def test_batcher_answers_busy_past_its_bound_and_survives_a_failing_batch():
    gate = threading.Event()

    def run(batch):
        gate.wait()
        if any(r.payload == "boom" for r in batch):
            raise RuntimeError("boom")
        _answer_all(batch)

    b = Batcher(run, max_batch=1, wait_s=0.0, max_pending=2)
    first = b.submit("k", 1)
    while b.pending:  # the worker holds the first request (blocked in run)
        time.sleep(0.01)
    queued = [b.submit("k", "boom"), b.submit("k", 3)]
    with pytest.raises(Busy, match="2 requests are waiting"):
        b.submit("k", 4)
    gate.set()
    assert list(first.results(timeout=10))[-1] == ("done", 10)
    assert list(queued[0].results(timeout=10)) == [("error", "internal error: RuntimeError: boom")]
    assert list(queued[1].results(timeout=10))[-1] == ("done", 30)
    b.close()


# -- the server on a trained micro model (slow: a two-step training run, then the compiles)


@pytest.fixture(scope="module")
def workdir(trained_workdir):
    return trained_workdir


SETTINGS = dict(max_new_tokens=4, num_steps=2)
CONTEXT = 40  # the micro model's data.max_len


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(workdir):
    from gradio_client import Client

    from genllava_jax import infer
    from genllava_jax.serve import app

    worker = app.make_worker(workdir, defaults=infer.Settings(**SETTINGS), batch_size=4, max_pixels=64 * 64)
    worker.warm_up()
    compiled = (infer.decode_arrays._cache_size(), infer._images._cache_size())
    port = free_port()
    page = app.launch(worker, port=port, block=False)
    url = f"http://127.0.0.1:{port}/"
    yield SimpleNamespace(worker=worker, url=url, connect=lambda: Client(url, verbose=False), compiled=compiled)
    page.close()
    worker.batcher.close()


def turn(client, text, mode="chat", files=(), seed=0, submit=False):
    from gradio_client import handle_file

    args = ({"text": text, "files": [handle_file(str(f)) for f in files]}, mode, 0.0, 1.0, SETTINGS["num_steps"],
            3.0, seed)
    return (client.submit if submit else client.predict)(*args, api_name="/turn")


def said(chat) -> str:
    """The last assistant text of a chat value ("" if none yet)."""
    texts = [c["text"] for m in chat if m["role"] == "assistant" for c in m["content"] if c["type"] == "text"]
    return texts[-1] if texts else ""


def image_of(chat) -> np.ndarray | None:
    files = [c["file"] for m in chat if m["role"] == "assistant" for c in m["content"] if c["type"] == "file"]
    return np.asarray(Image.open(files[-1])) if files else None


def cli_reply(assistant, mode, text, image, seed=0):
    """What genllava-chat / -generate / -edit return for the same input (one at a time, the CLIs' own buckets)."""
    import tempfile

    from genllava_jax import cli, infer

    settings = infer.Settings(**SETTINGS, seed=seed)
    if mode == "chat":
        return cli.chat(assistant, image, [text], settings, stream=False)[0].text
    return np.asarray(Image.open(cli.draw(assistant, text, image, settings, Path(tempfile.mkdtemp()) / "x.png")))


@pytest.mark.slow
def test_chat_generate_and_edit_turns_return_what_the_clis_return(server, workdir, data_dir):
    from genllava_jax import cli, infer

    client, compiled = server.connect(), server.compiled
    path = sorted((data_dir / "images").iterdir())[0]
    chat_job = turn(client, "What colour is the shape?", files=[path], submit=True)
    chat, _ = chat_job.result(timeout=600)
    gen, _ = turn(client, "Draw a red circle.", "generate", seed=5)
    edit, _ = turn(client, "Make it blue.", "edit", seed=5)  # edits the generated image: the last one
    upload_edit, _ = turn(client, "Make it blue.", "edit", files=[path])
    # the server compiled nothing after its warm-up
    assert (infer.decode_arrays._cache_size(), infer._images._cache_size()) == compiled

    # the answer streamed in: earlier outputs hold a growing prefix of it
    streamed = [said(out[0]) for out in chat_job.outputs()[:-1]]
    assert any(streamed) and all(said(chat).startswith(s.strip()) for s in streamed), (streamed, said(chat))
    assistant, image = cli.load_assistant(workdir)[0], cli.open_image(path)
    assert said(chat) == cli_reply(assistant, "chat", "What colour is the shape?", image)
    generated = image_of(gen)
    np.testing.assert_array_equal(generated, cli_reply(assistant, "generate", "Draw a red circle.", None, seed=5))
    np.testing.assert_array_equal(image_of(edit), cli_reply(assistant, "edit", "Make it blue.",
                                                            Image.fromarray(generated), seed=5))
    np.testing.assert_array_equal(image_of(upload_edit), cli_reply(assistant, "edit", "Make it blue.", image))


@pytest.mark.slow
def test_bad_input_gets_a_message_and_the_server_goes_on(server, data_dir, tmp_path):
    from gradio_client.exceptions import AppError

    client = server.connect()  # a new session: no image yet
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(AppError, match="Invalid file type"):  # gradio's own check of the upload's type
        turn(client, "What is it?", files=[tmp_path / "notes.txt"])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    Image.new("RGB", (100, 100)).save(tmp_path / "huge.png")  # over the fixture's 64x64 pixel bound
    broken, huge = tmp_path / "broken.png", tmp_path / "huge.png"
    cases = {"cannot use broken.png: corrupt_image": turn(client, "What is it?", files=[broken]),
             "cannot use huge.png: image_too_large: huge.png: 100x100": turn(client, "Hi", files=[huge]),
             "type a question or an instruction first": turn(client, "  "),
             "nothing to edit yet": turn(client, "Make it blue.", "edit"),
             f"tokens, over this server's context of {CONTEXT}": turn(client, "red " * 60)}
    for message, (chat, _) in cases.items():
        assert message in said(chat), said(chat)
    path = sorted((data_dir / "images").iterdir())[0]
    chat, _ = turn(client, "What colour is the shape?", files=[path])  # and the next turn is answered
    assert not said(chat).startswith("⚠️")


@pytest.mark.slow
def test_concurrent_turns_share_batched_calls_and_a_burst_gets_busy(server, data_dir, monkeypatch):
    from genllava_jax import infer

    worker, connect = server.worker, server.connect
    client = connect()
    calls = []
    for name in ("decode", "images"):
        real = getattr(infer, name)

        def spy(model, *args, _real=real, _name=name, **kw):
            shape = np.shape(args[0] if _name == "decode" else args[0]["input_ids"])
            calls.append((_name, shape))
            return _real(model, *args, **kw)

        monkeypatch.setattr(infer, name, spy)
    monkeypatch.setattr(worker.batcher, "wait_s", 120.0)  # a batch leaves when full: 8 turns -> 2 batches
    paths = sorted((data_dir / "images").iterdir())[:4]
    users = [connect() for _ in range(8)]  # eight sessions at once
    jobs = ([turn(u, "What colour is the shape?", files=[p], submit=True) for u, p in zip(users, paths)]
            + [turn(u, "Draw a red circle.", "generate", seed=s, submit=True) for u, s in zip(users[4:], (1, 2))]
            + [turn(u, "Make it blue.", "edit", files=[paths[0]], seed=s, submit=True)
               for u, s in zip(users[6:], (1, 2))])
    outs = [j.result(timeout=900)[0] for j in jobs]
    by_bucket = {}
    for name, shape in calls:
        by_bucket[(name, shape)] = by_bucket.get((name, shape), 0) + 1
    assert sum(n for (name, _), n in by_bucket.items() if name == "decode") == 2, calls
    assert all(n <= 2 for n in by_bucket.values()) and all(s[0] == 4 for _, s in by_bucket), calls
    # each turn got its own answer: alone it gets the same
    monkeypatch.setattr(worker.batcher, "wait_s", 0.01)
    alone = turn(client, "Draw a red circle.", "generate", seed=2)[0]
    np.testing.assert_array_equal(image_of(outs[5]), image_of(alone))
    assert not np.array_equal(image_of(outs[4]), image_of(outs[5]))  # seeds 1 and 2 differ
    assert said(turn(client, "What colour is the shape?", files=[paths[2]])[0]) == said(outs[2])

    # a burst: the worker is held, two turns may wait, the rest are told the server is busy
    gate, run = threading.Event(), worker.batcher.run
    monkeypatch.setattr(worker.batcher, "run", lambda batch: (gate.wait(), run(batch)))
    monkeypatch.setattr(worker.batcher, "max_pending", 2)
    burst = [turn(connect(), "Draw a red circle.", "generate", seed=s, submit=True) for s in range(10)]
    deadline = time.monotonic() + 300
    while sum(j.done() for j in burst) < 10 - 2 - 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    gate.set()
    texts = [said(j.result(timeout=600)[0]) for j in burst]
    busy = [t for t in texts if "the server is busy" in t]
    assert 4 <= len(busy) <= 8 and all(image_of(j.result()[0]) is not None for j, t in zip(burst, texts)
                                         if t not in busy)
    assert image_of(turn(client, "Draw a red circle.", "generate")[0]) is not None  # still serving


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1000,1000")


def browser(profile_dir):
    """Debian's headless chromium through its chromedriver; selenium is given both paths, so it looks nothing up."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def ask_in_browser(driver, url, question, image=None, mode="chat", until=lambda seen: True, timeout=300) -> str:
    """Opens the page (if not open), picks the turn's mode, uploads `image`, asks, and returns the answer's text
    once `until(text)` holds; fails with the last text seen if it never does. (Gradio marks a streaming event only
    while it is pending: a turn's first text piece may show long before its last piece or its image, so the test
    waits for what it expects, not for the page to look idle.)"""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    if driver.current_url.rstrip("/") != url.rstrip("/"):
        driver.get(url)
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#box textarea"))
    answers = len(driver.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]"))
    driver.find_element(By.CSS_SELECTOR, f"#mode input[value={mode}]").click()
    if image is not None:
        driver.find_element(By.CSS_SELECTOR, "#box input[type=file]").send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#box img"))  # the upload's preview
    box = driver.find_element(By.CSS_SELECTOR, "#box textarea")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)

    seen = [""]

    def answered(d):  # the turn's messages: their text, "[image]" for an image
        bots = d.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")
        if len(bots) <= answers or d.find_elements(By.CSS_SELECTOR, ".generating, .progress-text"):
            return False
        seen[0] = " ".join(b.text.strip() or "[image]" * bool(b.find_elements(By.TAG_NAME, "img"))
                           for b in bots[answers:]).strip()
        return seen[0] if until(seen[0]) else False

    try:
        return wait.until(answered)
    except TimeoutException:
        pytest.fail(f"{question!r} ({mode}): after {timeout} s the page shows {seen[0]!r}")


@pytest.mark.slow
def test_a_browser_uploads_an_image_asks_and_sees_the_answer(server, workdir, data_dir, tmp_path):
    """Headless Chromium, as a user: the page, an upload, a question, its answer; a broken upload, a generation."""
    from genllava_jax import cli

    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install -y chromium chromium-driver (.ci/run does)")
    url = server.url
    driver = browser(tmp_path / "profile")
    try:
        image = sorted((data_dir / "images").iterdir())[0]
        expected = cli_reply(cli.load_assistant(workdir)[0], "chat", "What colour is the shape?",
                             cli.open_image(image))
        ask_in_browser(driver, url, "What colour is the shape?", image, until=lambda seen: seen == expected)
        ask_in_browser(driver, url, "Hi", _broken_png(tmp_path), until=lambda seen: "cannot use broken.png" in seen)
        ask_in_browser(driver, url, "Draw a red circle.", mode="generate",  # still up
                       until=lambda seen: seen.endswith("[image]"))
    finally:
        driver.quit()


@pytest.mark.slow  # two start-ups of the CLI (jax, gradio imports): 32 s on the shared machine
def test_the_command_line_reports_bad_flags_and_a_missing_workdir_in_one_line(tmp_path):
    """genllava-serve's own start-up errors (its serving is the server fixture's `app.launch`, flags aside)."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "genllava-serve"
    env = {**os.environ, "XLA_FLAGS": ""}
    for args, message in (([f"--workdir={tmp_path}"], f"{tmp_path}: no config.json"),
                          ([f"--workdir={tmp_path}", "--batch_size=0"], "--batch_size=0: must be at least 1")):
        out = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"genllava-serve: error: {message}"), \
            out.stderr[-2000:]


def _broken_png(folder: Path) -> Path:
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return folder / "broken.png"

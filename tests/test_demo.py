"""python -m mnist_lab.demo: the server as a user starts it, and its page in headless Chromium,
drawn on through pointer events with the strokes of a real test digit. Screenshots go to
test-artifacts/ (or $MNIST_LAB_TEST_ARTIFACTS)."""

import base64
import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, stop
from tests.test_dashboard import ARTIFACTS, CHROMEDRIVER, CHROMIUM, chromium, free_port

pytestmark = pytest.mark.slow


def test_digit(data_dir: Path, label: int) -> np.ndarray:
    """The first test image of `label`, (28, 28) uint8."""
    raw = (data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    labels = np.frombuffer((data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    return np.frombuffer(raw[16:], np.uint8).reshape(-1, 28, 28)[int(np.nonzero(labels == label)[0][0])]


test_digit.__test__ = False  # a helper, not a test


@contextmanager
def demo_server(checkpoint: Path, log: Path, *args: str) -> Iterator[str]:
    """python -m mnist_lab.demo on a free port of 127.0.0.1, started as a user would: its URL."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mnist_lab.demo", "--ckpt", str(checkpoint), "--port", str(port), *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                urllib.request.urlopen(f"{url}/api/models", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        assert f"http://127.0.0.1:{port}/" in log.read_text()  # the URL is printed
        yield url
    finally:
        stop(process)


BODY_SECONDS = 2  # the fixture server's --body-timeout


@pytest.fixture(scope="module")
def server(real_checkpoint, tmp_path_factory) -> Iterator[tuple[str, Path, Path]]:
    """The demo of a LeNet-5 trained for an epoch: (its URL, the checkpoint, its log)."""
    checkpoint, _ = real_checkpoint
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with demo_server(checkpoint, log, "--body-timeout", str(BODY_SECONDS)) as url:
        yield url, checkpoint, log


def post(url: str, body: bytes, content_type: str = "application/octet-stream", **headers: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type, **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def strokes(digit: np.ndarray, scale: int = 10) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The digit as pen strokes on a 280 x 280 pad: one per run of ink along each row."""
    found = []
    for row, pixels in enumerate(digit > 127):
        columns = np.flatnonzero(pixels)
        for run in np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1) if len(columns) else []:
            y = row * scale + scale // 2
            found.append(((int(run[0]) * scale + scale // 2, y), (int(run[-1]) * scale + scale // 2, y)))
    return found


def settled(driver) -> dict:
    """The page's last answer, once no request is in flight."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = driver.execute_script("return [document.body.dataset.busy, document.body.dataset.result]")
        if state[0] == "false" and state[1]:
            return json.loads(state[1])
        time.sleep(0.1)
    raise AssertionError(f"no answer on the page: {driver.find_element('tag name', 'body').text}")


def test_a_drawn_seven_is_a_seven_and_the_page_shows_what_predict_says(server, real_data_dir, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    url, checkpoint, _ = server
    assert CHROMIUM.exists() and CHROMEDRIVER.exists()
    with chromium(tmp_path / "chromium") as driver:
        driver.get(url)
        deadline = time.monotonic() + 30
        while driver.execute_script("return document.body.dataset.ready") != "true":
            assert time.monotonic() < deadline, driver.find_element(By.TAG_NAME, "body").text
            time.sleep(0.1)
        pad = driver.find_element(By.ID, "pad")
        actions = ActionChains(driver)
        actions.w3c_actions = ActionBuilder(driver, mouse=PointerInput("pen", "pen"))  # pointer events, as a stylus
        for (x0, y0), (x1, y1) in strokes(test_digit(real_data_dir, 7)):
            pen = actions.w3c_actions.pointer_action
            pen.move_to(pad, x0 - 140, y0 - 140).pointer_down().move_to(pad, x1 - 140, y1 - 140).pointer_up()
        actions.perform()
        drawn = settled(driver)
        assert drawn["digit"] == 7 and driver.find_element(By.ID, "digit").text == "7"
        shown = [float(driver.find_element(By.ID, f"prob-{d}").text) for d in range(10)]
        assert shown == pytest.approx(drawn["probabilities"], abs=5e-5)  # the bars' labels, to 4 decimals
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "demo_seven.png"))

        # predict --json on the same pixels: the canvas as the page sent it
        png = base64.b64decode(driver.execute_script("return pad.toDataURL('image/png')").split(",", 1)[1])
        (tmp_path / "drawn.png").write_bytes(png)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mnist_lab.predict",
                "--ckpt",
                str(checkpoint),
                "--json",
                str(tmp_path / "drawn.png"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        (predicted,) = json.loads(result.stdout)
        assert (predicted["digit"], predicted["probabilities"]) == (drawn["digit"], drawn["probabilities"])

        shown_input = (
            "return Array.from(input.getContext('2d').getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 == 0))"
        )
        before = np.array(driver.execute_script(shown_input)).reshape(28, 28)
        assert np.array_equal(before, np.array(drawn["input"]))  # the 28 x 28 canvas shows what the model saw
        driver.find_element(By.CSS_SELECTOR, "button[data-distortion='transpose']").click()
        deadline = time.monotonic() + 30
        while (transposed := settled(driver))["distortion"] != "transpose":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert np.array_equal(np.array(transposed["input"]), np.array(drawn["input"]).T)  # the image the model sees
        assert np.array_equal(np.array(driver.execute_script(shown_input)).reshape(28, 28), before.T)  # and shows
        driver.save_screenshot(str(ARTIFACTS / "demo_seven_transposed.png"))
        # Offline: every resource the page loaded came from the demo server.
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(r.startswith(url) for r in resources), resources


def test_bad_requests_get_one_line_and_the_page_switches_only_among_listed_models(server, tmp_path):
    url, checkpoint, _ = server
    for body, error in ((b"", "an empty request"), (b"not an image", "not a format Pillow knows")):
        status, answer = post(f"{url}/api/predict", body)
        assert status == 400 and error in answer["error"] and "\n" not in answer["error"]
    # Refused by its declared size, before any of it is read.
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/api/predict")
    connection.putheader("Content-Length", str(5 * 2**20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "more than 4 MB" in json.load(response)["error"]
    connection.close()
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("L", (6000, 5000)).save(big)  # 30 megapixels in a few kB
    status, answer = post(f"{url}/api/predict", big.read_bytes())
    assert status == 400 and "megapixels" in answer["error"]
    status, answer = post(f"{url}/api/predict?distortion=melt", big.read_bytes())
    assert status == 400 and "unknown distortion 'melt'" in answer["error"]

    with urllib.request.urlopen(f"{url}/api/models") as response:
        models = json.load(response)
    name = f"checkpoints/{checkpoint.name}"  # relative to the folder listed, the run's
    assert name in models["models"] and models["current"] == name
    status, answer = post(f"{url}/api/model", json.dumps({"model": "/etc/passwd"}).encode(), "application/json")
    assert status == 400 and "is not one of the models" in answer["error"]
    status, answer = post(f"{url}/api/model", json.dumps({"model": models["models"][-1]}).encode(), "application/json")
    assert status == 200 and answer["current"] == models["models"][-1]


def raw_request(url: str, head: bytes, body: bytes = b"", close: bool = False) -> bytes:
    """Send `head` and `body` as they are on one connection; the whole answer (b"" when none came)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        try:
            connection.sendall(head + b"\r\n\r\n" + body)
        except (BrokenPipeError, ConnectionResetError):  # refused before all of it was read: the answer is in
            pass
        if close:  # the client goes away with its body unsent
            return b""
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer


def status_and_error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_only_the_printed_address_and_its_own_page_may_use_the_demo(server):
    url, checkpoint, _ = server
    port = url.rsplit(":", 1)[1]
    name = json.dumps({"model": f"checkpoints/{checkpoint.name}"}).encode()
    # Another site's page in the user's browser: a simple request, so no preflight stops it.
    status, answer = post(f"{url}/api/model", name, "text/plain", Origin="http://evil.example")
    assert status == 403 and "http://evil.example may not use this demo" in answer["error"]
    # A DNS-rebound name reaches the same address with another Host.
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1"):
        answer = raw_request(url, f"GET /api/models HTTP/1.1\r\nHost: {host}\r\nConnection: close".encode())
        status, error = status_and_error(answer)
        assert status == 403 and "is not this demo's address" in error and str(checkpoint) not in answer.decode()
    # The address printed, and the same machine's other names, with their own page's Origin.
    for host in ("127.0.0.1", "localhost"):
        status, answer = post(
            f"http://{host}:{port}/api/model", name, "application/json", Origin=f"http://{host}:{port}"
        )
        assert status == 200, answer


def test_every_body_is_bounded_in_size_and_time_and_malformed_json_gets_one_line(server):
    url, _, log = server
    for body, error in (
        (b"{", "the body is not JSON"),
        (b"[1, 2]", 'send {"model": <one of /api/models>}'),
        (b'{"model": 3}', 'send {"model": <one of /api/models>}'),
        (b"[" * 5000 + b"]" * 5000, "the body is not JSON"),  # nested deeper than the parser goes
    ):
        status, answer = post(f"{url}/api/model", body, "application/json")
        assert status == 400 and error in answer["error"] and "\n" not in answer["error"], (body[:20], answer)
    address = url.removeprefix("http://").encode()
    declared = b"POST /api/model HTTP/1.1\r\nHost: " + address + b"\r\nContent-Length: 400000000\r\nConnection: close"
    status, error = status_and_error(raw_request(url, declared))  # 400 MB of spaces to come: refused before
    assert status == 413 and 'a body of more than 16 kB: send {"model"' in error
    # Sent without Content-Length, the body is still cut off at the limit.
    chunked = raw_request(
        url,
        b"POST /api/model HTTP/1.1\r\nHost: " + address + b"\r\nTransfer-Encoding: chunked\r\nConnection: close",
        b"".join(b"4000\r\n" + b" " * 0x4000 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n",
    )
    assert status_and_error(chunked)[0] == 413
    # A body shorter than its Content-Length: refused once --body-timeout has passed, not waited on.
    head = (
        f"POST /api/predict HTTP/1.1\r\nHost: {url.removeprefix('http://')}\r\nContent-Length: 1000\r\n"
        "Connection: close"
    ).encode()
    status, error = status_and_error(raw_request(url, head, b"x" * 10))  # waited on, it would time out the socket
    assert status == 408 and f"did not arrive within {BODY_SECONDS} s" in error
    # A client that goes away mid-body is one line in the log, not a traceback.
    raw_request(url, head, b"x" * 10, close=True)
    deadline = time.monotonic() + 20
    while "went away before its request to /api/predict was read" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    assert "Traceback" not in log.read_text()


def test_a_bad_checkpoint_gets_predicts_one_line(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    lines = []
    for module in ("mnist_lab.demo", "mnist_lab.predict"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--ckpt", str(bad), *([] if module == "mnist_lab.demo" else [str(bad)])],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        lines.append(result.stderr.strip().splitlines()[-1])
    assert lines[0] == lines[1] and str(bad) in lines[0]


def test_the_menu_switches_to_an_onnx_export_of_the_run(real_checkpoint, real_data_dir, tmp_path):
    import shutil

    from PIL import Image

    checkpoint, _ = real_checkpoint
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, run / "checkpoints" / checkpoint.name)
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnist_lab.export",
            "--ckpt",
            str(run / "checkpoints" / checkpoint.name),
            "--out",
            str(run / "model.onnx"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr
    seven = tmp_path / "seven.png"
    Image.fromarray(test_digit(real_data_dir, 7)).resize((280, 280)).save(seven)
    with demo_server(run / "checkpoints" / checkpoint.name, tmp_path / "demo.log", "--models", str(run)) as url:
        with urllib.request.urlopen(f"{url}/api/models") as response:
            models = json.load(response)["models"]
        assert "model.onnx" in models
        _, by_checkpoint = post(f"{url}/api/predict", seven.read_bytes())
        status, answer = post(f"{url}/api/model", json.dumps({"model": "model.onnx"}).encode(), "application/json")
        assert status == 200, answer
        _, by_onnx = post(f"{url}/api/predict", seven.read_bytes())
    assert by_onnx["model"] == "model.onnx" and by_onnx["digit"] == by_checkpoint["digit"] == 7
    assert by_onnx["probabilities"] == pytest.approx(by_checkpoint["probabilities"], abs=1e-4)


def test_the_menu_lists_a_bounded_tree_by_names_relative_to_its_folder(small_checkpoint, tmp_path, monkeypatch):
    import os

    from mnist_lab import demo

    root = tmp_path / "outputs"
    (root / "runs" / "a" / "checkpoints").mkdir(parents=True)
    (root / "runs" / "a" / "checkpoints" / "best.ckpt").write_bytes(b"")
    (root / "runs" / "a" / "model.onnx").write_bytes(b"")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.ckpt").write_bytes(b"")
    (root / "venv" / "lib").mkdir(parents=True)
    (root / "venv" / "pyvenv.cfg").write_text("")
    (root / "venv" / "lib" / "in_a_venv.ckpt").write_bytes(b"")
    deep = root.joinpath(*"bcdefghij")
    deep.mkdir(parents=True)
    (deep / "too_deep.ckpt").write_bytes(b"")
    os.utime(root / "runs" / "a" / "model.onnx", (1, 1))  # older: listed after the checkpoint
    shown = demo.Demo(small_checkpoint, root)
    assert shown.models() == [str(small_checkpoint), "runs/a/checkpoints/best.ckpt", "runs/a/model.onnx"]
    (root / "runs" / "new.ckpt").write_bytes(b"")
    assert "runs/new.ckpt" not in shown.models()  # the listing is reused for a few seconds
    monkeypatch.setattr(demo, "LISTING_SECONDS", 0.0)
    assert "runs/new.ckpt" in shown.models()
    with pytest.raises(demo.InputError, match="is not one of the models"):
        shown.choose(str(root / "runs" / "a" / "model.onnx"))  # a name of the menu, never a path
    # However big the tree, one listing reads a bounded number of entries.
    crowded = root / "crowded"
    crowded.mkdir()
    for i in range(300):
        (crowded / f"{i}.txt").write_bytes(b"")
    monkeypatch.setattr(demo, "MAX_ENTRIES", 100)
    assert demo.model_files(root) == []  # stopped in crowded/, read before runs/

"""python -m mnist_lab.demo: the server as a user starts it, and its page in headless Chromium,
drawn on through pointer events with the strokes of a real test digit. Screenshots go to
test-artifacts/ (or $MNIST_LAB_TEST_ARTIFACTS)."""

import base64
import http.client
import json
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


@pytest.fixture(scope="module")
def server(real_checkpoint, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The demo of a LeNet-5 trained for an epoch: (its URL, the checkpoint)."""
    checkpoint, _ = real_checkpoint
    with demo_server(checkpoint, tmp_path_factory.mktemp("demo") / "demo.log") as url:
        yield url, checkpoint


def post(url: str, body: bytes, content_type: str = "application/octet-stream") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
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

    url, checkpoint = server
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
    url, checkpoint = server
    for body, error in ((b"", "an empty request"), (b"not an image", "not a format Pillow knows")):
        status, answer = post(f"{url}/api/predict", body)
        assert status == 400 and error in answer["error"] and "\n" not in answer["error"]
    # Refused by its declared size, before any of it is read.
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/api/predict")
    connection.putheader("Content-Length", str(5 * 2**20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 400 and "more than 4 MB" in json.load(response)["error"]
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
    assert str(checkpoint.resolve()) in models["models"] and models["current"] == str(checkpoint.resolve())
    status, answer = post(f"{url}/api/model", json.dumps({"model": "/etc/passwd"}).encode(), "application/json")
    assert status == 400 and "is not one of the models" in answer["error"]
    status, answer = post(f"{url}/api/model", json.dumps({"model": models["models"][-1]}).encode(), "application/json")
    assert status == 200 and answer["current"] == models["models"][-1]


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
        assert str((run / "model.onnx").resolve()) in models
        _, by_checkpoint = post(f"{url}/api/predict", seven.read_bytes())
        status, answer = post(
            f"{url}/api/model", json.dumps({"model": str((run / "model.onnx").resolve())}).encode(), "application/json"
        )
        assert status == 200, answer
        _, by_onnx = post(f"{url}/api/predict", seven.read_bytes())
    assert by_onnx["model"].endswith("model.onnx") and by_onnx["digit"] == by_checkpoint["digit"] == 7
    assert by_onnx["probabilities"] == pytest.approx(by_checkpoint["probabilities"], abs=1e-4)

"""Draw a digit and watch the model answer: a local web page.

    python -m mnist_lab.demo --ckpt outputs/runs/<date>/<run>/checkpoints/<best>.ckpt [--port 8000]

serves http://127.0.0.1:<port>/ (a free port unless --port says which; --host 0.0.0.0 to serve other
machines too). The page sends the drawing, as a PNG, after each stroke; the server prepares it as
`predict` does (crop, scale to 20 x 20, centre by mass, normalize), applies the distortion chosen
on the page (the notebook's transpose, and rotate, shift, invert from `evaluate --robustness`),
and answers with the ten class probabilities and the 28 x 28 image the model saw. An image file
dropped on the page goes the same way. The model menu lists the checkpoints and ONNX files under
--models (the runs folder by default), by their paths in it: the page can choose among those, and
nothing else.

Only the printed address is served: a request whose Host is another name, or whose Origin is
another site, is refused (403), so no other page in the user's browser can drive the demo. Bodies
are bounded in size (413) and in time (408); malformed requests get 400 and one line.

A small ASGI app (Starlette, served by uvicorn) and one hand-written page with no asset from the
internet: it works offline, and starts in the time it takes to load the model.
"""

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mnist_lab.errors import InputError, one_line_errors
from mnist_lab.evaluate import DISTORTIONS
from mnist_lab.predict import Classifier, load_image

MAX_BODY = 4 * 2**20  # bytes of an uploaded image: a drawing is a few kB, a photo a few MB
MAX_JSON = 16 * 2**10  # bytes of /api/model's body: one name
BODY_SECONDS = 10.0  # a body not in by then is refused (408), so a stalled client holds nothing for long
CHOICES = ("clean", "transpose", "rotate 30", "shift 4", "invert")  # the page's distortion buttons
MAX_MODELS = 200  # checkpoints and ONNX files the menu lists
MAX_DEPTH = 6  # folder levels below --models that the menu looks into (a run's checkpoints are at 3-5)
MAX_ENTRIES = 20_000  # folder entries one listing reads, at most: a huge tree costs a bounded time
LISTING_SECONDS = 5.0  # how long a listing is reused before the folder is read again
SKIPPED = {"__pycache__", "node_modules", "site-packages", "wandb", "mlruns"}  # never hold a run's models
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PAGE = Path(__file__).with_name("demo.html")


class RequestError(Exception):
    """A request refused with an HTTP status and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def model_files(root: Path) -> list[Path]:
    """The checkpoints and ONNX files under `root`, newest first: at most MAX_DEPTH folders down and
    MAX_ENTRIES entries read, past hidden folders, virtual environments and caches."""
    found: list[tuple[float, Path]] = []
    read = 0
    for folder, folders, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        read += len(folders) + len(files)
        if read > MAX_ENTRIES:
            break
        folders[:] = (
            []
            if depth >= MAX_DEPTH or "pyvenv.cfg" in files
            else sorted(f for f in folders if not f.startswith(".") and f not in SKIPPED)
        )
        for name in files:
            path = Path(folder, name)
            if name.endswith((".ckpt", ".onnx")) and not name.startswith(".") and path.is_file():
                found.append((path.stat().st_mtime, path))
    return [path for _, path in sorted(found, key=lambda item: -item[0])[:MAX_MODELS]]


class Demo:
    """The model the page talks to, and the files it may switch to."""

    def __init__(self, path: Path, models_root: Path) -> None:
        self.models_root = models_root.resolve()
        self.path, self.classifier = path.resolve(), Classifier(path)
        self._listed: tuple[float, dict[str, Path]] = (-LISTING_SECONDS, {})
        self._lock = threading.Lock()  # one listing at a time; requests meanwhile wait for it

    def name(self, path: Path) -> str:
        """How the menu shows a file: relative to the models folder, or whole when outside it."""
        return str(path.relative_to(self.models_root)) if path.is_relative_to(self.models_root) else str(path)

    def listing(self) -> dict[str, Path]:
        """The menu's names and their files, the current model's first; read again after LISTING_SECONDS."""
        with self._lock:
            read_at, listed = self._listed
            if time.monotonic() - read_at >= LISTING_SECONDS:
                listed = {self.name(p): p for p in map(Path.resolve, model_files(self.models_root))}
                self._listed = (time.monotonic(), listed)
        return listed if self.name(self.path) in listed else {self.name(self.path): self.path, **listed}

    def models(self) -> list[str]:
        return list(self.listing())

    def choose(self, name: str) -> None:
        path = self.listing().get(name)  # the page names one of the listed files, never any path
        if path is None:
            raise InputError(f"{name} is not one of the models under {self.models_root}: one of /api/models")
        self.classifier, self.path = Classifier(path), path

    def answer(self, body: bytes, distortion: str) -> dict[str, Any]:
        if distortion not in CHOICES:
            raise InputError(f"unknown distortion {distortion!r}: one of {', '.join(CHOICES)}")
        start = time.perf_counter()
        if not body:
            raise InputError("an empty request: send the drawing, or an image file")
        image = DISTORTIONS[distortion](load_image(body).unsqueeze(0)).clamp(
            0, 255
        )  # (1, 1, 28, 28), bounded as predict
        probabilities = self.classifier.probabilities(image)[0]
        digit = int(probabilities.argmax())
        return {
            "digit": digit,
            "probabilities": [round(float(p), 6) for p in probabilities],
            "input": image[0, 0].round().to(torch.uint8).tolist(),
            "distortion": distortion,
            "model": self.name(self.path),
            "ms": round(1000 * (time.perf_counter() - start), 1),
        }


async def body_of(request: Request, limit: int, what: str, seconds: float) -> bytes:
    """The request's body: 413 beyond `limit` bytes (before more is read), saying `what` to send
    instead; 408 when it is not all in within `seconds`."""
    size_text = f"{limit // 2**20} MB" if limit >= 2**20 else f"{limit // 2**10} kB"
    too_large = RequestError(413, f"a body of more than {size_text}: {what}")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, f"the request's body did not arrive within {seconds:g} s") from None
    return b"".join(chunks)


def model_name(body: bytes) -> str:
    """The name in /api/model's body, {"model": <one of /api/models>}."""
    usage = 'send {"model": <one of /api/models>}'
    try:
        sent = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: a nesting deeper than the parser goes
        raise RequestError(400, f"the body is not JSON: {usage}") from None
    if not isinstance(sent, dict) or not isinstance(sent.get("model"), str):
        raise RequestError(400, usage)
    return sent["model"]


def handled(endpoint):
    """The endpoint with every refusal answered in one line and a vanished client logged in one."""

    async def run(request: Request) -> Response:
        try:
            return await endpoint(request)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except InputError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except ClientDisconnect:
            client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
            print(f"{client} went away before its request to {request.url.path} was read", file=sys.stderr)
            return Response(status_code=400)

    return run


class SameOrigin:
    """Refuses (403) a request whose Host is not the served address, or whose Origin is another site:
    no other web page the user opens, nor a DNS-rebound name, can drive the demo or read its answers."""

    def __init__(self, app: ASGIApp, hosts: set[str] | None) -> None:
        self.app, self.hosts = app, hosts  # hosts: "name:port" accepted; None: any (--host 0.0.0.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            host, origin = headers.get("host", ""), headers.get("origin")
            if self.hosts is not None and host not in self.hosts:
                refused = f"Host {host!r} is not this demo's address: open http://{min(self.hosts)}/"
            elif origin is not None and origin != f"http://{host}":
                refused = f"a page of {origin} may not use this demo: open http://{host}/"
            else:
                refused = ""
            if refused:
                await JSONResponse({"error": refused}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def served_hosts(host: str, port: int) -> set[str] | None:
    """The Host headers that name the served address; None for every network's 0.0.0.0 or ::."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = LOOPBACK if host in LOOPBACK else (host,)
    return {f"[{name}]:{port}" if ":" in name else f"{name}:{port}" for name in names}


def app_for(demo: Demo, host: str, port: int, body_seconds: float = BODY_SECONDS) -> ASGIApp:
    page = PAGE.read_text()

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def predict(request: Request) -> JSONResponse:
        body = await body_of(request, MAX_BODY, "scale the image down", body_seconds)
        return JSONResponse(demo.answer(body, request.query_params.get("distortion", "clean")))

    async def models(request: Request) -> JSONResponse:
        listed = await asyncio.to_thread(demo.models)  # reading the folder never blocks a prediction
        return JSONResponse(
            {"models": listed, "current": demo.name(demo.path), "distortions": list(CHOICES), "max_body": MAX_BODY}
        )

    async def choose(request: Request) -> JSONResponse:
        name = model_name(await body_of(request, MAX_JSON, 'send {"model": <one of /api/models>}', body_seconds))
        await asyncio.to_thread(demo.choose, name)
        return JSONResponse({"current": demo.name(demo.path)})

    app = Starlette(
        routes=[
            Route("/", handled(index)),
            Route("/api/predict", handled(predict), methods=["POST"]),
            Route("/api/models", handled(models)),
            Route("/api/model", handled(choose), methods=["POST"]),
        ]
    )
    return SameOrigin(app, served_hosts(host, port))


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(prog="python -m mnist_lab.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="a checkpoint (.ckpt) or an ONNX export (.onnx)")
    parser.add_argument("--port", type=int, default=0, help="the port to serve on (default: a free one)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to serve on (default 127.0.0.1: this machine only; 0.0.0.0: every network)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=BODY_SECONDS,
        help=f"seconds a request's body may take to arrive before it is refused (default {BODY_SECONDS:g})",
    )
    parser.add_argument(
        "--models",
        type=Path,
        default=None,
        help="the folder whose checkpoints and ONNX files the page may switch to "
        "(default: the outputs folder above the checkpoint, or its run folder)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with one_line_errors():
        if not 0 <= args.port <= 65535:
            raise InputError(f"--port {args.port}: give a port from 1 to 65535, or 0 for a free one")
        if not 0 < args.body_timeout <= 600:
            raise InputError(f"--body-timeout {args.body_timeout:g}: give seconds above 0 and at most 600, e.g. 10")
        demo = Demo(args.ckpt, args.models or default_models_root(args.ckpt))
        port = args.port or free_port(args.host)
    import uvicorn

    print(f"mnist_lab demo of {demo.path}: http://{args.host}:{port}/  (Ctrl-C stops it)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"Serving every network on {args.host}: anyone who can reach this machine can use the page.",
            file=sys.stderr,
        )
    uvicorn.run(app_for(demo, args.host, port, args.body_timeout), host=args.host, port=port, log_level="warning")


def default_models_root(checkpoint: Path) -> Path:
    """outputs/ when the checkpoint is under it, else the folder its run lives in."""
    resolved = checkpoint.resolve()
    for parent in resolved.parents:
        if parent.name == "outputs":
            return parent
    return resolved.parent.parent if resolved.parent.name == "checkpoints" else resolved.parent


if __name__ == "__main__":
    main()

"""Draw a digit and watch the model answer: a local web page.

    python -m mnist_lab.demo --ckpt outputs/runs/<date>/<run>/checkpoints/<best>.ckpt [--port 8000]

serves http://127.0.0.1:<port>/ (a free port unless --port says which; --host 0.0.0.0 to serve other
machines too). The page sends the drawing, as a PNG, after each stroke; the server prepares it as
`predict` does (crop, scale to 20 x 20, centre by mass, normalize), applies the distortion chosen
on the page (the notebook's transpose, and rotate, shift, invert from `evaluate --robustness`),
and answers with the ten class probabilities and the 28 x 28 image the model saw. An image file
dropped on the page goes the same way. The model menu lists the checkpoints and ONNX files under
--models (the runs folder by default): the page can choose among those, and nothing else.

A small ASGI app (Starlette, served by uvicorn) and one hand-written page with no asset from the
internet: it works offline, and starts in the time it takes to load the model.
"""

import argparse
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from mnist_lab.errors import InputError, one_line_errors
from mnist_lab.evaluate import DISTORTIONS
from mnist_lab.predict import Classifier, load_image

MAX_BODY = 4 * 2**20  # bytes of an uploaded image: a drawing is a few kB, a photo a few MB
CHOICES = ("clean", "transpose", "rotate 30", "shift 4", "invert")  # the page's distortion buttons
MAX_MODELS = 200  # checkpoints and ONNX files the menu lists
PAGE = Path(__file__).with_name("demo.html")


class Demo:
    """The model the page talks to, and the files it may switch to."""

    def __init__(self, path: Path, models_root: Path) -> None:
        self.models_root = models_root.resolve()
        self.path, self.classifier = path.resolve(), Classifier(path)

    def models(self) -> list[str]:
        """The checkpoints and ONNX files under the models folder, newest first, and the current one."""
        found = sorted(
            (
                p
                for pattern in ("*.ckpt", "*.onnx")
                for p in self.models_root.rglob(pattern)
                if p.is_file() and not p.name.startswith(".")
            ),
            key=lambda p: -p.stat().st_mtime,
        )
        paths = [str(p.resolve()) for p in found[:MAX_MODELS]]
        return paths if str(self.path) in paths else [str(self.path), *paths]

    def choose(self, path: str) -> None:
        if path not in self.models():  # the page names one of the listed files, never any path
            raise InputError(f"{path} is not one of the models under {self.models_root}")
        self.classifier, self.path = Classifier(Path(path)), Path(path)

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
            "model": str(self.path),
            "ms": round(1000 * (time.perf_counter() - start), 1),
        }


async def body_of(request: Request) -> bytes:
    """The request's body, refused beyond MAX_BODY bytes before more is read."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise InputError(f"an image of more than {MAX_BODY // 2**20} MB: scale it down")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise InputError(f"an image of more than {MAX_BODY // 2**20} MB: scale it down")
        chunks.append(chunk)
    return b"".join(chunks)


def app_for(demo: Demo) -> Starlette:
    page = PAGE.read_text()

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def predict(request: Request) -> JSONResponse:
        try:
            return JSONResponse(demo.answer(await body_of(request), request.query_params.get("distortion", "clean")))
        except InputError as e:
            return JSONResponse({"error": str(e)}, status_code=400)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(
            {"models": demo.models(), "current": str(demo.path), "distortions": list(CHOICES), "max_body": MAX_BODY}
        )

    async def choose(request: Request) -> JSONResponse:
        try:
            demo.choose((await request.json()).get("model", ""))
        except InputError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except ValueError:
            return JSONResponse({"error": 'send {"model": <one of /api/models>}'}, status_code=400)
        return JSONResponse({"current": str(demo.path)})

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/predict", predict, methods=["POST"]),
            Route("/api/models", models),
            Route("/api/model", choose, methods=["POST"]),
        ]
    )


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
        demo = Demo(args.ckpt, args.models or default_models_root(args.ckpt))
        port = args.port or free_port(args.host)
    import uvicorn

    print(f"mnist_lab demo of {demo.path}: http://{args.host}:{port}/  (Ctrl-C stops it)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"Serving every network on {args.host}: anyone who can reach this machine can use the page.",
            file=sys.stderr,
        )
    uvicorn.run(app_for(demo), host=args.host, port=port, log_level="warning")


def default_models_root(checkpoint: Path) -> Path:
    """outputs/ when the checkpoint is under it, else the folder its run lives in."""
    resolved = checkpoint.resolve()
    for parent in resolved.parents:
        if parent.name == "outputs":
            return parent
    return resolved.parent.parent if resolved.parent.name == "checkpoints" else resolved.parent


if __name__ == "__main__":
    main()

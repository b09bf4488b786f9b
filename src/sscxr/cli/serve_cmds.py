"""`sscxr serve`: a trained classifier (and lung segmenter) as a local HTTP service with a browser page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sscxr.cli.argtypes import int_at_least

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g}: the upload limit must be positive")
    return value


def _port(text: str) -> int:
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value}: a TCP port is at most 65535")
    return value


def _serve(args: argparse.Namespace) -> int:
    from sscxr.errors import ConfigError

    try:
        import uvicorn

        from sscxr.serve.app import ServeOptions, create_app, load_models
    except ImportError as e:
        raise ConfigError(
            f"sscxr serve needs FastAPI, uvicorn and python-multipart ({e}); install them with "
            "pip install 'sscxr[serve]'"
        ) from None

    options = ServeOptions(
        max_upload_mb=args.max_upload_mb, threshold=args.threshold, keep_uploads=args.keep_uploads,
        device=args.device, precision=args.precision, postprocess=args.postprocess,
    )  # fmt: skip
    app = create_app(load_models(args.model, args.segmenter), options)
    if args.host not in _LOCAL_HOSTS:
        print(
            f"warning: listening on {args.host}, not only on this machine: anyone who can reach port "
            f"{args.port} can upload images and read the answers (there is no authentication)",
            file=sys.stderr,
        )
    if args.keep_uploads is not None:
        print(f"note: every upload is kept in {args.keep_uploads}", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.model} on http://{host}:{args.port}/ (API schema: /openapi.json; Ctrl+C stops)")
    # One process: the models are loaded once and requests share them under a lock. uvicorn logs
    # through the root logger the CLI configured; its access log is off (the app logs each request).
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `serve` subcommand."""
    p = sub.add_parser(
        "serve",
        help="a local HTTP service: JSON API (/predict, /segment, /explain) and a drag-and-drop page",
        description=(
            "Serves a trained classifier over HTTP: GET / (a page: drop an X-ray, see the probabilities "
            "and the attention heat maps), GET /health, POST /predict, /segment (with --segmenter) and "
            "/explain with the image in the multipart field 'file'; the API is described at /openapi.json. "
            "Uploads are deleted once answered unless --keep-uploads is given. Listens on 127.0.0.1 only "
            "unless --host says otherwise. Example: sscxr serve runs/finetune/ss-cxr --segmenter "
            "runs/segment/lungs --port 8000"
        ),
    )
    p.add_argument(
        "model", type=Path, help="a trained classifier: a fine-tuning run folder or its model.json"
    )
    p.add_argument("--segmenter", type=Path, help="a lung segmenter (run folder): enables /segment and lungs")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, local only)"
    )
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default: 8000)")
    p.add_argument(
        "--max-upload-mb", type=_megabytes, default=20.0, help="largest accepted upload in MB (default: 20)"
    )
    p.add_argument(
        "--threshold", default=None,
        help="binary models: a threshold of the model by name (default: 'default') or a number in [0, 1]",
    )  # fmt: skip
    p.add_argument(
        "--keep-uploads", type=Path, default=None, metavar="DIR",
        help="keep a copy of every upload in DIR (default: nothing stays on disk)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp32")
    p.add_argument(
        "--postprocess", action="store_true", help="masks: keep the two largest components, fill holes"
    )
    p.set_defaults(func=_serve)

"""`sscxr serve`: a local HTTP service (JSON API and one self-contained browser page) around a trained
classifier and, optionally, a lung segmenter. Needs the `serve` extra (FastAPI, uvicorn)."""

from sscxr.serve.app import Models, ServeOptions, create_app, load_models

__all__ = ["Models", "ServeOptions", "create_app", "load_models"]

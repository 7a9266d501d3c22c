"""``livekv serve``: long-context chat (OpenAI-compatible) and live video sessions over HTTP, SSE and WebSocket.

Serving never imports evaluation or training code (``livekv.evals``, ``livekv.bench``, ``livekv.vlm.train``).
FastAPI and uvicorn (the ``serve`` extra) are imported only when a server is made."""

from livekv.serve.config import ServeConfig


def create_app(config: ServeConfig, models=None):
    """The FastAPI application (``livekv.serve.app.create_app``)."""
    from livekv.serve.app import create_app as make

    return make(config, models)


def run(config: ServeConfig, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (live sessions are snapshotted into ``--state-dir`` on the way out)."""
    import uvicorn

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=log_level)


__all__ = ["ServeConfig", "create_app", "run"]

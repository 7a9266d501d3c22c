"""``livekv serve``: long-context chat (OpenAI-compatible) and live video sessions over HTTP, SSE and WebSocket.

Serving never imports evaluation or training code (``livekv.evals``, ``livekv.bench``, ``livekv.vlm.train``)."""

from livekv.serve.app import create_app
from livekv.serve.config import ServeConfig


def run(config: ServeConfig, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (live sessions are snapshotted into ``--state-dir`` on the way out)."""
    import uvicorn

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=log_level)


__all__ = ["ServeConfig", "create_app", "run"]

"""sotserve's HTTP server: OpenAI-compatible chat and completions, metrics, web page."""

from engine.serving import Security, ServerLimits
from sotserve.server.app import add_server_args, build_app, serve

__all__ = ["Security", "ServerLimits", "add_server_args", "build_app", "serve"]

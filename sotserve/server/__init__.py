"""sotserve's HTTP server: OpenAI-compatible chat and completions, metrics, web page."""

from sotserve.server.app import add_server_args, build_app, serve
from sotserve.server.limits import ServerLimits

__all__ = ["ServerLimits", "add_server_args", "build_app", "serve"]

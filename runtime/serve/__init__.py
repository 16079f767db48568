"""The OpenAI-compatible HTTP server on the engine (`fuselm serve`): protocol, app, metrics, server."""

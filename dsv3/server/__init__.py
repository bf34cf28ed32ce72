"""`dsv3 serve`: an OpenAI-compatible HTTP server over the serving engine (dsv3.serving.AsyncEngine).

protocol.py holds the request and response models, chat_template.py renders chat messages, reasoning.py and
tool_parser.py split the model's output, metrics.py exports Prometheus metrics, handlers.py runs requests
through the engine and app.py routes HTTP to them. The HTTP layer only translates and streams; the engine
owns scheduling and the cache.
"""

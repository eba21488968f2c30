"""The inference service: an ASGI app over the same pipeline as ``medseg predict``.

``app`` (routes), ``jobs`` (SQLite job store shared by processes), ``worker`` (loads the model once and
runs jobs), ``uploads`` (streamed, capped, sniffed uploads and safe zip extraction), ``auth`` (bearer
tokens, rate limit), ``metrics`` (Prometheus), ``audit`` (who did what, no patient data) and ``server``
(uvicorn). Nothing in the pipeline imports this package.
"""

"""The HTTP feature server: the read client (`state.client.FeatureClient`) behind an ASGI app.

    request --HTTP--> granian worker process --ASGI--> FeatureServer --> FeatureClient --> views

`python -m flows.serve` starts it (`runner.serve`); each worker process builds its own app and
client from a `ServeConfig` (`config.py`); `app.py` routes and answers; `requests.py` turns a
request body into checked read arguments; `catalog.py` describes the views and the health;
`metrics.py` counts requests for Prometheus. No endpoint writes.
"""

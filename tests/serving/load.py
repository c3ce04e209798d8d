"""Steady HTTP load for serving tests: clients post the same rows until stopped."""

import threading
from typing import Any

import httpx


class Load:
    """`threads` clients posting `rows` to digits-mlp; one (status, model_version, predictions)
    record per request (version and predictions are None unless the status is 200)."""

    def __init__(self, url: str, rows: list, threads: int) -> None:
        self.url, self.rows, self.stop = url, rows, threading.Event()
        self.results: list[tuple[Any, Any, Any]] = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(
                        f"{self.url}/v1/models/digits-mlp:predict", json={"instances": self.rows}
                    )
                    body = r.json() if r.status_code == 200 else {}
                    self.results.append(
                        (r.status_code, body.get("model_version"), body.get("predictions"))
                    )
                except (httpx.HTTPError, ValueError) as exc:  # a proxy error page is not JSON
                    self.results.append((type(exc).__name__, None, None))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

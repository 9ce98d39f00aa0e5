"""A small MONAI Label REST client on the standard library (the main environment has no requests/httpx)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

__all__ = ["Client", "Response"]


class Response:
    """Status, headers and body of one HTTP exchange."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body.decode())

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Client:
    """MONAI Label server at ``base`` (e.g. ``http://127.0.0.1:8000``)."""

    def __init__(self, base: str, timeout: float = 600.0) -> None:
        self.base = base.rstrip("/")
        self.timeout = timeout

    def request(
        self, method: str, path: str, query: dict[str, Any] | None = None, body: bytes | None = None,
        content_type: str | None = None,
    ) -> Response:
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        req = urllib.request.Request(url, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return Response(r.status, dict(r.headers), r.read())
        except urllib.error.HTTPError as e:
            return Response(e.code, dict(e.headers), e.read())

    def info(self) -> Response:
        return self.request("GET", "/info/")

    def put_label(
        self, image: str, data: bytes, filename: str = "label.png", tag: str = "final",
        params: dict[str, Any] | None = None,
    ) -> Response:
        """``PUT /datastore/label``: save a label for an image."""
        body, ctype = _multipart({"params": json.dumps(params or {})}, {"label": (filename, data)})
        return self.request("PUT", "/datastore/label", {"image": image, "tag": tag}, body, ctype)

    def put_image(self, image: str, data: bytes, filename: str) -> Response:
        """``PUT /datastore/?image=<id>``: upload a new image."""
        body, ctype = _multipart({}, {"file": (filename, data)})
        return self.request("PUT", "/datastore/", {"image": image}, body, ctype)

    def train(self, model: str, params: dict[str, Any]) -> Response:
        """``POST /train/<model>`` with the training options as the JSON body."""
        body = json.dumps(params).encode()
        return self.request("POST", f"/train/{model}", body=body, content_type="application/json")

    def train_status(self) -> Response:
        return self.request("GET", "/train/")

    def infer(self, model: str, image: str) -> Response:
        """``POST /infer/<model>?image=<id>&output=image``: the result label file."""
        body, ctype = _multipart({"params": "{}"}, {})
        return self.request("POST", f"/infer/{model}", {"image": image, "output": "image"}, body, ctype)

    def next_sample(self, strategy: str, params: dict[str, Any] | None = None) -> Response:
        """``POST /activelearning/<strategy>``: the next image to label."""
        body = json.dumps(params or {}).encode()
        return self.request("POST", f"/activelearning/{strategy}", body=body, content_type="application/json")

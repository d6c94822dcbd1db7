"""A thin HTTP client for the ModelPress API: auth, retries that are safe, errors as exceptions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_KEY = "mp-local-dev-key"  # the embedded default's documented local key (dev / test only)
# Errors where the request surely or probably never reached the application: safe to retry when the
# request is a read or carries an Idempotency-Key.
_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
              httpx.WriteError, httpx.PoolTimeout)


class ApiError(Exception):
    """The API answered with an error (`{"error": {"code", "message", "details"}}`)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            return cls(response.status_code, str(error.get("code", "error")), str(error.get("message", "")),
                       error.get("details"))
        text = response.text.strip()[:500] or response.reason_phrase
        return cls(response.status_code, "http_error", f"HTTP {response.status_code}: {text}")


class Unreachable(Exception):
    """No HTTP answer at all: connection refused, DNS failure, timeout."""

    def __init__(self, url: str, cause: BaseException):
        reason = str(cause) or type(cause).__name__
        super().__init__(f"cannot reach the ModelPress API at {url}: {reason}")
        self.url = url


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        # Not the API (a proxy page, a wrong --url): a service problem, not the user's input.
        raise ApiError(502, "bad_response", f"{response.request.method} {response.request.url} answered "
                       f"HTTP {response.status_code} without JSON; is --url the ModelPress API?") from None


@dataclass
class Client:
    """One per invocation. `idempotency_key` is sent with every create, so a retried upload or job
    submission returns the first one's object instead of a second one."""

    url: str = DEFAULT_URL
    api_key: str = DEFAULT_KEY
    retries: int = 2
    timeout_s: float = 120.0
    idempotency_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    _http: httpx.Client | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(
                base_url=self.url, timeout=httpx.Timeout(self.timeout_s, connect=10.0),
                headers={"Authorization": f"Bearer {self.api_key}", "User-Agent": "modelpress-cli"},
            )
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    # -- plumbing -------------------------------------------------------------------------------

    def _send(self, build: Callable[[], httpx.Request], *, retry: bool) -> httpx.Response:
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            try:
                response = self.http.send(build())
            except _RETRYABLE as exc:
                if attempt + 1 >= attempts:
                    raise Unreachable(self.url, exc) from exc
                time.sleep(0.5 * 2**attempt)
                continue
            except httpx.TimeoutException as exc:
                raise Unreachable(self.url, exc) from exc
            except httpx.HTTPError as exc:
                raise Unreachable(self.url, exc) from exc
            if response.status_code >= 400:
                raise ApiError.from_response(response)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, path: str, **params: Any) -> Any:
        params = {k: v for k, v in params.items() if v is not None}
        timeout = self.timeout_s + float(params.get("wait", 0))
        return _json(self._send(lambda: self.http.build_request("GET", path, params=params, timeout=timeout),
                                retry=True))

    def post_json(self, path: str, payload: dict[str, Any] | None = None, *, idempotent: bool = False) -> Any:
        headers = {"Idempotency-Key": self.idempotency_key} if idempotent else {}
        return _json(self._send(lambda: self.http.build_request("POST", path, json=payload, headers=headers),
                                retry=idempotent))

    def upload(self, path: str, file: Path, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Multipart upload of `file`; (status code, body). The file is reopened for each attempt."""
        headers = {"Idempotency-Key": f"{self.idempotency_key}{path.replace('/', '-')}"}
        handles: list[Any] = []

        def build() -> httpx.Request:
            handle = file.open("rb")
            handles.append(handle)
            files = {"file": (file.name, handle, "application/octet-stream")}
            return self.http.build_request("POST", path, files=files, data=form, headers=headers,
                                           timeout=httpx.Timeout(max(self.timeout_s, 600.0), connect=10.0))

        try:
            response = self._send(build, retry=True)
        finally:
            for handle in handles:
                handle.close()
        return response.status_code, _json(response)

    @contextmanager
    def stream(self, path: str, *, headers: dict[str, str] | None = None, read_timeout: float | None = None,
               ) -> Iterator[httpx.Response]:
        """A streamed GET (SSE, downloads). Errors are raised before the body is read."""
        timeout = httpx.Timeout(self.timeout_s, connect=10.0, read=read_timeout or self.timeout_s)
        try:
            with self.http.stream("GET", path, headers=headers or {}, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError.from_response(response)
                yield response
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise Unreachable(self.url, exc) from exc

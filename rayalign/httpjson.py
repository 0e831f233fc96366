"""One JSON-over-HTTP POST with retries, for every remote service rayalign calls
(OpenAI-compatible labelers, reward endpoints)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


def post_json(url: str, body: dict[str, Any], error: type[Exception], api_key: str | None = None,
              timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5) -> Any:
    """POST ``body`` as JSON; the decoded answer. Timeouts, connection errors, 429 and
    5xx are retried with exponential back-off; any other 4xx is the request's fault and
    raises ``error`` at once with the server's words, as does an answer that is not JSON."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    last: Exception | None = None
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                raw = resp.read()
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise error(f"{url} answered with non-JSON: {raw[:200]!r}") from None
        except urllib.error.HTTPError as exc:
            last = exc
            if exc.code < 500 and exc.code != 429:
                detail = exc.read().decode(errors="replace")[:300]
                refused = error(f"{url} refused the request: HTTP {exc.code}: {detail}")
                refused.status = exc.code  # the request's fault, not the service's: callers may say so
                raise refused from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            last = exc
        if attempt < retries:
            time.sleep(backoff_s * 2 ** attempt)
    raise error(f"{url}: no answer after {retries + 1} tries ({last})")

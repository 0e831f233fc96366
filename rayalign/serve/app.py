"""The Aligner as a Ray Serve application with a FastAPI ingress.

Every way of running it goes through one description, the Serve config
(:func:`serve_config`): ``rayalign serve`` builds it and deploys it with
:func:`deploy`; ``rayalign serve --write-config`` writes the same document for
``serve deploy`` or a KubeRay ``RayService``, whose ``import_path`` is
:func:`app_builder` here.

Requests are validated before they reach the model (size, UTF-8, JSON, schema, token
limits): bad input gets a 4xx JSON error and never disturbs the batch other requests
share. Items of all requests are generated together with continuous batching: the
replica's engine thread steps one running batch (:class:`~rayalign.serve.engine.Scheduler`),
which an item joins at any decode step and leaves when it ends, while the event loop keeps
accepting requests and streams each item's text as it comes.
"""
# No `from __future__ import annotations`: FastAPI must see the route parameters' real
# types (a string annotation `Request` through Serve's ingress becomes a query field).
import asyncio
import hmac
import itertools
import json
import logging
import os
import threading
import time
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator
from ray import serve

from ..config import ServeConfig, UpstreamConfig
from .engine import Scheduler

logger = logging.getLogger("ray.serve")

API_VERSION = "1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _text(v: str, name: str) -> str:
    if not v.strip():
        raise ValueError(f"{name} is empty")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode (lone surrogate)") from None
    return v


class Item(_Strict):
    question: StrictStr = Field(..., description="the user's question")
    answer: StrictStr = Field(..., description="the upstream model's answer to correct")

    @field_validator("question", "answer")
    @classmethod
    def _nonempty(cls, v, info):
        return _text(v, info.field_name)


class Options(_Strict):
    max_new_tokens: Optional[int] = Field(None, ge=1, description="at most the server's max_new_tokens")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)


class CorrectRequest(Options):
    question: Optional[StrictStr] = Field(None, description="single form: one question ...")
    answer: Optional[StrictStr] = Field(None, description="... and its answer")
    items: Optional[list[Item]] = Field(None, description="batch form: several {question, answer}")
    stream: bool = Field(False, description="single form: the correction as server-sent events, token by "
                         "token, in OpenAI's chat.completion.chunk format")

    @field_validator("question", "answer")
    @classmethod
    def _nonempty(cls, v, info):
        return v if v is None else _text(v, info.field_name)


class GenerateRequest(Options):
    question: StrictStr

    @field_validator("question")
    @classmethod
    def _nonempty(cls, v, info):
        return _text(v, info.field_name)


class _Open(BaseModel):
    # OpenAI clients send fields this proxy has no use for (user, seed, stream_options, ...):
    # ignored, as OpenAI-compatible servers do; the ones it uses are checked.
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Open):
    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[ContentPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(_Open):
    model: Optional[StrictStr] = Field(None, description="ignored: the upstream is the server's serve.upstream")
    messages: list[ChatMessage] = Field(..., min_length=1, description="the conversation, sent to the upstream; "
                                        "the Aligner corrects the answer to the last user message")
    stream: bool = False
    max_tokens: Optional[int] = Field(None, ge=1, description="the upstream answer's length")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="same as max_tokens")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="the upstream's sampling")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, description="the upstream's sampling")
    n: int = Field(1, ge=1, le=1, description="one choice")


MAX_JSON_DEPTH = 32  # the schemas need 3 levels; json.loads recurses once per level


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in a JSON text (brackets inside strings do not
    count), found without parsing, so a pathological body never reaches the parser."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, detail: Any = None):
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail


def request_id(request: Optional[Request] = None) -> str:
    """Serve's id of the request being answered: the client's ``X-Request-ID`` or one the
    proxy made; Serve returns it as the ``X-Request-ID`` header and puts it in every log
    line of the request."""
    from ray.serve.context import _get_serve_request_context

    rid = _get_serve_request_context().request_id
    if not rid and request is not None:
        rid = request.headers.get("x-request-id", "")
    return rid


def _error(status: int, message: str, detail: Any = None, headers: dict | None = None,
           request: Optional[Request] = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"status": status, "message": message, "request_id": request_id(request)}}
    if detail is not None:
        body["error"]["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def chunk(cid: str, created: int, model: str, delta: dict, finish: Optional[str] = None, **extra) -> dict:
    """One OpenAI ``chat.completion.chunk``."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]} | extra


api = FastAPI(
    title="rayalign Aligner",
    version=API_VERSION,
    description="Corrects the answers of any upstream model: question + answer -> corrected answer.",
)


# The routes read their bodies themselves (size, UTF-8, depth, then the schema), so FastAPI
# does not see them: their schemas, and the error body every 4xx/5xx has, are added to the
# OpenAPI document here, which is what clients and the fuzz tests generate requests from.
BODIES = {"/v1/correct": CorrectRequest, "/v1/generate_and_correct": GenerateRequest,
          "/v1/chat/completions": ChatRequest}


class ErrorBody(BaseModel):
    class Error(BaseModel):
        status: int
        message: str
        request_id: str
        detail: Optional[Any] = None

    error: Error


def _openapi() -> dict[str, Any]:
    if api.openapi_schema:
        return api.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    ref = "#/components/schemas/{model}"
    for model in (*BODIES.values(), ErrorBody):
        js = model.model_json_schema(ref_template=ref)
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
    error = {"description": "error", "content": {"application/json": {
        "schema": {"$ref": ref.format(model="ErrorBody")}}}}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path in BODIES and method == "post":
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": ref.format(model=BODIES[path].__name__)}}}}
            op.setdefault("responses", {})["4XX"] = error
    api.openapi_schema = doc
    return doc


api.openapi = _openapi


@api.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError):
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return _error(exc.status, exc.message, exc.detail, headers, request)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    # The replica keeps serving; the client gets JSON, the log gets the traceback.
    logger.exception("request failed")
    return _error(500, f"internal error: {type(exc).__name__}", request=request)


@api.exception_handler(404)
@api.exception_handler(405)
async def _no_route(request: Request, exc: Exception):
    status = getattr(exc, "status_code", 404)
    words = "no such route" if status == 404 else f"{request.method} is not allowed here"
    return _error(status, f"{words}: {request.url.path}", request=request)


class Metrics:
    """The replica's Prometheus metrics, through Ray Serve's metrics (exported by each
    node's Ray metrics agent with Serve's deployment and replica tags)."""

    LATENCY = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]

    def __init__(self):
        from ray.serve import metrics as m

        self.requests = m.Counter("rayalign_requests", "HTTP requests answered, by route and status",
                                  tag_keys=("route", "status"))
        self.latency = m.Histogram("rayalign_request_latency_s", "request start to its last byte",
                                   boundaries=self.LATENCY, tag_keys=("route",))
        self.ttft = m.Histogram("rayalign_time_to_first_token_s", "request start to its first generated text",
                                boundaries=self.LATENCY, tag_keys=("route",))
        self.batch = m.Histogram("rayalign_batch_size", "rows decoded together, per engine step",
                                 boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.queue = m.Gauge("rayalign_queue_depth", "items waiting to join the running batch")
        self.tokens = m.Counter("rayalign_tokens", "tokens in (prompts) and out (corrections)",
                                tag_keys=("direction",))


_metrics: list[Metrics] = []


def metrics() -> Metrics:
    """This replica's metrics, made on first use. (A module function: the deployment
    class reaches the replica pickled by value, with its own copy of this module's
    globals, so a global it assigned would not be the one the middleware reads.)"""
    if not _metrics:
        _metrics.append(Metrics())
    return _metrics[0]


def route_of(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


@api.middleware("http")
async def _observe(request: Request, call_next):
    """Counts every answer by route and status and times it to its last byte."""
    t0 = time.perf_counter()
    response = await call_next(request)
    m, route, status = metrics(), route_of(request), str(response.status_code)
    body = response.body_iterator

    async def timed():
        try:
            async for part in body:
                yield part
        finally:
            m.requests.inc(tags={"route": route, "status": status})
            m.latency.observe(time.perf_counter() - t0, tags={"route": route})

    response.body_iterator = timed()
    return response


class UpstreamError(RuntimeError):
    pass


def ask_upstream(up: UpstreamConfig, messages: list[dict], max_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_p: Optional[float] = None) -> str:
    """One chat completion from an OpenAI-compatible endpoint; unset settings are the
    server's ``serve.upstream`` ones."""
    from ..httpjson import post_json

    key = os.environ.get(up.api_key_env) if up.api_key_env else None
    body = {"model": up.model, "messages": messages, "max_tokens": max_tokens or up.max_tokens,
            "temperature": up.temperature if temperature is None else temperature}
    if top_p is not None:
        body["top_p"] = top_p
    res = post_json(up.url.rstrip("/") + "/chat/completions", body, UpstreamError, key, up.timeout_s, up.retries)
    try:
        return str(res["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        raise UpstreamError(f"upstream {up.url} answered without choices[0].message.content") from None


@serve.deployment
@serve.ingress(api)
class AlignerServer:
    def __init__(self, checkpoint: str, settings: dict[str, Any]):
        self.s = ServeConfig.model_validate(settings)
        self.token = os.environ.get(self.s.auth_token_env) if self.s.auth_token_env else None
        self.metrics = metrics()
        self.listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.keys = itertools.count()
        self.served = 0
        self.steps = 0
        self.step_rows = 0  # rows decoded, summed over steps: / steps = the mean batch
        self.engine_s = 0.0  # time inside the engine: beside wall time, what serving around it costs
        self.wake = threading.Event()
        self.stopping = False
        # The engine is built, warmed up and run on one thread of its own. CPU torch runs
        # its parallel regions on the OpenMP team of the thread that first asks; a second
        # thread gets a second team that competes with the first for the cores: measured
        # here, a batch-1 decode step 1.7x slower, and a bare 1x576 @ 576x1536 4x slower.
        ready: dict[str, Any] = {}
        started = threading.Event()
        self.thread = threading.Thread(target=self._run_engine, args=(checkpoint, ready, started),
                                       name="aligner-engine", daemon=True)
        self.thread.start()
        if not started.wait(self.s.request_timeout_s + 600):
            raise TimeoutError(f"the Aligner engine did not start within {self.s.request_timeout_s + 600:.0f} s")
        if "error" in ready:
            raise ready["error"]
        self.engine, self.sched = ready["engine"], ready["sched"]

    def __del__(self):
        self.stopping = True

    # ------------------------------------------------------------ the engine thread

    def _run_engine(self, checkpoint: str, ready: dict, started: threading.Event) -> None:
        """Builds the engine, then steps the scheduler while rows run or wait, and hands
        each event to the event loop of the request it belongs to."""
        from .engine import make_engine

        try:
            engine = make_engine(self.s, checkpoint)
            engine.correct([("Warm-up question?", "Warm-up answer.")], max_new_tokens=2)
            ready["engine"] = engine
            ready["sched"] = self.sched = Scheduler(engine, self.s.max_batch_size, self.s.batch_wait_timeout_s)
        except BaseException as exc:
            ready["error"] = exc
            return
        finally:
            started.set()
        while not self.stopping:
            wait = self.sched.ready_in() if not len(self.sched) else 0.0
            if wait > 0:
                self.wake.wait(min(wait, 1.0))
                self.wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                events = self.sched.step()
            except Exception:  # the scheduler isolates engine failures; this would be its own bug
                logger.exception("the engine loop failed a step")
                time.sleep(0.1)
                continue
            self.engine_s += time.perf_counter() - t0
            rows = len(self.sched) + sum(1 for _, e in events if "result" in e or "error" in e)
            if rows:
                self.steps += 1
                self.step_rows += rows
                self.metrics.batch.observe(rows)
            self.metrics.queue.set(self.sched.waiting())
            for key, e in events:
                if "result" in e:
                    self.metrics.tokens.inc(e["result"]["new_tokens"], tags={"direction": "out"})
                to = self.listeners.get(key)
                if to is not None:
                    to[0].call_soon_threadsafe(to[1].put_nowait, e)

    # ------------------------------------------------------------ checks

    def _auth(self, request: Request) -> None:
        if not self.token:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise HTTPError(401, "missing or wrong bearer token" if got else "this server needs "
                            "`Authorization: Bearer <token>`")

    async def _body(self, request: Request, schema: type[BaseModel]) -> BaseModel:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.s.max_body_bytes:
            raise HTTPError(413, f"body of {declared} bytes exceeds the limit of {self.s.max_body_bytes}")
        raw = bytearray()
        async for chunk in request.stream():  # a lying or absent Content-Length is caught here
            raw += chunk
            if len(raw) > self.s.max_body_bytes:
                raise HTTPError(413, f"body exceeds the limit of {self.s.max_body_bytes} bytes")
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HTTPError(400, f"body is not valid UTF-8 (byte {exc.start})") from None
        depth = json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise HTTPError(400, f"body nests {depth} levels deep, over the limit of {MAX_JSON_DEPTH}")
        try:
            obj = json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc.msg} at position {exc.pos}") from None
        except ValueError as exc:  # NaN / Infinity: not JSON (RFC 8259), though Python reads them
            raise HTTPError(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise HTTPError(422, "body must be a JSON object")
        try:
            return schema.model_validate(obj)
        except ValidationError as exc:
            detail = [{"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"]}
                      for e in exc.errors()]
            raise HTTPError(422, "invalid request: " + "; ".join(f"{d['field']}: {d['message']}" for d in detail),
                            detail) from None

    def _options(self, req: Options) -> tuple[int, float, float]:
        n = req.max_new_tokens or self.s.max_new_tokens
        if n > self.s.max_new_tokens:
            raise HTTPError(422, f"max_new_tokens {n} exceeds this server's limit of {self.s.max_new_tokens}")
        return n, req.temperature, req.top_p

    def _check_items(self, items: list[tuple[str, str]], count: bool = True) -> None:
        if len(items) > self.s.max_items:
            raise HTTPError(422, f"{len(items)} items exceed this server's limit of {self.s.max_items} per request")
        total = 0
        for i, (q, a) in enumerate(items):
            n = self.engine.input_tokens(q, a)
            if n > self.s.max_input_tokens:
                where = f"item {i}: " if len(items) > 1 else ""
                raise HTTPError(422, f"{where}question + answer take {n} tokens, over the limit of "
                                f"{self.s.max_input_tokens}")
            total += n
        if count:
            self.metrics.tokens.inc(total, tags={"direction": "in"})

    async def _events(self, question: str, answer: str, opts: tuple, t0: float, route: str):
        """One item's events, up to and including its end, within the request timeout. A
        request that goes away (timeout, closed stream) leaves the batch at the next step."""
        key = f"{request_id()}/{next(self.keys)}"  # the request id names the row in the engine's log lines
        queue: asyncio.Queue = asyncio.Queue()
        self.listeners[key] = (asyncio.get_running_loop(), queue)
        self.sched.add(key, (question, answer), opts)
        self.wake.set()
        first = True
        try:
            while True:
                left = t0 + self.s.request_timeout_s - time.perf_counter()
                try:
                    e = await asyncio.wait_for(queue.get(), max(left, 0.001))
                except TimeoutError:
                    raise HTTPError(504, f"no answer within the request timeout of {self.s.request_timeout_s} s") from None
                if first and (e.get("delta") or "result" in e):
                    self.metrics.ttft.observe(time.perf_counter() - t0, tags={"route": route})
                    first = False
                yield e
                if "result" in e or "error" in e:
                    return
        finally:
            del self.listeners[key]
            self.sched.cancel(key)

    async def _correct(self, items: list[tuple[str, str]], opts: tuple, route: str) -> list[dict]:
        t0 = time.perf_counter()

        async def one(q, a):
            async for e in self._events(q, a, opts, t0, route):
                if "result" in e or "error" in e:
                    return e
            return {"error": "generation ended without a result"}

        res = await asyncio.gather(*[one(q, a) for q, a in items])
        bad = [(i, r["error"]) for i, r in enumerate(res) if "error" in r]
        if bad:
            where = f"item {bad[0][0]}: " if len(items) > 1 else ""
            raise HTTPError(422, f"{where}this input could not be generated ({bad[0][1]})")
        return [r["result"] for r in res]

    async def _stream(self, question: str, answer: str, opts: tuple, route: str, cid: str, model: str,
                      head: Optional[dict] = None):
        """The correction as OpenAI chunks; checked before the first byte, so a bad request
        still gets its 4xx. An item that fails alone after that ends with an error event."""
        t0, created = time.perf_counter(), int(time.time())
        events = self._events(question, answer, opts, t0, route)
        first = await events.__anext__()  # (a 504 or 4xx from here is an ordinary error response)

        async def body():
            yield _sse(chunk(cid, created, model, {"role": "assistant", "content": ""}, **(head or {})))
            e = first
            while True:
                if "error" in e:
                    yield _sse({"error": {"status": 422, "message": f"this input could not be generated ({e['error']})",
                                          "request_id": request_id()}})
                    break
                if e.get("delta"):
                    yield _sse(chunk(cid, created, model, {"content": e["delta"]}))
                if "result" in e:
                    r = e["result"]
                    yield _sse(chunk(cid, created, model, {}, "length" if r["truncated"] else "stop",
                                     rayalign={"copied": r["copied"], "new_tokens": r["new_tokens"]}))
                    break
                try:
                    e = await events.__anext__()
                except StopAsyncIteration:
                    break
                except HTTPError as exc:
                    yield _sse({"error": {"status": exc.status, "message": exc.message, "request_id": request_id()}})
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _info(self) -> dict[str, Any]:
        return {"model": self.engine.name, "template_version": self.engine.template.version,
                "engine": self.engine.kind, "request_id": request_id()}

    # ------------------------------------------------------------ routes

    @api.post("/v1/correct", summary="Correct one answer (question, answer) or a batch (items)")
    async def correct(self, request: Request):
        self._auth(request)
        req = await self._body(request, CorrectRequest)
        single = req.items is None
        if single:
            if req.question is None or req.answer is None:
                raise HTTPError(422, "give question and answer, or items: [{question, answer}, ...]")
            items = [(req.question, req.answer)]
        else:
            if req.question is not None or req.answer is not None:
                raise HTTPError(422, "give either question and answer, or items, not both")
            if not req.items:
                raise HTTPError(422, "items is empty")
            items = [(it.question, it.answer) for it in req.items]
        opts = self._options(req)
        self._check_items(items)
        if req.stream:
            if not single:
                raise HTTPError(422, "stream takes the single form (question and answer), not items")
            self.served += 1
            return await self._stream(items[0][0], items[0][1], opts, route_of(request),
                                      "corr-" + request_id(request), self.engine.name)
        t0 = time.perf_counter()
        res = await self._correct(items, opts, route_of(request))
        self.served += len(items)
        meta = self._info() | {"latency_s": round(time.perf_counter() - t0, 4)}
        if single:
            return res[0] | meta
        return {"corrections": res} | meta

    @api.post("/v1/generate_and_correct", summary="Ask the configured upstream model, then correct its answer")
    async def generate_and_correct(self, request: Request):
        self._auth(request)
        if self.s.upstream is None:
            raise HTTPError(404, "no upstream model is configured (serve.upstream)")
        req = await self._body(request, GenerateRequest)
        opts = self._options(req)
        self._check_items([(req.question, "")], count=False)  # before the upstream is paid for
        answer = await self._upstream([{"role": "user", "content": req.question}])
        self._check_items([(req.question, answer)])
        res = await self._correct([(req.question, answer)], opts, route_of(request))
        return {"question": req.question, "answer": answer} | res[0] | self._info()

    async def _upstream(self, messages: list[dict], **settings) -> str:
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(None, lambda: ask_upstream(self.s.upstream, messages, **settings))
        except UpstreamError as exc:
            if 400 <= getattr(exc, "status", 0) < 500:  # it refused what the client sent: the client's to fix
                raise HTTPError(422, f"the upstream model refused this request: {exc}") from None
            raise HTTPError(502, str(exc)) from None
        if not answer.strip():
            raise HTTPError(502, "the upstream model answered with an empty text")
        return answer

    @api.post("/v1/chat/completions", summary="OpenAI-compatible: the upstream's answer, corrected by the Aligner")
    async def chat_completions(self, request: Request):
        """Any OpenAI client pointed here gets the configured upstream's reply to its
        conversation, corrected by the Aligner (which sees the last user message as the
        question), in the OpenAI response shape, streamed or not; the upstream's own
        answer is in ``rayalign.original``."""
        self._auth(request)
        if self.s.upstream is None:
            raise HTTPError(404, "no upstream model is configured (serve.upstream): the proxy needs one")
        req = await self._body(request, ChatRequest)
        users = [m for m in req.messages if m.role == "user"]
        if not users or not users[-1].text().strip():
            raise HTTPError(422, "messages: the conversation needs a non-empty user message")
        question = users[-1].text()
        opts = (self.s.max_new_tokens, 0.0, 1.0)
        self._check_items([(question, "")], count=False)
        answer = await self._upstream([m.model_dump(exclude_none=True) for m in req.messages],
                                      max_tokens=req.max_tokens or req.max_completion_tokens,
                                      temperature=req.temperature, top_p=req.top_p)
        self._check_items([(question, answer)])
        cid, model = "chatcmpl-" + request_id(request), self.s.upstream.model
        extra = {"rayalign": {"original": answer, "aligner": self.engine.name}}
        if req.stream:
            self.served += 1
            return await self._stream(question, answer, opts, route_of(request), cid, model, extra)
        r = (await self._correct([(question, answer)], opts, route_of(request)))[0]
        self.served += 1
        prompt = self.engine.input_tokens(question, answer)
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r["correction"]},
                             "finish_reason": "length" if r["truncated"] else "stop", "logprobs": None}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": r["new_tokens"],
                          "total_tokens": prompt + r["new_tokens"]},
                "rayalign": extra["rayalign"] | {"copied": r["copied"]}}

    @api.get("/healthz", summary="Liveness")
    async def healthz(self):
        if not self.thread.is_alive():
            raise HTTPError(503, "the engine thread has stopped")
        return {"status": "ok", "engine": self.engine.kind, "served_items": self.served, "steps": self.steps,
                "step_rows": self.step_rows, "running": len(self.sched), "waiting": self.sched.waiting(),
                "mean_batch_size": round(self.step_rows / self.steps, 2) if self.steps else None,
                "engine_s": round(self.engine_s, 3)}

    @api.get("/v1/models", summary="The served Aligner and its template version")
    async def models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [{"id": self.engine.name, "object": "model", "owned_by": "rayalign",
                                            "template_version": self.engine.template.version,
                                            "template": self.engine.template.text,
                                            "base_model": self.engine.meta.get("base_model")}]}


# ---------------------------------------------------------------- one description, two launchers

def deployment_options(s: ServeConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
    }
    if not s.gpus_per_replica:
        # CPU replicas on jemalloc with freed pages kept: batches of varying shapes churn
        # hundreds of MB per call, and glibc page-faults them back in every time.
        from ..cluster.group import cpu_allocator_env

        env = cpu_allocator_env()
        if env:
            opts["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    if s.autoscaling:
        opts["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        opts["num_replicas"] = s.replicas
    return opts


def app_builder(args: dict[str, Any]):
    """Serve's application builder (``import_path: rayalign.serve.app:app_builder``):
    ``args`` = the ``serve:`` settings plus ``checkpoint``."""
    return _application(args)


def _application(args: dict[str, Any], env_vars: dict[str, str] | None = None):
    from ..aligner import find_model_dir
    from .engine import resolve_engine

    args = dict(args)
    checkpoint = args.pop("checkpoint", None)
    if not checkpoint:
        raise ValueError("the Aligner application needs args.checkpoint")
    s = ServeConfig.model_validate(args)
    resolve_engine(s.engine, checkpoint, s.gpus_per_replica)  # an engine that cannot serve it fails here
    opts = deployment_options(s)
    if env_vars:
        old = opts["ray_actor_options"].get("runtime_env", {}).get("env_vars", {})
        opts["ray_actor_options"]["runtime_env"] = {"env_vars": old | dict(env_vars)}
    return AlignerServer.options(**opts).bind(str(find_model_dir(checkpoint)), s.model_dump(mode="json"))


def serve_config(s: ServeConfig, checkpoint: str) -> dict[str, Any]:
    """The Serve config document (``serve deploy`` / RayService ``serveConfigV2``)."""
    # nulls kept (a dropped null would come back as its default in the replica)
    args = s.model_dump(mode="json") | {"checkpoint": str(checkpoint)}
    logging = {"log_level": s.log_level, "enable_access_log": s.access_log}
    return {
        "proxy_location": "EveryNode",
        "logging_config": logging,
        "http_options": {"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s + 5},
        "applications": [{
            "name": s.app_name,
            "route_prefix": s.route_prefix,
            "import_path": "rayalign.serve.app:app_builder",
            "args": args,
            "logging_config": logging,
        }],
    }


def deploy(doc: dict[str, Any], forward_env: bool = True, blocking: bool = False):
    """Run a Serve config document on the connected Ray: start the HTTP proxy with its
    ``http_options`` and run each application through :func:`app_builder`, exactly what
    ``serve deploy`` does with the same file. The auth token's value is forwarded from
    this process's environment to the replicas (it is never written into the document)."""
    serve.start(http_options=doc["http_options"], proxy_location=doc.get("proxy_location"),
                logging_config=doc.get("logging_config"))
    handles = []
    for app in doc["applications"]:
        s = ServeConfig.model_validate({k: v for k, v in app["args"].items() if k != "checkpoint"})
        names = [s.auth_token_env, s.upstream.api_key_env if s.upstream else None]
        env = {n: os.environ[n] for n in names if forward_env and n and os.environ.get(n)}
        handles.append(serve.run(_application(app["args"], env), name=app["name"],
                                 route_prefix=app["route_prefix"], blocking=False,
                                 logging_config=app.get("logging_config")))
    if blocking:
        while True:
            time.sleep(3600)
    return handles

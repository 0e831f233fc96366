"""The Aligner as a Ray Serve application with a FastAPI ingress.

Every way of running it goes through one description, the Serve config
(:func:`serve_config`): ``rayalign serve`` builds it and deploys it with
:func:`deploy`; ``rayalign serve --write-config`` writes the same document for
``serve deploy`` or a KubeRay ``RayService``, whose ``import_path`` is
:func:`app_builder` here.

Requests are validated before they reach the model (size, UTF-8, JSON, schema, token
limits): bad input gets a 4xx JSON error and never disturbs the batch other requests
share. Items of all requests are generated together by ``@serve.batch``; the replica's
event loop keeps accepting requests while a batch generates in its worker thread.
"""
# No `from __future__ import annotations`: FastAPI must see the route parameters' real
# types (a string annotation `Request` through Serve's ingress becomes a query field).
import asyncio
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator
from ray import serve

from ..config import ServeConfig, UpstreamConfig

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


def correct_isolated(correct, items: list[tuple[str, str]], *opts) -> list[dict]:
    """``correct(items, *opts)``; if the batch fails, each item is generated again alone, so
    only an item that fails by itself gets ``{"error": ...}`` and the others their answer."""
    try:
        return correct(items, *opts)
    except Exception as exc:
        if len(items) == 1:
            return [{"error": f"{type(exc).__name__}: {str(exc)[:200]}"}]
        logger.warning("a batch of %d failed (%s: %s); its items run one by one", len(items), type(exc).__name__, exc)
    out = []
    for item in items:
        out += correct_isolated(correct, [item], *opts)
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, detail: Any = None):
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail


def _error(status: int, message: str, detail: Any = None, headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"status": status, "message": message}}
    if detail is not None:
        body["error"]["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


api = FastAPI(
    title="rayalign Aligner",
    version=API_VERSION,
    description="Corrects the answers of any upstream model: question + answer -> corrected answer.",
)


@api.exception_handler(HTTPError)
async def _http_error(_request: Request, exc: HTTPError):
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return _error(exc.status, exc.message, exc.detail, headers)


@api.exception_handler(Exception)
async def _internal_error(_request: Request, exc: Exception):
    # The replica keeps serving; the client gets JSON, the log gets the traceback.
    logger.exception("request failed")
    return _error(500, f"internal error: {type(exc).__name__}")


class UpstreamError(RuntimeError):
    pass


def ask_upstream(up: UpstreamConfig, question: str) -> str:
    """One chat completion from an OpenAI-compatible endpoint."""
    from ..httpjson import post_json

    key = os.environ.get(up.api_key_env) if up.api_key_env else None
    body = {"model": up.model, "messages": [{"role": "user", "content": question}],
            "max_tokens": up.max_tokens, "temperature": up.temperature}
    res = post_json(up.url.rstrip("/") + "/chat/completions", body, UpstreamError, key, up.timeout_s, up.retries)
    try:
        return str(res["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        raise UpstreamError(f"upstream {up.url} answered without choices[0].message.content") from None


@serve.deployment
@serve.ingress(api)
class AlignerServer:
    def __init__(self, checkpoint: str, settings: dict[str, Any]):
        from .engine import AlignerEngine

        self.s = ServeConfig.model_validate(settings)
        threads = self.s.threads_per_replica or max(1, int(self.s.cpus_per_replica))
        self.engine = AlignerEngine(checkpoint, self.s.dtype, threads)
        self.token = os.environ.get(self.s.auth_token_env) if self.s.auth_token_env else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aligner-generate")
        self._batch.set_max_batch_size(self.s.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)
        self.engine.correct([("Warm-up question?", "Warm-up answer.")], max_new_tokens=2)
        self.served = 0
        self.batches = 0
        self.batched_items = 0
        self.engine_s = 0.0  # time inside the engine: beside wall time, what serving around it costs

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

    def _check_items(self, items: list[tuple[str, str]]) -> None:
        if len(items) > self.s.max_items:
            raise HTTPError(422, f"{len(items)} items exceed this server's limit of {self.s.max_items} per request")
        for i, (q, a) in enumerate(items):
            n = self.engine.input_tokens(q, a)
            if n > self.s.max_input_tokens:
                where = f"item {i}: " if len(items) > 1 else ""
                raise HTTPError(422, f"{where}question + answer take {n} tokens, over the limit of "
                                f"{self.s.max_input_tokens}")

    # ------------------------------------------------------------ batching

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _batch(self, jobs: list[tuple[str, str, tuple]]) -> list[dict]:
        """Items of every request that arrived together; one generate per option set."""
        loop = asyncio.get_running_loop()
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, opts) in enumerate(jobs):
            groups.setdefault(opts, []).append(i)
        out: list[Any] = [None] * len(jobs)
        for (n, temp, top_p), idx in groups.items():
            items = [(jobs[i][0], jobs[i][1]) for i in idx]
            t0 = time.perf_counter()
            res = await loop.run_in_executor(self.pool, correct_isolated, self.engine.correct, items, n, temp, top_p)
            self.engine_s += time.perf_counter() - t0
            for i, r in zip(idx, res):
                out[i] = r
        self.batches += 1
        self.batched_items += len(jobs)
        # The window of the next batch opens with its first request. After a batch of
        # several, the clients just answered need a round trip to ask again; with the
        # short window the next batch would start without them, and from then on two
        # groups of clients take turns, each turn paying a whole decode. A lone request
        # keeps the short window.
        self._batch.set_batch_wait_timeout_s(
            max(self.s.batch_wait_timeout_s, self.s.rejoin_wait_s) if len(jobs) > 1 else self.s.batch_wait_timeout_s)
        return out

    async def _correct(self, items: list[tuple[str, str]], opts: tuple) -> list[dict]:
        try:
            res = await asyncio.wait_for(asyncio.gather(*[self._batch((q, a, opts)) for q, a in items]),
                                         self.s.request_timeout_s)
        except TimeoutError:
            raise HTTPError(504, f"no answer within the request timeout of {self.s.request_timeout_s} s") from None
        bad = [(i, r["error"]) for i, r in enumerate(res) if "error" in r]
        if bad:
            where = f"item {bad[0][0]}: " if len(items) > 1 else ""
            raise HTTPError(422, f"{where}this input could not be generated ({bad[0][1]})")
        return res

    def _info(self) -> dict[str, Any]:
        return {"model": self.engine.name, "template_version": self.engine.template.version}

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
        t0 = time.perf_counter()
        res = await self._correct(items, opts)
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
        self._check_items([(req.question, "")])  # before the upstream is paid for
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(None, ask_upstream, self.s.upstream, req.question)
        except UpstreamError as exc:
            raise HTTPError(502, str(exc)) from None
        if not answer.strip():
            raise HTTPError(502, "the upstream model answered with an empty text")
        self._check_items([(req.question, answer)])
        res = await self._correct([(req.question, answer)], opts)
        return {"question": req.question, "answer": answer} | res[0] | self._info()

    @api.get("/healthz", summary="Liveness")
    async def healthz(self):
        return {"status": "ok", "served_items": self.served, "batches": self.batches,
                "mean_batch_size": round(self.batched_items / self.batches, 2) if self.batches else None,
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

    args = dict(args)
    checkpoint = args.pop("checkpoint", None)
    if not checkpoint:
        raise ValueError("the Aligner application needs args.checkpoint")
    s = ServeConfig.model_validate(args)
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

"""The HTTP app: an OpenAI-compatible chat endpoint over the persona bank (FastAPI).

Endpoints:
  POST /v1/chat/completions   OpenAI's chat completions, plus `persona` (a bank
                              name; none: the base model) and `bias_scale`
                              (default 1.0), `drift` (a stored user's Drift weights,
                              RUN/drift/USER.json); `stream` sends server-sent events
  GET  /v1/models             the served base model (a request's `model` must be its id)
  GET  /v1/personas           the bank: name, job, text persona
  POST /v1/personas           `{"records": [...], "job": NAME, "replace": false}`:
                              an add_personas job, run in the background
  GET  /v1/jobs/{job}         that job's status and per-persona results
  GET  /health                up, with slot and queue figures

Errors are JSON, `{"error": {"message", "type", "code"}}`: unknown model or
persona 404, malformed body 422, prompt longer than the context 400, queue
full 429. No request can stop the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import traceback
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from persomux import data as data_lib
from persomux.serving.engine import Engine, PromptTooLong, QueueFull, Request


class Message(BaseModel):
  role: Literal["system", "user", "assistant"]
  content: str


class ChatRequest(BaseModel):
  model_config = ConfigDict(extra="ignore")
  model: str
  messages: list[Message] = Field(min_length=1)
  persona: str | None = None
  bias_scale: float = Field(1.0, ge=0.0, le=4.0)
  drift: str | None = None
  max_tokens: int | None = Field(None, ge=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool = False
  n: int = Field(1, ge=1, le=1)


class PersonaRecord(BaseModel):
  model_config = ConfigDict(populate_by_name=True)
  cls: str = Field(alias="class", min_length=1)
  text: str = Field(min_length=1)
  context: str | None = None
  persona: str | None = None


class AddPersonas(BaseModel):
  records: list[PersonaRecord] = Field(min_length=1)
  job: str = Field(min_length=1)
  replace: bool = False


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
  return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


class Service:
  """What the app serves: the engine, the bank, and the add_personas jobs."""

  def __init__(self, engine: Engine, bank, formatter: data_lib.PromptFormatter, model_id: str, *,
               max_tokens_default: int = 256, add_personas=None, drift_dir: str | None = None):
    self.engine, self.bank, self.fmt, self.model_id = engine, bank, formatter, model_id
    self.drift_dir = drift_dir  # stored users' Drift weights: DRIFT_DIR/USER.json
    self.max_tokens_default = max_tokens_default
    self.add_personas = add_personas  # (records, job, replace) -> result dict, or None: no training
    self.jobs: dict[str, dict] = {}
    self._jobs_lock = threading.Lock()
    self._job_thread: threading.Thread | None = None
    self._job_queue: list[tuple[str, list, bool]] = []
    self.created = int(time.time())

  def drift_streams(self, user: str, message: str) -> tuple[list[list[int]], list[float]]:
    """The Drift stream prompts and weights of stored user `user` for `message`; raises
    KeyError (unknown user) or ValueError (no Drift on this server)."""
    from persomux import drift, stages

    width = self.engine.drift_streams
    if not width or not self.drift_dir:
      raise ValueError("this server runs without Drift (start launch/serve.py with --drift_streams)")
    try:
      stages.check_job_name(user)
    except stages.JobError:
      raise KeyError(user) from None
    path = os.path.join(self.drift_dir, f"{user}.json")
    if not os.path.isfile(path):
      raise KeyError(user)
    w = drift.DriftWeights.load(path)
    kept = sorted(w.selected, key=lambda i: -abs(float(w.p[i])))[:width - 1]
    systems = [w.base_prompt] + [w.attributes[w.names[i]] for i in kept]
    weights = [float(w.p[i]) for i in kept]
    systems += [w.base_prompt] * (width - len(systems))
    weights += [0.0] * (width - 1 - len(weights))
    return [drift._prompt_ids(self.fmt.tok, s, message) for s in systems], weights

  def set_bank(self, bank) -> None:
    self.bank = bank  # requests already running keep the module they started with

  # --- add_personas jobs, one at a time in a background thread ----------------------------

  def submit_job(self, records: list[data_lib.Record], job: str, replace: bool) -> dict:
    with self._jobs_lock:
      if job in self.jobs and self.jobs[job]["status"] in ("queued", "running"):
        return self.jobs[job]
      self.jobs[job] = {"id": job, "status": "queued", "personas": sorted({r.cls for r in records}),
                        "created": int(time.time())}
      self._job_queue.append((job, records, replace))
      if self._job_thread is None or not self._job_thread.is_alive():
        self._job_thread = threading.Thread(target=self._run_jobs, name="persomux-jobs", daemon=True)
        self._job_thread.start()
      return self.jobs[job]

  def _run_jobs(self):
    while True:
      with self._jobs_lock:
        if not self._job_queue:
          return
        job, records, replace = self._job_queue.pop(0)
        self.jobs[job]["status"] = "running"
      try:
        result = self.add_personas(records, job, replace)
        update = {"status": "done", "result": result}
      except Exception as e:  # noqa: BLE001 (a bad job is reported, the server stays up)
        update = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
      with self._jobs_lock:
        self.jobs[job].update(update, finished=int(time.time()))


def create_app(service: Service) -> FastAPI:
  app = FastAPI(title="persomux", description="Persona-Mux personas served from one base model.")

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, exc: RequestValidationError):
    parts = []
    for e in exc.errors():
      where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
      parts.append(f"{where or 'body'}: {e.get('msg')}")
    return _error(422, "invalid request: " + "; ".join(parts), "invalid_request_error")

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail), "invalid_request_error")

  @app.exception_handler(Exception)
  async def _unexpected(request, exc: Exception):
    traceback.print_exception(exc)
    return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

  @app.get("/health")
  async def health():
    status = service.engine.status()
    ok = status["error"] is None
    return JSONResponse({"status": "ok" if ok else "engine failed", "personas": len(service.bank), **status},
                        status_code=200 if ok else 500)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": service.created,
                                        "owned_by": "persomux"}]}

  @app.get("/v1/personas")
  async def personas():
    return {"object": "list", "data": service.bank.describe()}

  @app.post("/v1/personas", status_code=202)
  async def add(body: AddPersonas):
    from persomux import stages

    if service.add_personas is None:
      return _error(400, "this server does not train personas (started without a trunk it may train on)",
                    "invalid_request_error")
    try:
      stages.check_job_name(body.job)
    except stages.JobError as e:
      return _error(422, str(e), "invalid_request_error")
    records = [data_lib.Record(r.cls, r.text, r.context, r.persona) for r in body.records]
    return JSONResponse(service.submit_job(records, body.job, body.replace), status_code=202)

  @app.get("/v1/jobs/{job}")
  async def job(job: str):
    if job not in service.jobs:
      return _error(404, f"no job {job!r}; jobs: {', '.join(sorted(service.jobs)) or '(none)'}",
                    "invalid_request_error", "job_not_found")
    return service.jobs[job]

  @app.post("/v1/chat/completions")
  async def chat(body: ChatRequest, http: HTTPRequest):
    if body.model != service.model_id:
      return _error(404, f"model {body.model!r} is not served here; this server serves {service.model_id!r} "
                    "(GET /v1/models)", "invalid_request_error", "model_not_found")
    bank = service.bank
    module, class_id, persona_text = None, 0, None
    if body.persona is not None:
      if body.persona not in bank:
        return _error(404, f"persona {body.persona!r} is not in the bank ({len(bank)} personas; GET /v1/personas)",
                      "invalid_request_error", "persona_not_found")
      module, class_id = bank.module, bank.class_ids([body.persona])[0]
      persona_text = bank[body.persona].text
    pre, suf = service.fmt.chat_pieces(persona_text, [m.model_dump() for m in body.messages])
    stream_ids = stream_weights = None
    if body.drift is not None:
      last_user = next((m.content for m in reversed(body.messages) if m.role == "user"), body.messages[-1].content)
      try:
        stream_ids, stream_weights = service.drift_streams(body.drift, last_user)
      except KeyError:
        return _error(404, f"no stored Drift weights for user {body.drift!r} (launch/drift.py fit --out="
                      f"{service.drift_dir or 'RUN/drift'}/{body.drift}.json)", "invalid_request_error",
                      "drift_not_found")
      except ValueError as e:
        return _error(400, str(e), "invalid_request_error")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    req = Request(prompt_ids=pre + suf, soft_index=len(pre), prompt_module=module, class_id=class_id,
                  bias_scale=body.bias_scale, stream_ids=stream_ids, stream_weights=stream_weights,
                  max_tokens=body.max_completion_tokens or body.max_tokens or service.max_tokens_default,
                  temperature=body.temperature, top_p=body.top_p,
                  seed=body.seed if body.seed is not None else int.from_bytes(__import__("os").urandom(4), "little"),
                  stop=stop, emit=lambda delta, finish: loop.call_soon_threadsafe(queue.put_nowait, (delta, finish)))
    try:
      service.engine.submit(req)
    except PromptTooLong as e:
      return _error(400, str(e), "invalid_request_error", "context_length_exceeded")
    except QueueFull as e:
      return _error(429, f"the server is busy: {e}; retry later", "rate_limit_error", "queue_full")
    cid, created = f"chatcmpl-{req.id}", int(time.time())

    def usage():
      n = len(req.tokens)
      return {"prompt_tokens": req.prompt_tokens, "completion_tokens": n, "total_tokens": req.prompt_tokens + n}

    if body.stream:
      async def events():
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": service.model_id}
        try:
          first = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
          yield f"data: {json.dumps(first)}\n\n"
          while True:
            delta, finish = await queue.get()
            if finish == "error":
              err = {"error": {"message": f"generation failed: {service.engine.error!r}", "type": "server_error"}}
              yield f"data: {json.dumps(err)}\n\n"
              break
            if delta:
              chunk = {**head, "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]}
              yield f"data: {json.dumps(chunk)}\n\n"
            if finish is not None:
              chunk = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}], "usage": usage()}
              yield f"data: {json.dumps(chunk)}\n\n"
              break
          yield "data: [DONE]\n\n"
        finally:
          req.cancel()  # a client that went away frees its slot; a finished request is unaffected

      return StreamingResponse(events(), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    finish = None
    try:
      while finish is None:
        try:
          _, finish = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
          if await http.is_disconnected():
            req.cancel()
            return _error(499, "client closed the request", "invalid_request_error")
    finally:
      if finish is None:
        req.cancel()
    if finish == "error":
      return _error(500, f"generation failed: {service.engine.error!r}", "server_error")
    return {"id": cid, "object": "chat.completion", "created": created, "model": service.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": req.text},
                         "finish_reason": finish}],
            "usage": usage()}

  return app

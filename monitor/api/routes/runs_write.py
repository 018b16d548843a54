"""Write API: register a run (per rank) and post batches of steps, histograms and events."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.api.deps import SessionDep, WriterDep
from numwatch.monitor.api.openapi_body import json_request_body
from numwatch.monitor.api.responses import AUTH_RESPONSES, error_responses
from numwatch.monitor.errors import Refused
from numwatch.monitor.ingest.batches import StoredBatch, batch_target, register_run, store_batch
from numwatch.monitor.ingest.schemas import BatchDocument, IngestResult, RunDeleting, RunDocument, RunRegistered
from numwatch.monitor.ingest.storable import find_unstorable_text
from numwatch.monitor.reads.queries import find_run
from numwatch.monitor.store.retention import mark_deleting

router = APIRouter(
    prefix=protocol.RUNS_PATH, tags=["write"], responses={**AUTH_RESPONSES, **error_responses(413, 415, 422)}
)
Document = TypeVar("Document", bound=BaseModel)
Result = TypeVar("Result")
COMMIT_ATTEMPTS = 3  # replicas racing on one step: the loser retries and finds it stored
ANNOTATED_KINDS: tuple[protocol.DetectorEventKind, ...] = (
    "nonfinite_grad",
    "nonfinite_loss",
    "loss_scale_backoff",
    "grad_explosion",
    "loss_scale_collapse",
)


def _location(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


async def read_document(request: Request, model: type[Document]) -> Document:
    """The JSON body as ``model``: 415 for another content type, 413 over the size limit, 422 naming the field."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, f"send the document as application/json (got {content_type or 'no content type'!r})")
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes is over the limit of {limit} bytes: send smaller batches")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"body is over the limit of {limit} bytes: send smaller batches")
    try:
        data = protocol.loads(bytes(body))
    except RecursionError:
        raise HTTPException(422, "body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise HTTPException(422, f"body is not valid JSON: {error}") from None
    unstorable = find_unstorable_text(data)
    if unstorable:
        raise HTTPException(422, f"body: {unstorable}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = [f"{_location(e['loc']) or 'body'}: {e['msg']}" for e in error.errors(include_url=False)[:20]]
        raise HTTPException(422, problems) from None
    except RecursionError:
        raise HTTPException(422, "body is nested too deeply") from None


def _in_transaction(session: Session, work: Callable[[Session], Result]) -> Result:
    """Run ``work(session)`` and commit, retrying a lost unique-key race; anything else rolls back
    and goes to the app's handlers (a refusal, a database that is down)."""
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            result = work(session)
            session.commit()
            return result
        except IntegrityError:
            session.rollback()
            if attempt == COMMIT_ATTEMPTS - 1:
                raise HTTPException(503, "conflicting concurrent writes; retry the batch") from None
        except (Refused, SQLAlchemyError):
            session.rollback()
            raise
    raise AssertionError("unreachable")


_RUN_DOCUMENT = json_request_body(RunDocument)
_BATCH_DOCUMENT = json_request_body(BatchDocument)


@router.post(
    "",
    response_model=RunRegistered,
    summary="Register a run (once per rank)",
    openapi_extra=_RUN_DOCUMENT,
    responses=error_responses(403, 409),
)
async def post_run(request: Request, principal: WriterDep, session: SessionDep) -> RunRegistered:
    document = await read_document(request, RunDocument)
    registered = await run_in_threadpool(_in_transaction, session, lambda s: register_run(s, document, principal))
    return RunRegistered(
        run=registered.run.name, rank=document.rank, created=registered.created, renamed=registered.renamed
    )


@router.post(
    "/{run}/batches",
    response_model=IngestResult,
    summary="Store a batch; answered after commit",
    openapi_extra=_BATCH_DOCUMENT,
    responses=error_responses(404, 409),
)
async def post_batch(run: str, request: Request, principal: WriterDep, session: SessionDep) -> IngestResult:
    state = request.app.state
    state.ingest_metrics.requests.inc()
    started = time.perf_counter()
    try:
        document = await read_document(request, BatchDocument)
        if document.run != run:
            raise HTTPException(422, f"run: the document is for {document.run!r}, the path for {run!r}")

        def work(s: Session) -> tuple[StoredBatch, str]:
            target, batch = batch_target(s, run, document, principal)
            return store_batch(s, target, batch, state.settings.detect), target.name

        stored, stored_as = await run_in_threadpool(_in_transaction, session, work)
    except (HTTPException, Refused) as error:
        if 400 <= (error.status if isinstance(error, Refused) else error.status_code) < 500:
            state.ingest_metrics.rejected_batches.inc()
        raise
    state.ingest_metrics.write_latency.observe(time.perf_counter() - started)
    state.ingest_metrics.steps.inc(stored.result.stored_steps)
    if state.annotations is not None:
        for event in stored.new_events:
            if event["kind"] in ANNOTATED_KINDS:
                state.annotations.post(event, stored_as)
    return stored.result


@router.delete(
    "/{run}",
    response_model=RunDeleting,
    status_code=202,
    responses=error_responses(404),
    summary="Delete a run: it disappears at once, its rows go in the background",
)
async def delete_run(run: str, request: Request, principal: WriterDep, session: SessionDep) -> RunDeleting:
    await run_in_threadpool(_in_transaction, session, lambda s: mark_deleting(find_run(s, run, principal)))
    request.app.state.reaper.wake()
    return RunDeleting(run=run)

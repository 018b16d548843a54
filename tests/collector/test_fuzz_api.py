"""Schemathesis against the collector's own OpenAPI schema, over real HTTP to ``numwatch serve``.

Every operation of ``/openapi.json`` (every path and method) gets ``EXAMPLES_PER_OPERATION``
(25) generated requests, valid and invalid (schemathesis' positive and negative modes),
derandomized so a failure reproduces. The server runs with auth on and the requests carry a
valid token, so write endpoints are exercised past auth; one run with steps, histograms and
events is registered first and half the requests are aimed at it (its name in the path, the
token's project in the body), so read endpoints hit stored data and writes get past 403/404.
Checked on each response: no 5xx (``not_a_server_error``), and status codes, content types
and bodies as the schema documents them. The file takes about 20 s on 2 cores.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from numwatch import protocol
from numwatch.monitor.app import create_app
from numwatch.monitor.settings import Settings
from numwatch.monitor.store import db
from numwatch.monitor.store.auth import create_token
from tests.support.collector_docs import TENSORS, array, batch_doc, run_doc, step_doc

EXAMPLES_PER_OPERATION = 25
FUZZ_RUN = "fuzz-run"
FUZZ_PROJECT = "fuzz"
MAX_REPORT_CHARS = 20_000  # of the failure report, which quotes every failing request
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@dataclass(frozen=True)
class FuzzCollector:
    """Where the fuzzed collector listens and the token that writes to it."""

    url: str
    token: str


def _token(database_url: str) -> str:
    """A writer token for FUZZ_PROJECT, created in the collector's database before it starts."""
    engine = db.make_engine(database_url)
    try:
        with db.make_session_factory(engine)() as session:
            token = create_token(session, FUZZ_PROJECT, name="fuzz")
            session.commit()
    finally:
        engine.dispose()
    return token


def _histogram(step: int) -> dict:
    """A gradient histogram of every tensor at ``step``, one count in each bin."""
    n = len(TENSORS)
    return {
        "step": step,
        "kind": "grad",
        "exponent": array(np.ones(n * protocol.EXPONENT_BINS), "<i8"),
        "linear_min": array([-1.0] * n, "<f4"),
        "linear_max": array([1.0] * n, "<f4"),
        "linear": array(np.ones(n * protocol.LINEAR_BINS), "<i8"),
    }


@pytest.fixture
def fuzz_collector(collector, tmp_path) -> FuzzCollector:
    """A token-protected collector holding one run with steps (one non-finite), a histogram and events."""
    database_url = f"sqlite:///{tmp_path / 'fuzz.db'}"
    db.upgrade(database_url)
    token = _token(database_url)
    # Unlimited rate: a 429 would stop requests short of the endpoints they fuzz.
    url = collector(database_url, "--auth", "token", NUMWATCH_RATE_LIMIT_PER_MINUTE="0")
    steps = [step_doc(1), step_doc(2, norms=[0.5, float("nan"), float("inf")], loss=float("nan")), step_doc(3)]
    event = {"step": 2, "kind": "nonfinite_origin", "time": 1.0, "details": {"tensor": "head.weight"}}
    batch = batch_doc(run=FUZZ_RUN, steps=steps, histograms=[_histogram(2)], events=[event])
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        client.post("/api/v1/runs", json=run_doc(run=FUZZ_RUN, project=FUZZ_PROJECT)).raise_for_status()
        stored = client.post(
            f"/api/v1/runs/{FUZZ_RUN}/batches",
            content=protocol.dumps(batch),
            headers={"Content-Type": "application/json"},
        )
        assert stored.status_code == 200 and stored.json()["stored_steps"] == 3, stored.text
    return FuzzCollector(url, token)


def _aimed(case: schemathesis.Case) -> schemathesis.Case:
    """The request aimed at the stored run and the token's project, so it gets past 404 and 403."""
    if "run" in (case.path_parameters or {}):
        case.path_parameters["run"] = FUZZ_RUN
    if isinstance(case.body, dict):
        if "project" in case.body:
            case.body["project"] = FUZZ_PROJECT
        if "run" in case.body and case.path_parameters:
            case.body["run"] = FUZZ_RUN
    return case


def _case_strategies(operation: schemathesis.APIOperation) -> st.SearchStrategy[schemathesis.Case]:
    """Valid and invalid requests, as generated and aimed at the stored run."""
    generated = [operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    return st.one_of(*generated, *(strategy.map(_aimed) for strategy in generated))


def _fuzz(operation: schemathesis.APIOperation, target: FuzzCollector, session: requests.Session) -> Counter[int]:
    """Send the operation's generated requests and check each response; returns the status codes seen."""
    headers = {"Authorization": f"Bearer {target.token}"}
    statuses: Counter[int] = Counter()

    @given(case=_case_strategies(operation))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def requests_answer_without_server_errors(case: schemathesis.Case) -> None:
        # Sent with plain requests rather than case.call(): grafana-client's niquests installs
        # urllib3-future over urllib3, whose pool container breaks schemathesis' connection count.
        response = session.request(**case.as_transport_kwargs(base_url=target.url, headers=headers), timeout=30)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)

    requests_answer_without_server_errors()
    return statuses


def test_every_operation_answers_without_server_errors(fuzz_collector: FuzzCollector) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_collector.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    served = {(operation.method.upper(), operation.path) for operation in operations}
    documented = {
        (method.upper(), path)
        for path, methods in create_app(Settings(database_url="sqlite://")).openapi()["paths"].items()
        for method in methods
    }
    assert served == documented and len(served) >= 12
    failures, statuses = [], {}
    with requests.Session() as session:
        for operation in operations:
            label = f"{operation.method.upper()} {operation.path}"
            try:
                statuses[label] = _fuzz(operation, fuzz_collector, session)
            except (
                Exception,
                FailureGroup,
            ) as failure:  # every operation is fuzzed; all failures are reported together
                failures.append(f"{label}: {failure}")
    assert not failures, "\n\n".join(failures)[:MAX_REPORT_CHARS]
    # The token and the aiming work: every operation answered some requests past auth (not 401/403).
    assert all(set(seen) - {401, 403} for seen in statuses.values()), statuses

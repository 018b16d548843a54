"""Tokens end to end (CLI → real server → HTTP), project scoping, revocation, rate limit; `numwatch sync`."""

from __future__ import annotations

import logging
import subprocess
import sys

import httpx
import torch
from torch import nn

import numwatch
from numwatch import protocol
from numwatch.monitor.store import db
from tests.support.collector_docs import batch_doc, run_doc, step_doc


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "numwatch.monitor.ops.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_tokens_scope_projects_and_revoke(collector, tmp_path) -> None:
    database_url = f"sqlite:///{tmp_path / 'auth.db'}"
    db.upgrade(database_url)
    created = run_cli("token", "create", "--project", "alpha", "--database-url", database_url)
    assert created.returncode == 0, created.stderr
    alpha = created.stdout.strip().splitlines()[-1]
    beta = (
        run_cli("token", "create", "--project", "beta", "--database-url", database_url).stdout.strip().splitlines()[-1]
    )
    url = collector(database_url, "--auth", "token")
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/api/v1/runs", json=run_doc(project="alpha")).status_code == 401
        assert (
            client.post(
                "/api/v1/runs", json=run_doc(project="alpha"), headers={"Authorization": "Bearer nw_wrong"}
            ).status_code
            == 401
        )
        as_alpha = {"Authorization": f"Bearer {alpha}"}
        as_beta = {"Authorization": f"Bearer {beta}"}
        assert client.post("/api/v1/runs", json=run_doc(project="alpha"), headers=as_alpha).status_code == 200
        assert client.post("/api/v1/runs", json=run_doc(run="b", project="alpha"), headers=as_beta).status_code == 403
        body = protocol.dumps(batch_doc(steps=[step_doc(1)]))
        json_type = {"Content-Type": "application/json"}
        assert client.post("/api/v1/runs/r1/batches", content=body, headers={**as_beta, **json_type}).status_code == 404
        assert (
            client.post("/api/v1/runs/r1/batches", content=body, headers={**as_alpha, **json_type}).status_code == 200
        )
        assert (
            client.get("/api/v1/runs/r1", headers=as_beta).status_code == 404
        )  # other projects' runs do not exist for beta
        assert [r["run"] for r in client.get("/api/v1/runs", headers=as_alpha).json()] == ["r1"]
        assert client.get("/api/v1/runs", headers=as_beta).json() == []
        assert client.get("/api/v1/runs").status_code == 401
        listing = run_cli("token", "list", "--database-url", database_url).stdout
        assert alpha not in listing and "alpha" in listing
        token_id = listing.split()[0]
        assert run_cli("token", "revoke", token_id, "--database-url", database_url).returncode == 0
        assert client.get("/api/v1/runs", headers=as_alpha).status_code == 401
    log = (next(tmp_path.glob("collector-*")) / "collector.log").read_text()
    assert alpha not in log and beta not in log


def test_rate_limit_answers_429_with_retry_after(collector, tmp_path) -> None:
    database_url = f"sqlite:///{tmp_path / 'rate.db'}"
    db.upgrade(database_url)
    token = run_cli("token", "create", "--project", "p", "--database-url", database_url).stdout.strip().splitlines()[-1]
    url = collector(database_url, "--auth", "token", NUMWATCH_RATE_LIMIT_PER_MINUTE="5")
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        codes = [client.get("/api/v1/runs").status_code for _ in range(8)]
        assert codes[:5] == [200] * 5 and codes[5:] == [429] * 3
        assert int(client.get("/api/v1/runs").headers["Retry-After"]) >= 1


def test_serve_refuses_public_bind_without_auth() -> None:
    result = run_cli("serve", "--host", "0.0.0.0", "--auth", "off")
    assert result.returncode == 2 and "--insecure-no-auth" in result.stderr


def _train(url: str | None, spool_dir, run: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with numwatch.watch(
        model, optimizer, run=run, url=url, spool_dir=spool_dir, histogram_every=4, format_every=2, format="bf16"
    ):
        for step in range(12):
            inputs = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            nn.functional.mse_loss(model(inputs), torch.ones(4, 1)).backward()
            optimizer.step()


def _stored(client: httpx.Client, run: str) -> list[dict]:
    records = []
    for step in range(1, 13):
        record = client.get(f"/api/v1/runs/{run}/steps/{step}").json()
        records.append({k: v for k, v in record.items() if k not in ("run", "time", "step_time", "events")})
    return records


def test_sync_of_an_offline_run_stores_what_a_live_run_stores(collector, tmp_path, caplog) -> None:
    url = collector()
    _train(url, tmp_path / "live-spool", "same-run")
    offline_spool = tmp_path / "offline-spool"
    _train(None, offline_spool, "same-run")
    other = collector()
    with caplog.at_level(logging.ERROR):
        result = run_cli("sync", "--url", other, "--spool-dir", str(offline_spool))
    assert result.returncode == 0, result.stderr
    assert "uploaded" in result.stdout and "uploading" not in result.stdout  # the progress bar is on stderr
    again = run_cli("sync", "--url", other, "--spool-dir", str(offline_spool))
    assert "nothing to upload" in again.stdout
    with httpx.Client(timeout=30) as client:
        live, synced = httpx.Client(base_url=url), httpx.Client(base_url=other)
        assert _stored(live, "same-run") == _stored(synced, "same-run")
        assert (
            live.get("/api/v1/runs/same-run").json()["steps_total"]
            == synced.get("/api/v1/runs/same-run").json()["steps_total"]
            == 12
        )
        live.close()
        synced.close()
        assert client is not None

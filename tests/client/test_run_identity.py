"""A run name used by two processes keeps both runs' data; resuming is asked for, never guessed.

Each training process is a real interpreter posting to (or spooling for) a real collector.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from numwatch import protocol

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, numwatch
    url, spool, seed, resume = sys.argv[1] or None, sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = numwatch.watch(model, optimizer, run="shared", url=url, spool_dir=spool, resume=resume)
    losses = []
    for step in range(3):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    watcher.close()
    print(json.dumps({"losses": losses, "stored_as": watcher.transport.stored_as}))
    """
)


def _train(url: str | None, spool: Path, seed: int, resume: bool = False) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, url or "", str(spool), str(seed), "1" if resume else "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def _losses(client: httpx.Client, run: str) -> tuple[list[int], list[float]]:
    series = client.get(f"/api/v1/runs/{run}/series", params={"metric": "loss"}).json()
    return series["steps"], [protocol.decode_float(v) for v in series["values"]]


def _rounded(losses: list[float]) -> tuple[float, ...]:
    return tuple(round(loss, 5) for loss in losses)


def test_a_second_process_with_the_same_name_becomes_a_second_run(collector, tmp_path):
    url = collector()
    first, _ = _train(url, tmp_path / "spool", seed=1)
    second, warning = _train(url, tmp_path / "spool", seed=2)
    assert (first["stored_as"], second["stored_as"]) == ("shared", "shared-2")
    assert "run name 'shared' is taken by another process" in warning and "'shared-2'" in warning
    with httpx.Client(base_url=url, timeout=30) as client:
        assert _losses(client, "shared") == ([1, 2, 3], pytest.approx(first["losses"], rel=1e-6))
        assert _losses(client, "shared-2") == ([1, 2, 3], pytest.approx(second["losses"], rel=1e-6))
        # Resuming on purpose: the third process's steps follow the run's last stored step.
        third, _ = _train(url, tmp_path / "spool", seed=3, resume=True)
        assert third["stored_as"] == "shared"
        steps, losses = _losses(client, "shared")
        assert steps == [1, 2, 3, 4, 5, 6]
        assert losses == pytest.approx(first["losses"] + third["losses"], rel=1e-6)


def test_two_spooled_processes_with_one_name_sync_into_two_runs(collector, tmp_path):
    spool = tmp_path / "spool"
    first, _ = _train(None, spool, seed=4)
    second, _ = _train(None, spool, seed=5)
    assert len(list(spool.glob("shared.*/rank0"))) == 2  # one spool directory per process
    url = collector()
    synced = subprocess.run(
        [sys.executable, "-m", "numwatch.monitor.ops.cli", "sync", "--url", url, "--spool-dir", str(spool)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert synced.returncode == 0, synced.stderr
    assert "shared -> shared-2" in synced.stderr
    with httpx.Client(base_url=url, timeout=30) as client:
        stored = {_rounded(_losses(client, name)[1]) for name in ("shared", "shared-2")}
    assert stored == {_rounded(first["losses"]), _rounded(second["losses"])}

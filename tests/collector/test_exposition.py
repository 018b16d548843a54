"""/metrics from a real collector: every contract name, valid for promtool, finished runs leave."""

from __future__ import annotations

import subprocess
import time

import httpx
import numpy as np

from numwatch import protocol
from tests.support.binaries import require_binary
from tests.support.collector_docs import array, batch_doc, run_doc, step_doc
from tests.support.metrics_contract import SERIES_NAMES


def _populate(client: httpx.Client, run: str, status: str = "running") -> None:
    client.post("/api/v1/runs", json=run_doc(run=run)).raise_for_status()
    counts = {name: array([1, 2, 3], "<i8") for name in protocol.FORMAT_COUNT_STATS}
    sampled = {
        "update_ratio": array([1e-3, 2e-3, np.nan], "<f4"),
        "stale_fraction": array([0.0, 0.5, 0.25], "<f4"),
        "adam_update_rms": array([0.25, 0.5, np.nan], "<f4"),
        "adam_eps_dominated": array([0.0, 0.5, np.nan], "<f4"),
    }
    # The bias (third tensor) is not quantized: NaN; an exact tensor is +inf.
    quantized = {
        f"quant_sqnr_{scheme}": array([np.inf, db, np.nan], "<f4")
        for scheme, db in (("int8", 40.5), ("int4", 12.5), ("nf4", 19.0), ("fp8", 31.25))
    }
    # Per Linear weight (the first two tensors); the bias is no matmul weight: NaN. The x input's
    # e4m3 SQNR dips below the 20 dB threshold in the second layer.
    gemm = {name: array([30.0, 25.0, np.nan], "<f4") for name in protocol.GEMM_STATS}
    gemm["gemm_x_e4m3_sqnr"] = array([30.0, 17.5, np.nan], "<f4")
    gemm["gemm_dy_e5m2_sqnr"] = array([np.inf, 24.75, np.nan], "<f4")
    forward = {
        "attention_logit_max": {"h.0.attn": 12.5, "h.1.attn": 40.25},
        "output_logits": {"log_z_mean": 7.5, "log_z_max": 9.0, "absmax": 21.0},
    }
    steps = [
        step_doc(1),
        step_doc(2, tensors={**counts, **sampled, **quantized, **gemm}, **forward),
        step_doc(3, loss=float("nan")),
    ]
    body = protocol.dumps(batch_doc(run=run, steps=steps, status=status))
    client.post(
        f"/api/v1/runs/{run}/batches", content=body, headers={"Content-Type": "application/json"}
    ).raise_for_status()


def _populate_job(client: httpx.Client, run: str) -> None:
    """A 4-rank job: rank 1 computes 10x slower, rank 3's replicated weights differ at step 1."""
    for rank in range(4):
        client.post("/api/v1/runs", json={**run_doc(run=run, rank=rank), "world_size": 4}).raise_for_status()
    for rank in range(4):
        steps = []
        for number in range(1, 7):
            local = protocol.local_health(
                1.0 + rank,
                0,
                compute_time=1.0 if rank == 1 else 0.1,
                checksum=(7 if rank == 3 else 5) if number == 1 else None,
            )
            steps.append(step_doc(number, local=local, replicated_by=None if rank == 0 else 0))
        body = protocol.dumps(batch_doc(run=run, rank=rank, steps=steps))
        client.post(
            f"/api/v1/runs/{run}/batches", content=body, headers={"Content-Type": "application/json"}
        ).raise_for_status()


def test_exposition_has_every_contract_series_and_passes_promtool(collector) -> None:
    url = collector(None, NUMWATCH_METRICS_CACHE_SECONDS="0", NUMWATCH_FINISHED_GRACE_SECONDS="2")
    with httpx.Client(base_url=url, timeout=30) as client:
        _populate(client, "live")
        _populate(client, "done", status="finished")
        _populate_job(client, "job")
        text = client.get("/metrics").text
        names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
        assert SERIES_NAMES - names == set(), f"contract series missing from /metrics: {sorted(SERIES_NAMES - names)}"
        assert 'numwatch_loss{rank="0",run="live"} NaN' in text
        assert 'numwatch_layer_grad_norm{rank="0",run="live",tensor="embed.weight"} 0.5' in text
        assert 'numwatch_global_grad_norm_distribution_count{rank="0",run="live"} 3.0' in text
        assert 'numwatch_adam_update_rms{rank="0",run="live"} 0.375' in text
        assert 'numwatch_adam_eps_dominated{rank="0",run="live"} 0.25' in text
        assert 'numwatch_quant_sqnr_min_decibels{rank="0",run="live",scheme="int4"} 12.5' in text
        assert 'numwatch_quant_sqnr_min_decibels{rank="0",run="live",scheme="fp8"} 31.25' in text
        assert 'numwatch_attention_logit_max{rank="0",run="live"} 40.25' in text
        assert 'numwatch_output_log_z_mean{rank="0",run="live"} 7.5' in text
        assert 'numwatch_output_log_z_max{rank="0",run="live"} 9.0' in text
        assert 'numwatch_output_logit_absmax{rank="0",run="live"} 21.0' in text
        assert "numwatch_attention_logit_threshold 100.0" in text
        assert 'numwatch_rank_local_grad_norm{rank="2",run="job"} 3.0' in text
        assert 'numwatch_ranks_compute_seconds{run="job",stat="max"} 1.0' in text
        assert 'numwatch_rank_straggling{rank="1",run="job"} 1.0' in text
        assert 'numwatch_rank_replica_diverged{rank="3",run="job"} 1.0' in text
        assert 'numwatch_rank_events_total{kind="replica_divergence",rank="3",run="job"} 1.0' in text
        assert 'numwatch_events_total{kind="straggler",run="job"} 1.0' in text
        assert 'numwatch_gemm_sqnr_min_decibels{operand="x",rank="0",run="live",scheme="e4m3"} 17.5' in text
        assert 'numwatch_gemm_sqnr_min_decibels{operand="dy",rank="0",run="live",scheme="e5m2"} 24.75' in text
        assert 'numwatch_gemm_sqnr_min_decibels{operand="w",rank="0",run="live",scheme="nvfp4"} 25.0' in text
        assert "numwatch_gemm_sqnr_threshold_decibels 20.0" in text
        assert (
            'numwatch_run_info{format="fp16",project="default",run="done",status="finished",world_size="1"} 1.0' in text
        )
        result = subprocess.run(
            [require_binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr.strip() == "", (
            result.stdout + result.stderr
        )
        time.sleep(2.5)  # past the finished-run grace period
        later = client.get("/metrics").text
        assert 'run="done"' not in later and 'run="live"' in later


def test_large_jobs_list_only_the_named_and_extreme_ranks() -> None:
    from numwatch.monitor.metrics.ranks import RankFamilies
    from numwatch.monitor.store.models import RankJudge, RankState, Run

    def families(world_size: int) -> tuple[dict[str, list], set[int]]:
        run = Run(name="big", world_size=world_size)
        states = [
            RankState(
                rank=rank,
                local_grad_norm=float(rank + 1),
                local_nonfinite=0,
                compute_time=0.1,
                global_grad_norm=1.0 if rank == 0 else None,  # rank 0 sends the replicated statistics
            )
            for rank in range(world_size)
        ]
        judge = RankJudge(state={"stragglers": [7], "diverged": [], "nonfinite": [], "outliers": {}}, events_total={})
        ranks = RankFamilies(max_ranks=64)
        ranks.add_run(run, states, judge)
        return {family.name: family.samples for family in ranks.families()}, ranks.listed(run, states, judge)

    big, listed = families(512)
    assert listed == {0, 7}  # the collector's other per-rank families: the sender and the named ranks
    assert sorted(int(s.labels["rank"]) for s in big["numwatch_rank_local_grad_norm"]) == [0, 7, 511]
    assert [(s.labels["stat"], s.value) for s in big["numwatch_ranks_local_grad_norm"]] == [
        ("min", 1.0),
        ("median", 256.5),
        ("max", 512.0),
    ]
    assert [s.labels["rank"] for s in big["numwatch_rank_straggling"]] == ["7"]
    small, listed = families(64)
    assert len(small["numwatch_rank_local_grad_norm"]) == 64 and listed == set(range(64))

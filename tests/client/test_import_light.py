"""The training side imports without any server dependency."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_PACKAGES = (
    "fastapi",
    "sqlalchemy",
    "uvicorn",
    "prometheus_client",
    "starlette",
    "alembic",
    "psycopg",
    "numwatch.monitor",
)


def test_hooks_imports_and_watches_with_server_packages_blocked(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        BLOCKED = {SERVER_PACKAGES!r}

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if any(name == blocked or name.startswith(blocked + ".") for blocked in BLOCKED):
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Blocker())
        import torch
        import numwatch
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with numwatch.watch(model, optimizer, run="light", spool_dir={str(tmp_path)!r}) as watcher:
            model(torch.ones(4, 3)).sum().backward()
            optimizer.step()
        assert watcher.steps == 1
        loaded = sorted(name for name in sys.modules if any(name == b or name.startswith(b + ".") for b in BLOCKED))
        assert not loaded, loaded
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_protocol_spool_and_sync_import_without_torch(tmp_path):
    """What `numwatch sync` and the collector use of the client loads no torch."""
    script = (
        "import sys, numwatch.protocol, numwatch.delivery.spool, numwatch.delivery.sync\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_integrations_import_no_framework(tmp_path):
    frameworks = ("transformers", "lightning", "pytorch_lightning", "accelerate", "deepspeed")
    script = (
        "import sys, numwatch, numwatch.integrations, numwatch.kernels.sharded\n"
        "numwatch.watch, numwatch.UnsupportedConfiguration, dir(numwatch.integrations)\n"
        f"loaded = sorted(n for n in sys.modules if n.split('.')[0] in {frameworks!r})\n"
        "assert not loaded, loaded\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

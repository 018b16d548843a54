"""The built wheel, installed as users install it: fresh virtual environments, outside the checkout.

Three environments: the training side (the wheel and the user's torch), the collector (the
``server`` extra, no torch) and both. Each command runs with a temporary working directory, so
nothing can come from the checkout.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.binaries import require_binary
from tests.support.grafana import TOKEN, FakeGrafana
from tests.support.promstack import free_port

REPO = Path(__file__).resolve().parents[2]
DATA_DIRS = ("deploy", "dashboards")
pytestmark = pytest.mark.slow


def _pinned(name: str) -> str:
    """The dev requirement line for ``name`` (torch is pinned there to the CPU build)."""
    for line in (REPO / "requirements-dev.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.strip()
    raise LookupError(f"{name} is not pinned in requirements-dev.txt")


@dataclass
class Venv:
    root: Path

    def bin(self, name: str) -> str:
        return str(self.root / "bin" / name)

    def run(self, *args: str, cwd: Path, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def python(self, code: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(self.bin("python"), "-c", textwrap.dedent(code), cwd=cwd, check=check)


def _venv(path: Path, *requirements: str) -> Venv:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    venv = Venv(path)
    venv.run(venv.bin("python"), "-m", "pip", "install", "-q", *requirements, cwd=path, timeout=600)
    return venv


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("numwatch-*.whl")
    return built


@pytest.fixture(scope="module")
def client_env(wheel, tmp_path_factory) -> Venv:
    return _venv(tmp_path_factory.mktemp("client") / "venv", str(wheel), _pinned("torch"))


@pytest.fixture(scope="module")
def server_env(wheel, tmp_path_factory) -> Venv:
    return _venv(tmp_path_factory.mktemp("server") / "venv", f"{wheel}[server]")


@pytest.fixture(scope="module")
def full_env(wheel, tmp_path_factory) -> Venv:
    return _venv(tmp_path_factory.mktemp("full") / "venv", f"{wheel}[server]", _pinned("torch"))


def _get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_for(predicate, what: str, timeout: float = 90.0, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"{what}: the process exited {process.returncode}:\n{process.stdout.read() if process.stdout else ''}"
            )
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _ignoring_sigint(argv: list[str]) -> list[str]:
    """``argv`` started as from a background job of a non-interactive shell (CI runners, ``cmd &``
    in a script): with SIGINT ignored, which exec keeps. ``numwatch stack`` and the served demo
    must still stop on it."""
    return ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *argv]


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def test_wheel_holds_one_import_package_and_all_its_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names} == {"numwatch", "numwatch-0.1.0.dist-info"}
    for folder in DATA_DIRS:
        shipped = {
            path.relative_to(REPO).as_posix()
            for path in (REPO / folder).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        }
        assert shipped, folder
        missing = sorted(name for name in shipped if f"numwatch/{name}" not in names)
        assert not missing, f"not in the wheel: {missing}"
    static = {
        path.relative_to(REPO / "monitor").as_posix()
        for path in (REPO / "monitor" / "web" / "static").rglob("*")
        if path.is_file()
    }
    assert static and not sorted(name for name in static if f"numwatch/monitor/{name}" not in names)
    migrations = [
        name
        for name in names
        if name.startswith("numwatch/monitor/store/migrations/versions/") and name.endswith(".py")
    ]
    assert len(migrations) == len(list((REPO / "monitor" / "store" / "migrations" / "versions").glob("*.py")))


def test_client_install_is_light_and_spools_then_syncs(client_env: Venv, server_env: Venv, tmp_path: Path) -> None:
    client_env.python(
        """
        import importlib.util, sys
        import numwatch
        for server in ("fastapi", "sqlalchemy", "uvicorn", "prometheus_client", "alembic"):
            assert importlib.util.find_spec(server) is None, server + " was installed with the client"
        assert not any(name.startswith("numwatch.monitor") for name in sys.modules)
        """,
        cwd=tmp_path,
    )
    usage = client_env.run(client_env.bin("numwatch"), "--help", cwd=tmp_path).stdout
    assert "sync" in usage and "import numwatch" in usage
    spool = tmp_path / "spool"
    client_env.python(
        f"""
        import torch, numwatch
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with numwatch.watch(model, optimizer, run="from-wheel", spool_dir={str(spool)!r}):
            for _ in range(5):
                model(torch.randn(16, 4)).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        """,
        cwd=tmp_path,
    )
    port = free_port()
    collector = subprocess.Popen(
        [server_env.bin("numwatch"), "serve", "--port", str(port), "--database-url", f"sqlite:///{tmp_path / 'c.db'}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _get_json(f"{url}/readyz"), "the collector's /readyz", process=collector)
        synced = client_env.run(
            client_env.bin("numwatch"), "sync", "--url", url, "--spool-dir", str(spool), cwd=tmp_path
        )
        assert synced.returncode == 0
        (run,) = [r for r in _get_json(f"{url}/api/v1/runs") if r["run"] == "from-wheel"]
        assert run["last_step"] == 5
        series = _get_json(f"{url}/api/v1/runs/from-wheel/series?metric=global_grad_norm&max_points=100")
        assert series["steps"] == [1, 2, 3, 4, 5]
    finally:
        _stop(collector)


def test_server_install_has_no_torch_and_says_so_at_watch(server_env: Venv, tmp_path: Path) -> None:
    server_env.python("import importlib.util; assert importlib.util.find_spec('torch') is None", cwd=tmp_path)
    assert "serve" in server_env.run(server_env.bin("numwatch"), "--help", cwd=tmp_path).stdout
    result = server_env.python("import numwatch\nnumwatch.watch", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "numwatch.watch needs PyTorch" in result.stderr.strip().splitlines()[-1]
    assert "ModuleNotFoundError" not in result.stderr  # one clear error, not a chained import trace


def test_stack_from_the_wheel_scrapes_its_collector(server_env: Venv, tmp_path: Path) -> None:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    ports = {name: free_port() for name in ("collector", "prometheus", "alertmanager")}
    stack = subprocess.Popen(
        _ignoring_sigint(
            [
                server_env.bin("numwatch"),
                "stack",
                "--workdir",
                str(tmp_path / "stack"),
                "--interval",
                "1s",
                *(arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))),
            ]
        ),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def collector_target_up():
            targets = _get_json(f"http://127.0.0.1:{ports['prometheus']}/api/v1/targets")["data"]["activeTargets"]
            return [t for t in targets if t["labels"].get("job") == "numwatch" and t["health"] == "up"]

        _wait_for(collector_target_up, "Prometheus to report the collector target up", timeout=120, process=stack)
        rules = _get_json(f"http://127.0.0.1:{ports['prometheus']}/api/v1/rules")["data"]["groups"]
        assert rules, "the shipped alert rules were not loaded"
        _stop(stack)
        assert stack.returncode == 0, stack.stdout.read()
        for port in ports.values():  # Ctrl-C stopped all three servers
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
    finally:
        if stack.poll() is None:
            _stop(stack)


def test_grafana_push_from_the_wheel(server_env: Venv, fake_grafana: FakeGrafana, tmp_path: Path) -> None:
    server_env.run(
        server_env.bin("numwatch"), "grafana", "push", "--url", fake_grafana.url, "--token", TOKEN, cwd=tmp_path
    )
    assert set(fake_grafana.dashboards) == {"numwatch-overview", "numwatch-run"}
    assert set(fake_grafana.datasources) == {"numwatch Prometheus", "numwatch collector"}


@pytest.mark.timeout(900)  # a fresh environment's install and the demo's training, on a shared machine
def test_demo_from_the_wheel_serves_its_run_page_until_interrupted(full_env: Venv, tmp_path: Path) -> None:
    demo = subprocess.Popen(
        _ignoring_sigint([full_env.bin("numwatch"), "demo", "--steps", "60"]),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = []
        for line in demo.stdout:
            output.append(line)
            if line.startswith("Open "):
                break
        text = "".join(output)
        assert "The collector detected" in text and "grad_explosion" in text, text
        page = line.split()[1]
        with urllib.request.urlopen(page, timeout=10) as response:  # the page and its scripts come from the wheel
            assert response.status == 200 and b'src="/static/run.js"' in response.read()
        with urllib.request.urlopen(
            page.split("/runs/")[0] + "/static/vendor/uPlot.iife.min.js", timeout=10
        ) as response:
            assert response.status == 200
        demo.send_signal(signal.SIGINT)  # at once: the handler is in place before the URL is printed
        assert demo.wait(timeout=60) == 0
        with pytest.raises(OSError):  # the collector it started is gone
            urllib.request.urlopen(page, timeout=5)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(timeout=30)


def test_installs_beside_a_distribution_that_ships_a_top_level_hooks(client_env: Venv, tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "hooks").mkdir(parents=True)
    (other / "hooks" / "__init__.py").write_text("OWNER = 'hooks-other'\n")
    (other / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "hooks-other"\nversion = "1.0"\n[tool.setuptools]\npackages = ["hooks"]\n'
    )
    client_env.run(
        client_env.bin("python"), "-m", "pip", "install", "-q", "--no-build-isolation", str(other), cwd=tmp_path
    )
    both = "import hooks, numwatch\nassert hooks.OWNER == 'hooks-other'\nassert callable(numwatch.watch)\n"
    client_env.python(both, cwd=tmp_path)
    client_env.run(client_env.bin("python"), "-m", "pip", "uninstall", "-y", "-q", "hooks-other", cwd=tmp_path)
    client_env.python(
        "import importlib.util, numwatch\nassert importlib.util.find_spec('hooks') is None\nassert "
        "callable(numwatch.watch)",
        cwd=tmp_path,
    )

"""The ``numwatch`` command line.

Server-side imports happen inside the commands, so a client-only install (torch, no
FastAPI) can still run ``numwatch sync``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from numwatch import settings as client_settings

DATABASE_HELP = "database URL (default: env NUMWATCH_DATABASE_URL, else a SQLite file under the user's data directory)"


def _add_database(parser: argparse.ArgumentParser) -> None:
    # Unset flags stay None so that Settings reads the environment: one place for every NUMWATCH_* default.
    parser.add_argument("--database-url", default=None, help=DATABASE_HELP)


def _add_collector(parser: argparse.ArgumentParser, default_url: str | None = None) -> None:
    parser.add_argument(
        "--url",
        default=client_settings.read(client_settings.URL) or default_url,
        help=f"collector URL (env {client_settings.URL})",
    )
    parser.add_argument(
        "--token",
        default=client_settings.read(client_settings.TOKEN),
        help=f"write token (env {client_settings.TOKEN})",
    )


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    """The collector Settings: flags given on the command line over ``NUMWATCH_*`` over defaults.
    Settings it refuses (auth off on a public address, say) end the command with status 2."""
    from pydantic import ValidationError

    from numwatch.monitor.settings import Settings

    if args.database_url:
        overrides["database_url"] = args.database_url
    try:
        return Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as error:
        problems = (str(problem.get("ctx", {}).get("error", problem["msg"])) for problem in error.errors())
        print(f"numwatch {args.command}: {'; '.join(problems)}", file=sys.stderr)
        raise SystemExit(2) from None


def _session(settings: Any) -> Any:
    """A session on the database of ``settings``, after checking its schema."""
    from numwatch.monitor.store import db

    engine = db.make_engine(settings.database_url)
    try:
        db.check_schema(engine)
    except db.SchemaOutdated as error:
        raise SystemExit(f"numwatch: {error}") from None
    return db.make_session_factory(engine)()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from numwatch.monitor.app import create_app, prepare_database
    from numwatch.monitor.store.db import SchemaOutdated

    settings = _settings(
        args,
        host=args.host,
        port=args.port,
        auth=args.auth,
        open_reads=args.open_reads or None,
        insecure_no_auth=args.insecure_no_auth or None,
    )
    if "auth" not in settings.model_fields_set:  # neither --auth nor NUMWATCH_AUTH: off on loopback only
        settings = settings.model_copy(update={"auth": "off" if settings.loopback else "token"})
    try:
        prepare_database(settings)
    except SchemaOutdated as error:
        print(f"numwatch serve: {error}", file=sys.stderr)
        return 2
    if not settings.auth_enabled:
        print(f"numwatch: auth is off (bound to {settings.host}): writes and reads need no token", file=sys.stderr)
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level, access_log=False
    )
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from numwatch.monitor.store import db

    settings = _settings(args)
    db.upgrade(settings.database_url)
    print(f"database at revision {db.head_revision()}")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from numwatch.monitor.store.auth import create_token

    with _session(_settings(args)) as session:
        token = create_token(session, args.project, args.name)
        session.commit()
    print(f"token for project {args.project!r} (shown once; store it as {client_settings.TOKEN}):", file=sys.stderr)
    print(token)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from numwatch.monitor.store.auth import revoke_token

    with _session(_settings(args)) as session:
        revoked = revoke_token(session, args.id)
        session.commit()
    if not revoked:
        print(f"numwatch: no active token with id {args.id} (see `numwatch token list`)", file=sys.stderr)
        return 1
    print(f"token {args.id} revoked")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from numwatch.monitor.store.auth import list_tokens

    with _session(_settings(args)) as session:
        for token in list_tokens(session):
            state = f"revoked {token.revoked_at:%Y-%m-%d %H:%M}" if token.revoked_at else "active"
            print(
                f"{token.id:>4}  {token.project:<20} {token.name:<20} created {token.created_at:%Y-%m-%d %H:%M}  "
                f"{state}"
            )
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from numwatch.monitor.reads.report import render_runs

    settings = _settings(args)
    with _session(settings) as session:
        print(render_runs(session, settings.stale_after_seconds))
    return 0


def _purger(session: Any, label: str) -> Any:
    from numwatch.monitor.store.db import make_session_factory
    from numwatch.monitor.store.retention import Purger

    deleted = [0]

    def progress(rows: int) -> None:
        deleted[0] += rows
        print(f"\r{label}: {deleted[0]} rows deleted", end="", file=sys.stderr, flush=True)

    return Purger(make_session_factory(session.get_bind()), progress=progress)


def cmd_runs_delete(args: argparse.Namespace) -> int:
    from numwatch.monitor.errors import NotFound
    from numwatch.monitor.reads.queries import find_run
    from numwatch.monitor.store.auth import EVERYTHING
    from numwatch.monitor.store.retention import mark_deleting

    with _session(args) as session:
        try:
            run = find_run(session, args.run, EVERYTHING)
        except NotFound:
            print(f"numwatch: no run {args.run!r} (see `numwatch runs`)", file=sys.stderr)
            return 1
        mark_deleting(run)
        session.commit()
        purger = _purger(session, f"deleting {args.run}")
        purger.sweep()
    print(f"\nrun {args.run!r} deleted")
    return 0


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``90m``, ``45s`` or ``2w``."""
    number, unit = text[:-1], text[-1:].lower()
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30d, 12h, 90m, 45s or 2w") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return seconds


def cmd_gc(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from numwatch.monitor.store.retention import mark_deleting, runs_to_delete

    with _session(args) as session:
        expired = runs_to_delete(session, timedelta(seconds=args.older_than), args.project)
        for run in expired:
            mark_deleting(run)
            print(
                f"deleting {run.name} (project {run.project}, last seen {run.last_seen_at:%Y-%m-%d %H:%M})",
                file=sys.stderr,
            )
        session.commit()
        purger = _purger(session, "gc")
        runs = purger.sweep()
        orphans = purger.orphans()
        purger.vacuum()
    print(f"\ndeleted {runs} runs" + (f" and {orphans} rows of runs deleted by hand" if orphans else ""))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from numwatch.monitor.errors import NotFound
    from numwatch.monitor.reads.report import render_run

    settings = _settings(args)
    with _session(settings) as session:
        try:
            print(render_run(session, args.run, settings.stale_after_seconds))
        except NotFound as error:
            print(f"numwatch: {error.message} (see `numwatch runs`)", file=sys.stderr)
            return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from numwatch.monitor.errors import NotFound
    from numwatch.monitor.web.export import export_run_page

    settings = _settings(args)
    with _session(settings) as session:
        try:
            page = export_run_page(session, args.run, settings.stale_after_seconds, settings.detect.gemm_sqnr_threshold)
        except NotFound as error:
            print(f"numwatch: {error.message} (see `numwatch runs`)", file=sys.stderr)
            return 1
    output = Path(args.output or f"{args.run}.html")
    output.write_text(page, encoding="utf-8")
    print(f"wrote the run page of {args.run!r} to {output} ({len(page) / 1e6:.1f} MB, opens offline)")
    return 0


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.done, self.label = total, 0, label

    def __call__(self, n: int) -> None:
        self.done += n
        width = 30
        filled = width * self.done // max(self.total, 1)
        end = "\n" if self.done >= self.total else ""
        print(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}",
            end=end,
            file=sys.stderr,
            flush=True,
        )


def cmd_sync(args: argparse.Namespace) -> int:
    from numwatch.delivery.spool import default_spool_root
    from numwatch.delivery.sync import pending_documents, upload_spool

    root = args.spool_dir or default_spool_root()
    if not args.url:
        print(f"numwatch sync: no collector URL: pass --url or set {client_settings.URL}", file=sys.stderr)
        return 2
    total = pending_documents(root)
    if total == 0:
        print(f"nothing to upload in {root}")
        return 0
    report = upload_spool(root, args.url, args.token, Progress(total, "uploading"))
    print(f"uploaded {report.uploaded} documents from {report.directories} run/rank directories in {root}")
    for line in report.renamed:
        print(f"run name taken by another process, stored under a new name: {line}", file=sys.stderr)
    for line in report.rejected:
        print(f"rejected by the collector (not retried): {line}", file=sys.stderr)
    if report.unreachable:
        print(
            f"\nnumwatch sync: stopped, collector unavailable ({report.unreachable}); run it again later — it resumes "
            "where it stopped",
            file=sys.stderr,
        )
        return 1
    return 1 if report.rejected else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from numwatch.monitor.ops.demo import DemoPlan, run_demo

    try:
        plan = DemoPlan.of_length(args.steps)
    except ValueError as error:
        raise SystemExit(f"numwatch demo: {error}") from None
    run_demo(url=args.url, plan=plan, keep_serving=not args.exit)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numwatch",
        description="numwatch: numeric-health monitoring for PyTorch training (collector, tokens, runs, sync, demo).",
        epilog=(
            "Training side: `import numwatch; numwatch.watch(model, optimizer, scaler=scaler)`. Each command has "
            "its own --help."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the collector (HTTP API, /metrics)",
        description=(
            "Run the collector. On 127.0.0.1 auth is off unless --auth token; elsewhere tokens are required. "
            "The embedded SQLite database is created and migrated on first start; other databases need `numwatch db "
            "upgrade`."
        ),
    )
    serve.add_argument("--host", default=None, help="address to bind (default: env NUMWATCH_HOST, else 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: env NUMWATCH_PORT, else 8428)")
    serve.add_argument(
        "--auth",
        choices=("token", "off"),
        help="require bearer tokens (default: env NUMWATCH_AUTH, else off on loopback, token elsewhere)",
    )
    serve.add_argument(
        "--open-reads", action="store_true", help="let reads (API, not /metrics) through without a token"
    )
    serve.add_argument("--insecure-no-auth", action="store_true", help="allow --auth off on a non-loopback address")
    serve.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    _add_database(serve)
    serve.set_defaults(func=cmd_serve)

    database = commands.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    upgrade = database.add_parser("upgrade", help="create or migrate the database schema to this version")
    _add_database(upgrade)
    upgrade.set_defaults(func=cmd_db_upgrade)

    token = commands.add_parser("token", help="bearer tokens for writers and readers").add_subparsers(
        dest="token_command", required=True, metavar="ACTION"
    )
    create = token.add_parser("create", help="create a token for a project (printed once, on the last line)")
    create.add_argument("--project", required=True, help="the project the token may write and read")
    create.add_argument("--name", default="", help="a label, e.g. who uses it")
    _add_database(create)
    create.set_defaults(func=cmd_token_create)
    revoke = token.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int, help="token id (see `numwatch token list`)")
    _add_database(revoke)
    revoke.set_defaults(func=cmd_token_revoke)
    listing = token.add_parser("list", help="list tokens (ids, projects; never the tokens)")
    _add_database(listing)
    listing.set_defaults(func=cmd_token_list)

    runs = commands.add_parser(
        "runs", help="table of runs: status, last step, loss, grad norm, scale, events; `runs delete RUN`"
    )
    _add_database(runs)
    runs.set_defaults(func=cmd_runs)
    runs_delete = runs.add_subparsers(dest="runs_command", metavar="ACTION").add_parser(
        "delete", help="delete a run and all its data (in short transactions: other runs keep ingesting)"
    )
    runs_delete.add_argument("run")
    _add_database(runs_delete)
    runs_delete.set_defaults(func=cmd_runs_delete)
    gc = commands.add_parser(
        "gc",
        help="delete runs not heard from for a while, and rows of runs deleted by hand",
        description=(
            "Delete every run whose last batch or registration is older than --older-than "
            "(of --project only, if given), finish deletions cut short, remove rows left by runs deleted by hand, "
            "and give the space back (SQLite)."
        ),
    )
    gc.add_argument("--older-than", type=duration, required=True, metavar="AGE", help="e.g. 30d, 12h, 90m, 2w")
    gc.add_argument("--project", help="only runs of this project")
    _add_database(gc)
    gc.set_defaults(func=cmd_gc)
    show = commands.add_parser("show", help="one run's state and recent events")
    show.add_argument("run", help="run name")
    _add_database(show)
    show.set_defaults(func=cmd_show)

    export = commands.add_parser(
        "export", help="write a run's page as one self-contained HTML file (data and scripts inline)"
    )
    export.add_argument("run", help="run name")
    export.add_argument("-o", "--output", help="file to write (default: RUN.html)")
    _add_database(export)
    export.set_defaults(func=cmd_export)

    sync = commands.add_parser("sync", help="upload the local spool (written while offline) to a collector")
    _add_collector(sync)
    sync.add_argument(
        "--spool-dir",
        default=None,
        help=f"spool root (default: env {client_settings.SPOOL_DIR}, else ~/.local/share/numwatch/spool)",
    )
    sync.set_defaults(func=cmd_sync)

    demo = commands.add_parser(
        "demo", help="train a small GPT that goes wrong on purpose, then serve its run page until Ctrl-C"
    )
    demo.add_argument("--url", default=None, help="use this collector instead of starting one")
    demo.add_argument(
        "--steps",
        type=int,
        default=240,
        help="training steps (default 240; at least 60): the instability starts halfway",
    )
    demo.add_argument(
        "--exit", action="store_true", help="stop after the report instead of serving the run page until Ctrl-C"
    )
    demo.set_defaults(func=cmd_demo)

    _add_server_commands(commands)
    return parser


def _add_server_commands(commands: Any) -> None:
    """`stack` and `grafana`, when the server extra is installed (a client-only install has `sync`)."""
    try:
        from numwatch.monitor.ops.grafana import add_grafana_cli
        from numwatch.monitor.ops.stack import add_stack_cli
    except ImportError:
        return
    add_stack_cli(commands)
    add_grafana_cli(commands)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

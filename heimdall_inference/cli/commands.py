"""The ``heimdall-inference`` command line: every sub-command, parsed and dispatched.

    heimdall-inference simulate --count 20 --out scenes/          # heimdall.iq/v1 payloads + truth
    heimdall-inference predict scenes/scene-0000.json --plot map.png
    heimdall-inference evaluate --scenes 1000                      # model vs grid posterior vs CRB
    heimdall-inference bench --in-process                          # the pipeline's own limit
    heimdall-inference bench --quick --plot bench.png              # the service over HEIMDALL_* servers
    heimdall-inference model info | register FILE | promote VERSION --alias A | list   # MLflow registry
    heimdall-inference demo                                        # the service, embedded: tasks + chord
    heimdall-inference db init                                     # predictions + rejections tables
    heimdall-inference submit scenes/scene-0000.json               # through the broker (HEIMDALL_* env)
    heimdall-inference dead list                                   # what is in heimdall.dead, and why
    heimdall-inference export --geojson fixes.geojson              # recent fixes for QGIS or Grafana
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main"]


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="ONNX model file (default: the shipped reference model)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="heimdall-inference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write simulated heimdall.iq/v1 payloads and their truth")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="directory for scene-NNNN.{json,msgpack} and the truth beside each (scene-NNNN.truth, JSON)")
    p.add_argument("--format", choices=("json", "msgpack"), default="json")
    p.add_argument("--dtype", choices=("mixed", "ci16", "complex64"), default="mixed")
    p.add_argument("--receivers", type=int, default=None, help="receivers online per scene (default: 3-7 at random)")
    p.add_argument("--sample-rate-hz", type=float, default=12_000.0)

    p = sub.add_parser("predict", help="locate payload files in-process and print the fixes as JSON")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--plot", type=Path, default=None, help="write a map picture (PNG)")
    _add_model(p)

    p = sub.add_parser("evaluate", help="held-out scenes: model vs grid posterior vs Cramér-Rao bound")
    p.add_argument("--scenes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--grid-step-m", type=float, default=None,
                   help="grid posterior cells (default: 2000 in the nominal world, 4000 in the wide one)")
    p.add_argument("--world", choices=("nominal", "wide"), default="nominal",
                   help="the scenes' priors, which the grid posterior marginalises too: the nominal world, or a "
                        "harder one with faulty receivers (lab/simulator.py, Priors.wide)")
    p.add_argument("--band", choices=("2m", "70cm"), default=None,
                   help="the band's model (the shipped one) and physics; default: the band --model declares")
    p.add_argument("--no-grid", action="store_true", help="the model's figures only (seconds instead of minutes)")
    p.add_argument("--workers", type=int, default=1, help="processes for the grid posterior")
    p.add_argument("--reliability", type=Path, default=None, help="also draw the reliability diagram (PNG)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    _add_model(p)

    p = sub.add_parser("bench", help="benchmarks: the service over the configured broker, or --in-process")
    p.add_argument("--in-process", action="store_true",
                   help="only the in-process pipeline on one core (the service's limit)")
    p.add_argument("--batch-sizes", default="1,8,32,128", help="--in-process batch sizes")
    p.add_argument("--seconds", type=float, default=2.0, help="--in-process seconds per batch size")
    p.add_argument("--quick", action="store_true", help="service bench in under two minutes")
    p.add_argument("--tiny", action="store_true", help="service bench in seconds (accounting checks)")
    p.add_argument("--embedded", action="store_true", help="service bench on the embedded transport (no servers)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="worker children")
    p.add_argument("--no-start-worker", action="store_true", help="use workers that are already running")
    p.add_argument("--batch-max", type=int, default=32,
                   help="HEIMDALL_BATCH_MAX of the started worker: micro-batches of single tasks (1 = off)")
    p.add_argument("--writes", action="store_true",
                   help="single inserts, executemany and COPY into the predictions table (HEIMDALL_DATABASE_URL)")
    p.add_argument("--swap", action="store_true",
                   help="a model hot swap under open-loop load (needs MLFLOW_TRACKING_URI and the [registry] extra)")
    p.add_argument("--live-batch", type=int, default=None, metavar="N",
                   help="payloads of the batch that runs while live fixes are measured (0 = skip that phase)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="latency vs load, throughput vs concurrency (PNG)")
    _add_model(p)

    p = sub.add_parser("submit", help="publish payload files as heimdall.predict tasks and print the fixes")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--timeout-s", type=float, default=30.0)

    p = sub.add_parser("db", help="database schema")
    p.add_argument("action", choices=("init",))

    p = sub.add_parser("dead", help="dead letters in heimdall.dead: list, show, replay, purge (HEIMDALL_* env)")
    p.add_argument("action", choices=("list", "show", "replay", "purge"))
    p.add_argument("task_ids", nargs="*", help="show: one task id; replay: the task ids to replay")
    p.add_argument("--all", action="store_true", help="replay: every dead letter")
    p.add_argument("--limit", type=int, default=100, help="list: at most this many")
    p.add_argument("--yes", action="store_true", help="purge: confirm dropping every dead letter")

    p = sub.add_parser("export", help="recent fixes from the database as GeoJSON (HEIMDALL_DATABASE_URL)")
    p.add_argument("--geojson", type=Path, required=True, help="the FeatureCollection to write")
    p.add_argument("--since-hours", type=float, default=24.0, help="fixes captured in the last this many hours (0 = all)")
    p.add_argument("--limit", type=int, default=10_000, help="at most this many fixes, newest first")
    p.add_argument("--no-ellipses", action="store_true", help="points only (no 95 %% ellipse polygons)")

    from .registry import add_parser as add_model_parser

    add_model_parser(sub)

    p = sub.add_parser("demo", help="the service on this machine alone: a real worker on an embedded broker, "
                                    "simulated transmissions as tasks and a batch chord, a table and a map")
    p.add_argument("--count", type=int, default=8, help="single heimdall.predict tasks")
    p.add_argument("--batch", type=int, default=64, help="payloads in the batch chord")
    p.add_argument("--data-dir", type=Path, default=None, help="broker/results/SQLite folder (default: a temp dir)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--plot", type=Path, default=Path("heimdall-demo.png"))
    _add_model(p)
    return ap


def _simulate(args: argparse.Namespace) -> int:
    from ..core.codec import dumps
    from ..core.network import reference_network
    from ..lab.simulator import SignalConfig, scene_payloads, simulate

    net = reference_network()
    signal = SignalConfig(sample_rate_hz=args.sample_rate_hz)
    scenes, iq = simulate(net, args.count, args.seed, signal=signal, n_online=args.receivers)
    docs = scene_payloads(scenes, iq, net, signal, seed=args.seed, dtype=args.dtype, binary=args.format == "msgpack")
    args.out.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (args.out / f"scene-{i:04d}.{args.format}").write_bytes(dumps(doc, args.format))
        (args.out / f"scene-{i:04d}.truth").write_text(json.dumps(scenes.truth(i, net), indent=1))
    print(f"wrote {len(docs)} {args.format} payloads and their truth to {args.out}")
    return 0


def _truth_for(path: Path) -> dict[str, Any] | None:
    t = path.with_name(path.name.rsplit(".", 1)[0] + ".truth")
    return json.loads(t.read_text()) if t.exists() else None


def _predict(args: argparse.Namespace) -> int:
    from ..errors import PayloadError
    from ..core.localizer import Localizer

    loc = Localizer(args.model)
    results = loc.predict_many([f.read_bytes() for f in args.files])
    fixes, truths, status = [], [], 0
    for f, r in zip(args.files, results):
        if isinstance(r, PayloadError):
            print(json.dumps({"file": str(f), "error": r.to_dict()}))
            status = 2
        else:
            print(json.dumps(r) if len(args.files) > 1 else json.dumps(r, indent=2))
            fixes.append(r)
            truths.append(_truth_for(f))
    if args.plot and fixes:
        from .plot import plot_fixes

        plot_fixes(loc.spec.network, fixes, args.plot, truths=truths)
        print(f"map written to {args.plot}", file=sys.stderr)
    return status


def _evaluate(args: argparse.Namespace) -> int:
    from ..core.session import ModelSession, shipped_model_path
    from ..lab.evaluation import band_of, evaluate
    from ..lab.simulator import Priors

    model = args.model or (shipped_model_path(args.band) if args.band else None)
    band = band_of(ModelSession(model).spec)
    if args.band and args.band != band:
        from ..errors import ConfigError

        raise ConfigError(f"--band {args.band}: the model serves the {band} band")
    report = evaluate(model, scenes=args.scenes, seed=args.seed, grid_step_m=args.grid_step_m,
                      priors=Priors.preset(args.world, band), grid=not args.no_grid, workers=args.workers,
                      progress=lambda m: print(m, file=sys.stderr))
    print(f"world: {args.world}, band: {band}")
    print(report.table())
    print(report.receivers_table())
    if args.reliability:
        from ..lab.card import plot_reliability

        plot_reliability([report.figures()], args.reliability, f"{report.model['name']} v{report.model['version']}")
    if args.json:
        args.json.write_text(json.dumps(report.figures(), indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.writes:
        from ..bench.writes import bench_writes, format_writes
        from ..settings import process_settings

        report = bench_writes(process_settings().database_url, progress=lambda m: print(m, file=sys.stderr))
        print(format_writes(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    if args.in_process:
        from ..bench.inprocess import bench_in_process, format_in_process

        sizes = tuple(int(x) for x in args.batch_sizes.split(","))
        report = bench_in_process(args.model, batch_sizes=sizes, seconds_per_size=args.seconds)
        print(format_in_process(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    import tempfile

    if args.swap:
        from ..bench.swap import format_swap_report, run_swap_bench
        from ..settings import process_settings

        report = run_swap_bench(process_settings(), workers=args.workers,
                                progress=lambda m: print(m, file=sys.stderr))
        print(format_swap_report(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=float))
        return 0 if report["lost"] == 0 and report["failed"] == 0 else 3

    from ..bench.service import BenchConfig, format_report, plot_report, save_report, run_service_bench
    from ..settings import Settings, process_settings

    sizes = {} if args.live_batch is None else {"live_batch_payloads": max(0, args.live_batch)}
    cfg = (BenchConfig.tiny if args.tiny else BenchConfig.quick if args.quick else BenchConfig)(
        workers=args.workers, batch_max=args.batch_max, **sizes)
    tmp = Path(tempfile.mkdtemp(prefix="heimdall-bench-"))
    settings = Settings.embedded(tmp) if args.embedded else process_settings()
    report = run_service_bench(settings, cfg, start_worker=not args.no_start_worker, log_dir=tmp,
                               model=str(args.model or ""), progress=lambda m: print(m, file=sys.stderr))
    print(format_report(report))
    if args.json:
        save_report(report, args.json)
    if args.plot:
        plot_report(report, args.plot)
    return 0 if report["accounting"]["lost"] == 0 else 3


def _submit(args: argparse.Namespace) -> int:
    from ..client import submit, wait
    from ..core.codec import loads_raw
    from ..errors import PayloadError

    status = 0
    pending = [(f, submit(loads_raw(f.read_bytes(), 64 * 1024 * 1024))) for f in args.files]
    for f, res in pending:
        try:
            print(json.dumps(wait(res, timeout_s=args.timeout_s)))
        except PayloadError as exc:
            print(json.dumps({"file": str(f), "task_id": res.id, "error": exc.to_dict()}))
            status = 2
    return status


def _db(args: argparse.Namespace) -> int:
    import logging

    from ..settings import process_settings
    from ..store import open_store

    # the pool's own warnings (one per failed connection attempt) would bury the one line below
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    s = process_settings()
    store = open_store(s.database_url, schema=s.db_schema)
    try:
        report = store.init_schema(timescaledb=s.timescaledb)
    finally:
        store.close()
    print(json.dumps(report))
    if report.get("timescaledb_note"):
        print(f"heimdall-inference: {report['timescaledb_note']}", file=sys.stderr)
    return 0


def _dead(args: argparse.Namespace) -> int:
    from ..ops import deadletters
    from ..settings import process_settings
    from ..worker.celery_app import configure_app

    app = configure_app(process_settings())
    if args.action == "list":
        for d in deadletters.list_dead(app, limit=args.limit):
            print(json.dumps(d.to_dict(), default=str))
        return 0
    if args.action == "show":
        if len(args.task_ids) != 1:
            print("heimdall-inference dead show: give one task id", file=sys.stderr)
            return 2
        found = deadletters.show_dead(app, args.task_ids[0])
        if found is None:
            print(f"heimdall-inference dead show: {args.task_ids[0]} is not in heimdall.dead", file=sys.stderr)
            return 1
        print(json.dumps({**found[0].to_dict(), "headers": found[1]}, indent=2, default=str))
        return 0
    if args.action == "replay":
        if not args.task_ids and not args.all:
            print("heimdall-inference dead replay: give task ids, or --all", file=sys.stderr)
            return 2
        done = deadletters.replay(app, None if args.all else args.task_ids)
        print(json.dumps({"replayed": done}))
        return 0 if args.all or set(done) == set(args.task_ids) else 1
    if not args.yes:
        print("heimdall-inference dead purge: drops every dead letter; add --yes", file=sys.stderr)
        return 2
    print(json.dumps({"purged": deadletters.purge(app)}))
    return 0


def _model(args: argparse.Namespace) -> int:
    from .registry import run

    return run(args)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(count=args.count, batch=args.batch, seed=args.seed, plot=args.plot, model=args.model,
             data_dir=args.data_dir)
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..settings import process_settings
    from ..store import open_store
    from .export import export_geojson

    if args.since_hours < 0 or args.limit < 1:
        raise ConfigError("--since-hours must be >= 0 (0: all) and --limit >= 1")
    s = process_settings()
    store = open_store(s.database_url, schema=s.db_schema, pool_max=1)
    try:
        print(json.dumps(export_geojson(store, args.geojson, since_hours=args.since_hours or None, limit=args.limit,
                                        ellipses=not args.no_ellipses)))
    finally:
        store.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. An expected failure (a bad setting, an unreachable or refusing server, a model
    that cannot load) is one line on stderr and exit status 2 (config) or 1, never a traceback."""
    from ..errors import ConfigError, HeimdallError

    args = _parser().parse_args(argv)
    handler = {"simulate": _simulate, "predict": _predict, "evaluate": _evaluate, "bench": _bench,
               "model": _model, "demo": _demo, "submit": _submit, "db": _db, "dead": _dead,
               "export": _export}[args.command]
    try:
        return handler(args)
    except ConfigError as exc:  # a bad HEIMDALL_* variable: one line, not a traceback
        print(f"heimdall-inference: {exc}", file=sys.stderr)
        return 2
    except HeimdallError as exc:  # a server down or refusing, a model that cannot be used
        print(f"heimdall-inference {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file that is not there or cannot be read or written
        print(f"heimdall-inference {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

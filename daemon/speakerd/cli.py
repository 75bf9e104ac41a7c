"""The ``speakerd`` command: one foreground entry point; logs to stderr; never forks."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, SpeakerdError

logger = logging.getLogger("speakerd")

STORE_LOCK_WAIT_S = 10.0
"""How long an offline edit waits for another short one on the same store (a daemon: not at all)."""

EXAMPLES = """\
examples:
  speakerd models build ge2e-resemblyzer          build the default model (offline after the first time)
  speakerd enroll Alice alice1.flac alice2.flac   enroll a speaker from recordings
  speakerd run                                    listen to the default microphone
  speakerd run --source file:meeting.wav --no-realtime --events-out -
  speakerd listen                                 print events from a running daemon
  speakerd label events.jsonl meeting.srt -o named.srt   name a transcript's lines from recorded events
  speakerd service install --dry-run              show the login service it would install
"""


# -- shared helpers -------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, **daemon: Any):  # noqa: ANN202
    from .settings import load_settings

    overrides: dict[str, dict[str, Any]] = {}
    if daemon:
        overrides["daemon"] = {k: v for k, v in daemon.items() if v is not None}
    embedding = {}
    if getattr(args, "model", None):
        embedding["model"] = args.model
    if getattr(args, "backend", None):
        embedding["backend"] = args.backend
    if embedding:
        overrides["embedding"] = embedding
    if getattr(args, "pub", None):
        overrides["publish"] = {"endpoint": args.pub}
    if getattr(args, "events_out", None):
        overrides.setdefault("publish", {})["events_out"] = args.events_out
    if getattr(args, "control", None):
        overrides["control"] = {"endpoint": args.control}
    return load_settings(Path(args.config) if getattr(args, "config", None) else None, overrides)


def _store_dir(args: argparse.Namespace, settings) -> Path:  # noqa: ANN001
    from .store import default_store_dir

    chosen = getattr(args, "store", None) or settings.daemon.store
    return Path(chosen).expanduser() if chosen else default_store_dir()


def _open_store(args: argparse.Namespace, settings, *, create: bool = True):  # noqa: ANN001, ANN202
    from .bundle import resolve_bundle
    from .store import SpeakerStore

    bundle = resolve_bundle(settings.embedding.model)
    store = SpeakerStore(_store_dir(args, settings), fingerprint=bundle.fingerprint, dim=bundle.embedding_dim, create=create)
    return bundle, store


def _backend(bundle, settings):  # noqa: ANN001, ANN202
    from .embedding import backend_for

    return backend_for(bundle, settings.embedding, settings.windows)


def _add_common(p: argparse.ArgumentParser, *, store: bool = True, model: bool = True) -> None:
    p.add_argument("--config", metavar="F", help="TOML settings file (see config/default.toml)")
    if store:
        p.add_argument("--store", metavar="DIR", help="speaker store directory (default: the platform data dir)")
    if model:
        p.add_argument("--model", metavar="NAME_OR_DIR", help="model bundle name under models/ or a bundle directory")


# -- commands -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon, exit_process

    def load():  # noqa: ANN202 - Settings; re-run on SIGHUP with the same command-line overrides
        return _settings(args, source=args.source, realtime=args.realtime)

    settings = load()
    if args.verbose == 0 and not args.quiet:  # -v / -q on the command line beat daemon.log_level
        logging.getLogger().setLevel(settings.daemon.log_level.upper())
    code = Daemon(settings, store_dir=_store_dir(args, settings), load_settings=load).run()
    exit_process(code)  # a clean stop must not wait on interpreter teardown (see exit_process)


def cmd_service(args: argparse.Namespace) -> int:
    from .service import main_service

    return main_service(args)


def cmd_enroll(args: argparse.Namespace) -> int:
    from .enroll import add_room_versions, enroll_beside_daemon, enrollment_rooms, prepare_enrollment
    from .names import check_name
    from .store import DB_NAME

    check_name(args.name)  # before any audio is read: a refused name wastes no work
    settings = _settings(args)
    if args.room_versions is not None:
        settings = dataclasses.replace(settings, enroll_rooms=dataclasses.replace(settings.enroll_rooms, versions=args.room_versions))
    # an existing store is opened first, so a wrong model is said before the work; a new one is
    # created only for an enrollment that is accepted
    exists = (_store_dir(args, settings) / DB_NAME).exists()
    with ExitStack() as held:
        bundle, store = _open_store(args, settings) if exists else (None, None)
        if store is not None:
            held.enter_context(store)
        else:
            from .bundle import resolve_bundle

            bundle = resolve_bundle(settings.embedding.model)
        backend = _backend(bundle, settings)
        held.callback(backend.close)
        report = prepare_enrollment(args.name, [Path(p) for p in args.audio], settings, bundle.features, backend.embed)
        multi, responses = enrollment_rooms(bundle, settings.enroll_rooms, asked=args.room_versions is not None)
        report = add_room_versions(report, settings, bundle.features, backend.embed, multi, responses)
        if store is None:
            store = held.enter_context(_open_store(args, settings)[1])
        speaker, daemon = enroll_beside_daemon(store, args.name, report.embeddings_matrix(), ",".join(map(str, args.audio)),
                                               report.rooms_matrix())
    print(f"enrolled {speaker.name} ({speaker.id}): {report.total_speech_s:.1f} s of speech, "
          f"{report.num_embeddings} window embeddings from {len(report.files)} file(s); "
          f"{speaker.num_embeddings} embeddings stored in all")
    for f in report.files:
        rooms = f", {len(f.in_rooms)} through rooms" if f.in_rooms is not None else ""
        print(f"  {f.path}: {f.speech_s:.1f} s speech, {len(f.embeddings)} windows{rooms}")
    if multi.versions:
        print(f"  each recording was also heard through {multi.versions} simulated rooms: a voiceprint for the voice "
              f"across a room from a table microphone (multi-condition enrollment; --room-versions 0: none)")
    if report.consistency:
        worst = min(report.consistency)
        verdict = "consistent" if worst >= 0.6 else "INCONSISTENT: check that every file is the same person"
        print(f"  consistency: min {worst:.2f}, mean {sum(report.consistency) / len(report.consistency):.2f} ({verdict})")
    if daemon is not None:
        print(f"{daemon} serves this store: asked it to reload (SIGHUP), so it names {speaker.name} from now on")
    return 0


def cmd_speakers(args: argparse.Namespace) -> int:
    from .control_client import DAEMON_ONLY_ACTIONS, speakers_client, speakers_via_daemon

    settings = _settings(args)
    if not args.offline:  # a running daemon first: it must see the change, and it owns the stream
        curve = None
        if args.curve_keys:  # loaded exactly as `speakerd listen --curve-keys` loads them
            from .security import CurveClient

            curve = CurveClient.from_dir(Path(args.curve_keys).expanduser())
        endpoint, timeout_s = settings.control.resolved_endpoint, settings.control.client_timeout_s
        # without --curve-keys, the keys of daemon.curve_keys (the daemon's own, when this config is its config)
        client = speakers_client(endpoint, timeout_s=timeout_s, curve=curve, config_keys=settings.daemon.curve_keys)
        if client is not None:  # None: no daemon on the local endpoint, so the store it is
            return speakers_via_daemon(client, args)
    if args.action in DAEMON_ONLY_ACTIONS:
        raise SpeakerdError(f"`speakers {args.action}` needs a running daemon; none answers on {settings.control.resolved_endpoint}")
    from .store import DB_NAME
    from .storelock import StoreLock

    directory = _store_dir(args, settings)
    with ExitStack() as held:
        if args.action != "list" and (directory / DB_NAME).exists():  # an edit: never behind a serving daemon's back
            held.enter_context(StoreLock(directory, f"speakerd speakers {args.action}").acquire(wait_s=STORE_LOCK_WAIT_S))
        store = held.enter_context(_open_store(args, settings, create=False)[1])  # never creates a store
        if args.action == "list":
            speakers = store.speakers()
            if not speakers:
                print(f"no speakers enrolled in {store.directory}")
            for s in speakers:
                print(f"{s.id}  {s.name:<24} {s.num_embeddings:5d} embeddings")
        elif args.action == "rename":
            s = store.rename(args.old, args.new)
            print(f"renamed {args.old} -> {s.name} ({s.id})")
        elif args.action == "remove":
            s = store.remove(args.name)
            print(f"removed {s.name} ({s.id}) and its {s.num_embeddings} embeddings")
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from .bundle import resolve_bundle
    from .recover import recover_store

    settings = _settings(args)
    bundle = resolve_bundle(settings.embedding.model)
    directory = _store_dir(args, settings)
    report = recover_store(directory, fingerprint=bundle.fingerprint, dim=bundle.embedding_dim)
    if report is None:
        print(f"the speaker store in {directory} opens fine: nothing to recover, nothing changed")
        return 0
    print("\n".join(report.lines()))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .bundle import resolve_bundle
    from .calibrate import main_calibrate

    if args.write_bundle and args.model and args.model != args.write_bundle:
        raise SpeakerdError(f"--write-bundle {args.write_bundle} calibrates that model; leave out --model {args.model}")
    if args.write_bundle:
        args.model = args.write_bundle
    settings = _settings(args)
    bundle = resolve_bundle(settings.embedding.model)
    backend = _backend(bundle, settings)
    try:
        return main_calibrate(args, settings, bundle, backend.embed)
    finally:
        backend.close()


def cmd_keys(args: argparse.Namespace) -> int:
    from .security import SERVER, default_keys_dir, generate_keypair

    directory = Path(args.dir).expanduser() if args.dir else default_keys_dir()
    public, secret = generate_keypair(directory, args.name or SERVER)
    print(f"wrote {public} and {secret} (0600, in a 0700 directory)")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from .devices import format_devices, list_input_devices

    print(format_devices(list_input_devices()))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models.build import build_model, list_models

    if args.action == "list":
        for row in list_models():
            print(format_model_row(row))
        return 0
    if args.action == "show":
        from .bundle import resolve_bundle
        from .decisions.values import describe

        print(describe(resolve_bundle(args.name), _settings(args).decision))
        return 0
    if args.action == "build":
        bundle = build_model(args.name, Path(args.out) if args.out else None, coreml=args.coreml)
        print(f"built {bundle.name} in {bundle.path} ({bundle.fingerprint})")
        return 0
    if args.action == "convert":
        from .models.wespeaker.convert import main_convert

        return main_convert(args)
    if args.action == "fetch":
        from .models.wespeaker.fetch import main_fetch

        return main_fetch(args)
    raise AssertionError(args.action)


def format_model_row(row: dict[str, Any]) -> str:
    """A model's name and state on its first line (scripts/setup greps ``^NAME *built``), then what it
    is and the command that builds it."""
    from .bundle import DEFAULT_MODEL

    built = [kind for kind, present in row["artifacts"].items() if present]
    state = "broken" if row.get("error") else ("built" if row["built"] else "not built")
    head = f"{row['name']:<24} {state:<10}"
    if built:
        head += f" {'+'.join(built):<12} {row['fingerprint']}"
    if row["name"] == DEFAULT_MODEL:
        head += "  (default)"
    lines = [head.rstrip()]
    if row["description"]:
        lines.append(f"    {row['description']}")
    if row.get("error"):
        lines.append(f"    {row['error']}")
    verb = "rebuild" if row["built"] else "build"
    lines.append(f"    {verb}: {row['get']}" if row["get"] else "    a bundle of your own (not built by speakerd)")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import main_eval

    return main_eval(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main_bench

    return main_bench(args)


def cmd_listen(args: argparse.Namespace) -> int:
    from .listen import main_listen

    return main_listen(args)


# -- parser ---------------------------------------------------------------------------------------


def command_in(argv: Sequence[str]) -> str:
    """The sub-command ``argv`` names: the first word that is not an option (global options take no
    value), or "" when there is none (``speakerd --help``)."""
    return next((a for a in argv if not a.startswith("-")), "")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command with every option; with ``only``, the options of that command alone.

    A command's options can come from its own module (eval, bench, calibrate, listen, service, model
    conversion), and importing them all costs 0.4 s (the evaluation imports scipy.optimize): ``main``
    builds only the command it runs, so ``speakerd run --help`` starts in a tenth of that.
    """

    def wanted(command: str) -> bool:
        return only is None or only == command

    parser = argparse.ArgumentParser(
        prog="speakerd",
        description="Listens to the microphone and tells subscribers, as it happens, who is speaking.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"speakerd {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground", description="Run the daemon in the foreground; SIGTERM or Ctrl-C stops it cleanly.")
    _add_common(run)
    run.add_argument("--source", metavar="SPEC", help="mic (default), mic:NAME_OR_INDEX or file:PATH")
    pace = run.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=None, help="pace a file source in real time (default)")
    pace.add_argument("--no-realtime", dest="realtime", action="store_false", help="read a file source as fast as possible")
    run.add_argument("--backend", choices=("auto", "onnx", "coreml"), help="embedding backend (default auto)")
    run.add_argument("--pub", metavar="ENDPOINT", help="ZeroMQ PUB endpoint (default tcp://127.0.0.1:5560)")
    run.add_argument("--events-out", metavar="PATH|-", help="also write every event as a JSON line to PATH or stdout")
    run.add_argument("--control", metavar="ENDPOINT", help="control socket (default ipc://<runtime dir>/control.sock)")
    run.set_defaults(func=cmd_run)

    enroll = sub.add_parser("enroll", help="enroll a speaker from recordings", description="Enroll NAME from one or more recordings of that person alone (any format soundfile reads).")
    enroll.add_argument("name", metavar="NAME")
    enroll.add_argument("audio", metavar="AUDIO", nargs="+")
    _add_common(enroll)
    enroll.add_argument("--backend", choices=("auto", "onnx", "coreml"))
    enroll.add_argument("--room-versions", type=int, metavar="N",
                        help="multi-condition enrollment: also embed each recording through N simulated rooms, so the voice "
                             "is recognised across a room from a table microphone; 0: the recordings as they are (default "
                             "enroll_rooms.versions, 2; the rooms come with the model bundle)")
    enroll.set_defaults(func=cmd_enroll)

    speakers = sub.add_parser(
        "speakers",
        help="list, rename or remove enrolled speakers",
        description="Act on speakers through the running daemon's control socket, or on the store when "
        "no daemon runs on the local (ipc or loopback) control endpoint; a daemon that is there but does "
        "not answer is an error. CURVE keys come from --curve-keys DIR, else from daemon.curve_keys in "
        "--config. A daemon on another machine needs --control tcp://HOST:PORT and keys; it must answer "
        "then (see docs/control.md).",
    )
    ssub = speakers.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ssub.add_parser("list", help="list enrolled speakers")
    _add_common(p)
    p = ssub.add_parser("rename", help="rename a speaker")
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")
    _add_common(p)
    p = ssub.add_parser("remove", help="forget a speaker and every embedding of theirs")
    p.add_argument("name", metavar="NAME")
    _add_common(p)
    p = ssub.add_parser("enroll", help="enroll NAME from the live stream (needs a running daemon)")
    p.add_argument("name", metavar="NAME")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--last", metavar="SECONDS", type=float, help="the last SECONDS of speech were NAME")
    how.add_argument("--from", dest="source_id", metavar="ID", help="provisional speaker ID (e.g. unknown-2) is NAME")
    _add_common(p)
    p = ssub.add_parser("merge", help="SOURCE is the same voice as TARGET (needs a running daemon)")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET")
    _add_common(p)
    for action, what in (("status", "the running daemon's status"), ("reload", "make the daemon re-read its settings and speakers")):
        _add_common(ssub.add_parser(action, help=what))
    p = ssub.add_parser(
        "recover",
        help="rebuild a lost or damaged store database from its index (offline; keeps the old files)",
        description="Rebuild speakers.sqlite3 from what is left: the rows a damaged database still yields, "
        "and every voiceprint in index.faiss. Names live only in the database: voices whose names are lost "
        "come back as recovered-1, recovered-2, ... grouped by similarity, and the command says what was "
        "lost. The old files are kept in before-recover-<time>/ in the store folder.",
    )
    _add_common(p)
    p.set_defaults(func=cmd_recover)
    for action, p in ssub.choices.items():
        if action == "recover":  # the store itself, never through a daemon
            continue
        p.add_argument(
            "--control",
            metavar="ENDPOINT",
            help="the daemon's control socket (default: control.endpoint, a private ipc:// socket); "
            "a tcp:// one (loopback too) needs CURVE keys (--curve-keys, or daemon.curve_keys in --config)",
        )
        p.add_argument(
            "--curve-keys",
            metavar="DIR",
            help="CURVE key directory holding client.key_secret and the daemon's server.key, for a daemon "
            "with daemon.curve_keys (as `speakerd listen --curve-keys`); without it, the keys in "
            "daemon.curve_keys of --config are used, if set. With --curve-keys, a daemon that does "
            "not answer within control.client_timeout_s is an error, never a fall-back to the store",
        )
        p.add_argument("--offline", action="store_true", help="use the store directly even if a daemon runs")
    speakers.set_defaults(func=cmd_speakers)

    listen = sub.add_parser("listen", help="print events from a running daemon (the reference subscriber)")
    if wanted("listen"):
        from .listen import add_listen_arguments

        add_listen_arguments(listen)
    listen.set_defaults(func=cmd_listen)

    label = sub.add_parser("label", help="name the lines of a transcript (Whisper JSON, SRT, VTT) from an events file",
                           description="Name the lines of a transcript from events recorded with --events-out.")
    if wanted("label"):
        from .label import add_label_arguments, main_label

        add_label_arguments(label)
        label.set_defaults(func=main_label)

    service = sub.add_parser(
        "service",
        help="install, uninstall or check the login service (launchd agent on macOS, systemd user unit elsewhere)",
        description="Run speakerd at login as a user service that restarts it after a crash, not after a clean exit.",
    )
    if wanted("service"):
        from .service import add_service_arguments

        add_service_arguments(service)
    service.set_defaults(func=cmd_service)

    evaluate = sub.add_parser(
        "eval",
        help="measure identification, DER and change detection on conversations built from per-speaker clips",
        description="Build reproducible conversations from AUDIO_DIR (LibriSpeech layout), enroll speakers from "
        "other clips, run the real pipeline through the file source and report DER, identification, "
        "change and latency figures as JSON, Markdown and plots.",
    )
    if wanted("eval"):
        from .evaluation.evaluate import add_eval_arguments

        add_eval_arguments(evaluate)
    evaluate.set_defaults(func=cmd_eval)
    bench = sub.add_parser("bench", help="measure the cost of every stage, real-time factor, ms per window, CPU and memory")
    if wanted("bench"):
        from .bench import add_bench_arguments

        add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    calibrate = sub.add_parser(
        "calibrate",
        help="measure false accepts / rejects on your recordings and choose thresholds",
        description="Enroll known people in memory, score held-out and never-enrolled recordings, "
        "print false-accept / false-reject tables and write the chosen thresholds (see docs/calibration.md).",
    )
    if wanted("calibrate"):
        from .calibrate import add_calibrate_arguments

        add_calibrate_arguments(calibrate)
        _add_common(calibrate, store=False)
    calibrate.set_defaults(func=cmd_calibrate)

    keys = sub.add_parser("keys", help="generate CURVE keys for non-loopback endpoints")
    ksub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ksub.add_parser("generate", help="a key pair, 0600 in a 0700 directory")
    p.add_argument("--dir", metavar="DIR", help="key directory (default: <data dir>/keys)")
    p.add_argument("--name", metavar="NAME", help="key name (default: server; use another for a client)")
    keys.set_defaults(func=cmd_keys)

    devices = sub.add_parser("devices", help="list audio input devices")
    devices.set_defaults(func=cmd_devices)

    models = sub.add_parser("models", help="list, build, convert or fetch model bundles")
    msub = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    msub.add_parser("list", help="every known model, whether it is built, and the command that builds it")
    p = msub.add_parser("show", help="a bundle, its decision values and where each comes from (bundle or config)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--config", metavar="F", help="TOML settings file whose [decision] values override the bundle's")
    p = msub.add_parser("build", help="build a bundle from its packaged source (e.g. ge2e-resemblyzer)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--out", metavar="DIR", help="bundle directory (default models/NAME)")
    p.add_argument(
        "--coreml",
        action=argparse.BooleanOptionalAction,
        help="also convert the CoreML packages (default: on macOS only; Linux cannot run them, and they take minutes)",
    )
    p = msub.add_parser("convert", help="convert a checkpoint into a bundle (ONNX + CoreML + manifest)")
    p.add_argument("family", choices=("wespeaker",))
    fetch = msub.add_parser("fetch", help="download an official checkpoint and convert it (needs internet)")
    fetch.add_argument("name", choices=("wespeaker-resnet34",))
    if wanted("models"):
        from .models.wespeaker.convert import add_convert_arguments
        from .models.wespeaker.fetch import add_fetch_arguments

        add_convert_arguments(p)
        add_fetch_arguments(fetch)
    models.set_defaults(func=cmd_models)
    return parser


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else (logging.INFO if verbose == 0 else logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # faiss logs four INFO lines about CPU instruction sets at every start; they say nothing to act on
    logging.getLogger("faiss.loader").setLevel(max(level, logging.WARNING))


SINGLE_THREADED_BLAS = ("run", "bench")
"""Commands whose process is the daemon (or measures it), so OpenBLAS gets one thread."""


def single_threaded_blas() -> None:
    """One OpenBLAS thread, set before numpy loads it (it reads the variable once); a value the user
    set wins. After a product large enough to split (enrollment, a reload) OpenBLAS's extra thread
    busy-waits for a while: in bench's live run, the spin left by the enrollment just before was
    counted as the daemon's (0.5-0.9 % of a core on 10-15 s runs). The daemon's products (a window
    or a batch against a few hundred rows) gain nothing from it and are bit-identical on one thread.
    (macOS's numpy uses Accelerate, which reads no such variable.)"""
    if "numpy" in sys.modules:
        logger.debug("numpy is already loaded; OpenBLAS keeps its threads")
        return
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if command_in(argv) in SINGLE_THREADED_BLAS:
        single_threaded_blas()
    parser = build_parser(only=command_in(argv))
    args = parser.parse_args(argv)
    _configure_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    except SpeakerdError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `speakerd models list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())

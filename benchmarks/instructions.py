"""Instructions per hook call or per screening run, counted by callgrind: a yardstick the VM's drift cannot move.

Wall-clock figures on the shared development VM drift by half within an hour, so a change worth a few per
cent cannot be seen in them. valgrind's callgrind counts the instructions a process executes, the same
whatever else the machine is doing. This script runs the measured work in a child process under callgrind,
which dumps its counters when the child calls getppid() just before and just after that work (set-up,
rule loading and warm-up are left out), and prints the count of the work alone. With `--against REV` it
counts the same work for the code of a git revision too (a temporary worktree, the same rules and bodies),
alternately, and prints the ratio. User-space instructions only: system calls (a SQLite commit's writes,
random uuids) are not counted. Several minutes a run: a script, not a test.

    python benchmarks/instructions.py hook                     # 200 calls of 50 resources, whole ASGI app
    python benchmarks/instructions.py hook --resources 2000 --calls 20
    python benchmarks/instructions.py screening --patients 300  # one in-process screening run
    python benchmarks/instructions.py hook --against HEAD~1     # this code against an earlier commit's
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure_hook(resources: int, calls: int, workdir: Path) -> None:
    """In the child: the whole app (middleware, the hook lane, the SQLite write) driven without sockets."""
    from harness import NOW, SERVICE, Numbers, build_body, split
    from starlette.types import Message

    from nudges.api.app import create_app
    from nudges.settings import Settings

    settings = Settings(rules=ROOT / "rules", database_url=f"sqlite:///{workdir / 'count.db'}", now=NOW,
                        reload_interval_seconds=0)
    app = create_app(settings)

    async def call(body: bytes) -> None:
        path = f"/cds-services/{SERVICE}"
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": {}}
        sent, status = False, []

        async def receive() -> Message:
            nonlocal sent
            if sent:
                await asyncio.sleep(3600)
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        if status != [200]:
            raise SystemExit(f"the service answered {status}")

    async def run() -> None:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        answers: asyncio.Queue[Message] = asyncio.Queue()
        await queue.put({"type": "lifespan.startup"})

        async def answer(message: Message) -> None:
            await answers.put(message)

        lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                           queue.get, answer))
        started = await answers.get()
        if started["type"] != "lifespan.startup.complete":
            raise SystemExit(f"the app did not start: {started}")
        keys = list(app.state.runtime.services().by_id[SERVICE].discovery("").get("prefetch", {}))
        body, numbers = build_body(keys, *split(resources)), Numbers()
        for _ in range(20):
            await call(body.instance(numbers.next()))
        bodies = [body.instance(numbers.next()) for _ in range(calls)]
        os.getppid()  # callgrind dumps here (--dump-before=getppid): what came before is not counted
        for payload in bodies:
            await call(payload)
        os.getppid()
        await queue.put({"type": "lifespan.shutdown"})
        await lifespan

    asyncio.run(run())


def measure_screening(patients: int, workdir: Path) -> None:
    """In the child: one screening run in process (sharding and screening), after one to warm up."""
    import screening

    from nudges.screening.cluster import InProcess

    screening.write_export(workdir / "export", patients)
    files = sorted((workdir / "export").glob("*.ndjson"))
    settings, services = screening.load_services()
    screening.run_once(files, settings, services, InProcess(), Path(tempfile.mkdtemp(dir=workdir)))
    os.getppid()
    screening.run_once(files, settings, services, InProcess(), Path(tempfile.mkdtemp(dir=workdir)))
    os.getppid()


def child(args: argparse.Namespace) -> None:
    if args.code:  # another revision's package, ahead of the editable install of this checkout
        sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
        sys.path.insert(0, args.code)
        import nudges  # now, before screening.py puts this checkout first on the path

        if not Path(nudges.__file__ or "").resolve().is_relative_to(Path(args.code).resolve()):
            raise SystemExit(f"nudges was imported from {nudges.__file__}, not from {args.code}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    with tempfile.TemporaryDirectory(prefix="nudges-count-") as folder:
        if args.what == "hook":
            measure_hook(args.resources, args.calls, Path(folder))
        else:
            measure_screening(args.patients, Path(folder))


def count(args: argparse.Namespace, code: str | None, out: Path) -> int:
    """The instructions between the child's two getppid() calls (callgrind's second dump)."""
    command = ["valgrind", "--tool=callgrind", "--dump-before=getppid", f"--callgrind-out-file={out}.%p",
               sys.executable, __file__, args.what, "--child", "--resources", str(args.resources),
               "--calls", str(args.calls), "--patients", str(args.patients)] + (["--code", code] if code else [])
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"PYTHONHASHSEED": "0"})
    dumps = sorted(out.parent.glob(f"{out.name}.*.2"))
    if done.returncode != 0 or not dumps:
        raise SystemExit(f"the counted run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = re.search(r"^summary: (\d+)", dumps[-1].read_text(), re.MULTILINE)
    for dump in out.parent.glob(f"{out.name}.*"):
        dump.unlink()
    if found is None:
        raise SystemExit(f"no summary in {dumps[-1]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["hook", "screening"])
    parser.add_argument("--resources", type=int, default=50, help="clinical resources per hook call")
    parser.add_argument("--calls", type=int, default=200, help="hook calls counted")
    parser.add_argument("--patients", type=int, default=300, help="patients in the screening run")
    parser.add_argument("--against", metavar="REV", help="also count a git revision's code, and compare")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    hook = args.what == "hook"
    unit = (f"{args.calls} calls of {args.resources} resources" if hook
            else f"one screening run of {args.patients} patients")
    each = args.calls if hook else args.patients
    with tempfile.TemporaryDirectory(prefix="nudges-count-") as folder:
        out = Path(folder) / "callgrind.out"
        if not args.against:
            total = count(args, None, out)
            print(f"{total:,} instructions for {unit} ({total // max(1, each):,} a {'call' if hook else 'patient'})")
            return 0
        tree = Path(folder) / "against"
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "--detach", "-q", str(tree), args.against], check=True)
        try:
            this, other = count(args, None, out), count(args, str(tree), out)
        finally:
            subprocess.run([*git, "remove", "--force", str(tree)], check=False)
    print(f"{unit}: this code {this:,} instructions, {args.against} {other:,}: {this / other:.3f}x "
          f"({100 * (this - other) / other:+.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

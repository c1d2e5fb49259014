"""The container check `.ci/run` runs: build the project's Dockerfile, then serve audits from the image.

On a machine with buildah, podman and debootstrap (Debian packages) and no registry images:

1. build the image from a fresh clone of this repository's HEAD, on a Debian bookworm root
   filesystem made by ``debootstrap --variant=minbase`` (its tarball is cached under
   ``~/.cache/onnx-auditor``) and imported with ``podman import``, with pip's CA bundle mounted
   for the build only (``--volume BUNDLE:PATH:ro --build-arg PIP_CERT=PATH``);
2. start ``auditor serve`` inside it through the image's own entrypoint and user (read from
   ``buildah inspect``) on a free local port, the store on a volume;
3. the image's HEALTHCHECK command, run inside the image, reports SERVING;
4. upload a model and audit it remotely, the data streamed from this client; the report equals a
   local audit's;
5. the server process runs as the image's non-root user;
6. reports survive a restart of the container on the same store volume;
7. SIGTERM stops it gracefully within ``--grace`` (both stops are checked so).

Containers run with ``buildah run --isolation chroot``: ``podman run`` cannot start one in this
sandbox (crun may not set RLIMIT_NPROC). Chroot isolation shares the host's network, so the
server's port is reachable on 127.0.0.1. Every failure is one line on stderr and exit code 1;
nothing is skipped. Run from the repository root with the project installed:
``python scripts/container_check.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnx-auditor"
ROOTFS = CACHE / "debian-bookworm-minbase.tar"
BASE = "localhost/onnx-auditor-ci-base:bookworm"
IMAGE = "localhost/onnx-auditor:ci"
TOOLS = ("buildah", "podman", "debootstrap")
MODEL = REPO / "examples" / "lenet300_11_4.onnx"
SAMPLES = 500
LONG_SAMPLES = 10000  # streamed one per message, an audit that outlasts --grace
GRACE_S = 5.0
START_TIMEOUT_S = 90.0
STOP_SLACK_S = 10.0  # the process exits this long after --grace at most (interpreter and buildah teardown)
CERT_IN_BUILD = "/run/pip-ca/ca-bundle.pem"


class CheckFailed(Exception):
    """One step of the check failed; its message is the one line CI prints."""


def main() -> int:
    started = time.monotonic()
    try:
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise CheckFailed(f"{', '.join(missing)} not installed; apt-get install buildah podman debootstrap")
        with tempfile.TemporaryDirectory(prefix="auditor-container-") as tmp:
            run_check(Path(tmp))
    except CheckFailed as exc:
        print(f"container check failed: {exc}", file=sys.stderr)
        return 1
    print(f"container check passed in {time.monotonic() - started:.0f} s")
    return 0


def run_check(tmp: Path) -> None:
    with _step("1. build the image from a fresh clone"):
        ensure_base()
        build(tmp / "clone")
    config = image_config()
    entrypoint, user, health = config["Entrypoint"], config["User"], config["Healthcheck"]["Test"]
    if not entrypoint or not user or not health or health[0] != "CMD":
        raise CheckFailed(f"the image lacks an entrypoint, a user or an exec-form HEALTHCHECK: {config}")
    store = tmp / "store"
    store.mkdir()
    uid, _, gid = user.partition(":")
    os.chown(store, int(uid), int(gid or uid))
    data = streamed_data(tmp / "mnist-test.npz", SAMPLES)
    local = audit_json(tmp / "local.json", "--data", str(data))
    with container() as name, serving(name, entrypoint, user, store) as server:
        with _step("1. the build's CA bundle left nothing in the image"):
            # buildah leaves the mount point behind as an empty file; its content must not be there
            probe = ["buildah", "run", "--isolation", "chroot", name, "--", "test", "!", "-s", CERT_IN_BUILD]
            if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
                raise CheckFailed(f"the image holds the build's CA bundle at {CERT_IN_BUILD}")
        with _step("2.-3. serve through the image's entrypoint and user; its HEALTHCHECK reports SERVING"):
            wait_healthy(name, health, server)
        with _step("4. a remote audit, data streamed from the client, equals a local one"):
            remote = audit_json(tmp / "remote.json", "--data", str(data), "--server", server.address)
            same_report(remote, local)
            report_id = only_report_id(server.address)
        with _step("5. the server runs as a non-root user"):
            uid_of_server = server_uid(server)
            if uid_of_server == 0 or str(uid_of_server) != uid:
                raise CheckFailed(f"the server runs as uid {uid_of_server}, not the image's user {user}")
        with _step("6. reports survive a restart on the same store volume"):
            server.terminate()
            with serving(name, entrypoint, user, store) as again:
                wait_healthy(name, health, again)
                fetched = json.loads(cli("reports", report_id, "--server", again.address, "--json", "-"))
                same_report(fetched, local)
                with _step(f"7. SIGTERM stops it, an audit in flight, gracefully within --grace {GRACE_S:g} s"):
                    long = streamed_data(tmp / "mnist-long.npz", LONG_SAMPLES)
                    with in_flight(again, long, tmp / "in-flight.json"):
                        again.terminate()
                    ended = re.search(r"\bAudit model=\w+ samples=(\d+) .*outcome=(\w+)", again.log.read_text())
                    if ended is None:
                        raise CheckFailed("the audit in flight at SIGTERM was never logged as ended")
                    print(f"   the audit in flight ended {ended[2]} after {ended[1]} samples")


# ---- 1. the image ---------------------------------------------------------------------------


def ensure_base() -> None:
    """The Debian base image: imported from the cached root filesystem, debootstrapped once."""
    if subprocess.run(["podman", "image", "exists", BASE], check=False).returncode == 0:
        return
    if not ROOTFS.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="bookworm-", dir=CACHE) as root:
            sh("debootstrap", "--variant=minbase", "bookworm", root, "http://deb.debian.org/debian")
            partial = ROOTFS.with_suffix(".partial")
            sh("tar", "-C", root, "-cf", str(partial), ".")
            partial.rename(ROOTFS)
    sh("podman", "import", str(ROOTFS), BASE)


def build(clone: Path) -> None:
    """Build the Dockerfile of a fresh clone of HEAD (what CI tests is what is committed)."""
    sh("git", "clone", "--quiet", "--no-local", "--depth", "1", f"file://{REPO}", str(clone))
    command = ["buildah", "bud", "--isolation", "chroot", "--format", "docker", "--layers", "--quiet"]
    command += ["--build-arg", f"BASE_IMAGE={BASE}", "--tag", IMAGE]
    bundle = pip_ca_bundle()
    if bundle is not None:
        command += ["--volume", f"{bundle}:{CERT_IN_BUILD}:ro", "--build-arg", f"PIP_CERT={CERT_IN_BUILD}"]
    previous = image_id()
    sh(*command, str(clone))
    if previous is not None and previous != image_id():  # the last run's image, untagged now: keep the disk bounded
        subprocess.run(["buildah", "rmi", previous], check=False, capture_output=True)


def image_id() -> str | None:
    """The ID of the image the check builds, or None before its first build."""
    found = subprocess.run(["buildah", "images", "--quiet", "--no-trunc", IMAGE], capture_output=True, text=True)
    return found.stdout.strip() or None  # an unknown image: an error, and nothing on stdout


def pip_ca_bundle() -> Path | None:
    """The CA bundle pip trusts here ($PIP_CERT, else pip's ``cert`` setting), or None when it has none."""
    named = os.environ.get("PIP_CERT")
    if not named:
        listed = sh(sys.executable, "-m", "pip", "config", "list", quiet=True)
        found = re.findall(r"^\S*\.cert='([^']+)'$", listed, flags=re.MULTILINE)
        named = found[0] if found else None
    return Path(named).resolve() if named else None


def image_config() -> dict:
    """The built image's Docker config: entrypoint, user, healthcheck."""
    inspected = json.loads(sh("buildah", "inspect", "--type", "image", IMAGE, quiet=True))
    return inspected["Docker"]["config"]


# ---- 2.-7. the container --------------------------------------------------------------------


class Serving:
    """``auditor serve`` running in a container: the buildah process, its port and its log."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log
        self.address = f"127.0.0.1:{port}"

    def server_pid(self) -> int:
        """The server's own process: the last descendant of buildah whose arguments include ``serve``
        (buildah's ``buildah-chroot-exec`` above it carries the same arguments)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    children.setdefault(parent, []).append(int(entry.name))
        found, level = None, children.get(self.process.pid, [])
        while level:
            for pid in level:
                with contextlib.suppress(OSError):
                    if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                        found = pid
            level = [child for pid in level for child in children.get(pid, [])]
        if found is None:
            raise CheckFailed(f"no auditor serve process under buildah run; log: {self.tail()}")
        return found

    def terminate(self) -> None:
        """SIGTERM to the server (as ``docker stop`` sends it); it must exit 0 within the grace period."""
        pid = self.server_pid()
        sent = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        try:
            code = self.process.wait(GRACE_S + STOP_SLACK_S)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"the server did not stop within {GRACE_S + STOP_SLACK_S:g} s of SIGTERM") from None
        took = time.monotonic() - sent
        if code != 0 or "stopped" not in self.log.read_text():
            raise CheckFailed(f"the server exited {code} after SIGTERM; log: {self.tail()}")
        print(f"   stopped {took:.1f} s after SIGTERM")

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(empty)"


@contextlib.contextmanager
def container() -> Iterator[str]:
    """A working container of the image, removed afterwards."""
    name = sh("buildah", "from", "--quiet", IMAGE, quiet=True).strip()
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], check=False, capture_output=True)


@contextlib.contextmanager
def serving(name: str, entrypoint: list[str], user: str, store: Path) -> Iterator[Serving]:
    """The image's entrypoint as its user, the store volume mounted, on a free port; killed if left running."""
    port = free_port()
    log = store.parent / f"serve-{port}.log"
    command = ["buildah", "run", "--isolation", "chroot", "--user", user, "--volume", f"{store}:/var/lib/auditor"]
    command += [name, "--", *entrypoint, "--port", str(port), "--grace", str(GRACE_S)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = Serving(process, port, log)
    try:
        yield server
    finally:
        if process.poll() is None:
            with contextlib.suppress(CheckFailed, ProcessLookupError):
                os.kill(server.server_pid(), signal.SIGKILL)
            process.kill()
            process.wait()


def wait_healthy(name: str, healthcheck: list[str], server: Serving) -> None:
    """Run the image's HEALTHCHECK command (pointed at the server's port) until it reports SERVING."""
    command = [arg.replace("127.0.0.1:50051", server.address) for arg in healthcheck[1:]]
    if command == healthcheck[1:]:
        raise CheckFailed(f"the HEALTHCHECK does not probe 127.0.0.1:50051: {healthcheck}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            raise CheckFailed(f"the server exited {server.process.returncode}; log: {server.tail()}")
        probe = subprocess.run(
            ["buildah", "run", "--isolation", "chroot", name, "--", *command], capture_output=True, text=True
        )
        if probe.returncode == 0 and "SERVING" in probe.stdout:
            return
        if time.monotonic() > deadline:
            raise CheckFailed(f"the HEALTHCHECK never reported SERVING: {(probe.stdout + probe.stderr).strip()}")
        time.sleep(1)


def server_uid(server: Serving) -> int:
    status = Path(f"/proc/{server.server_pid()}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, flags=re.MULTILINE).group(1))


# ---- the audits -----------------------------------------------------------------------------


@contextlib.contextmanager
def in_flight(server: Serving, data: Path, out: Path) -> Iterator[None]:
    """A remote audit under way for the block: one sample per message, its call started (the server has
    answered its HasModel); the client is stopped afterwards if it is still going."""
    asked = server.log.read_text().count("HasModel")
    command = [sys.executable, "-m", "auditor.cli", "audit", str(MODEL), "--data", str(data), "--batch-size", "1"]
    command += ["--server", server.address, "--timeout", "60", "--no-progress", "--json", str(out)]
    client = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while server.log.read_text().count("HasModel") == asked:
            if time.monotonic() > deadline or client.poll() is not None:
                raise CheckFailed("the in-flight audit's client never reached the server")
            time.sleep(0.1)
        time.sleep(1)  # its samples are streaming now
        yield
    finally:
        if client.poll() is None:
            client.kill()
        client.wait()


def streamed_data(path: Path, samples: int) -> Path:
    """MNIST's first ``samples`` test samples as a .npz, which a remote audit streams from the client."""
    from auditor.datasets.splits import open_splits

    (dataset,) = open_splits("mnist", "test", limit=samples)
    batches = list(dataset.batches(samples))
    np.savez(path, x=np.concatenate([b.x for b in batches]), y=np.concatenate([b.y for b in batches]))
    return path


def audit_json(out: Path, *args: str) -> dict:
    cli("audit", str(MODEL), *args, "--json", str(out), "--no-progress")
    return json.loads(out.read_text())


def only_report_id(address: str) -> str:
    rows = [json.loads(line) for line in cli("reports", "--server", address).splitlines()]
    if len(rows) != 1:
        raise CheckFailed(f"the server lists {len(rows)} reports after one audit")
    return rows[0]["id"]


def same_report(remote: dict, local: dict) -> None:
    """Every field of the two reports equal (the server names the model as the client did)."""
    differ = sorted(key for key in local.keys() | remote.keys() if remote.get(key) != local.get(key))
    if differ:
        raise CheckFailed(f"the remote report differs from the local one in {differ}")


def cli(*args: str) -> str:
    return sh(sys.executable, "-m", "auditor.cli", *args, quiet=True)


# ---- helpers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sh(*command: str, quiet: bool = False) -> str:
    """Run a command; its stdout, or ``CheckFailed`` with the last line it wrote."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "(no output)").splitlines()[-1]
        raise CheckFailed(f"{' '.join(command[:3])} ... exited {done.returncode}: {last}")
    if not quiet and done.stdout.strip():
        print(done.stdout.strip().splitlines()[-1])
    return done.stdout


@contextlib.contextmanager
def _step(title: str) -> Iterator[None]:
    started = time.monotonic()
    print(title, flush=True)
    yield
    print(f"   ok ({time.monotonic() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())

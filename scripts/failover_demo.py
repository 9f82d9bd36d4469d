"""Failover behind the shipped HAProxy (deploy/haproxy/haproxy.cfg), with real `chatforge serve` replicas.

Two replicas (each in its own network namespace when this process may make them, else on 127.0.0.2 and
127.0.0.3) serving gRPC and the HTTP API (--http-port), HAProxy in front with the shipped file, and 8
concurrent callers sending 1,000 Classify and 200 short Reply calls through it. At the halfway mark one
replica is, in turn:

  drain    SIGTERM: readiness flips, HAProxy detaches it, it finishes what it has and exits 0
  kill     SIGKILL, then restarted at once: detach time, and re-attach time after the restart
  hang     SIGSTOP (a wedged process: it answers nothing), SIGCONT once the load is done

for three modes: gRPC in TCP mode (L4, :LB_TCP) and in HTTP/2 mode (per-call balancing, :LB_H2), with
ChatbotClient callers, and the HTTP API (:LB_HTTP, per-request balancing) with HttpChatClient callers
(POST /v1/classify and streamed POST /v1/chat/completions). Printed per scenario: failed calls (and how
many of them were Reply streams already under way), the detach time (signal -> HAProxy takes the replica out: NOLB for a drain, DOWN for a dead
or hung one) and the re-attach time (restart or SIGCONT -> UP again).
Which replica served a call is read from HAProxy's per-server stats (stot of the mode's backend), the
same for all three modes.

Run by scripts/failover-demo.sh for users and by tests/scenarios/test_failover_haproxy.py in CI.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

import httpx  # noqa: E402
from deploy_helpers import Replica, free_port, http_get, ready, wait_for  # noqa: E402

from chatforge.client import ChatbotClient, ChatbotError  # noqa: E402
from chatforge.client.http import HttpChatClient, HttpChatError  # noqa: E402

HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
# The shipped file's defaults; each replica has its own address.
GRPC_PORT, HTTP_PORT, METRICS_PORT = 50051, 8080, 9100
N_CLASSIFY, N_REPLY, CALLERS = 1000, 200, 8
BACKEND = {"tcp": "chatforge_l4", "h2": "chatforge_h2", "http": "chatforge_http"}
MODES = tuple(BACKEND)
SCENARIOS = ("drain", "kill", "hang")
WAIT = 60.0  # bound on every wait (model loads on a busy 2-core machine)


@dataclass
class Result:
    mode: str
    scenario: str
    calls: int
    failed: int
    failed_started_replies: int
    failed_after_detach: int
    detach_s: float | None
    detach_state: str
    reattach_s: float | None
    exit_code: int | None
    served_by_victim_before: int
    seconds: float
    errors: list[str] = field(default_factory=list)


class Topology:
    """Two replica addresses: network namespaces joined to this one by veth pairs, or loopback."""

    def __init__(self, use_netns: bool | None = None):
        self.tag = f"cf{os.getpid() % 100000}"
        self.netns: list[str | None] = [None, None]
        self.addrs = ["127.0.0.2", "127.0.0.3"]
        self.kind = "loopback"
        if use_netns is not False and os.geteuid() == 0:
            try:
                self._make_netns()
                self.kind = "netns"
            except (OSError, subprocess.CalledProcessError) as e:
                self.close()
                self.netns, self.addrs = [None, None], ["127.0.0.2", "127.0.0.3"]
                if use_netns:
                    raise RuntimeError(f"network namespaces could not be made: {e}") from e

    def _make_netns(self) -> None:
        for i in (0, 1):
            ns, host_if, ns_if = f"{self.tag}-{i}", f"{self.tag}h{i}", f"{self.tag}n{i}"
            subnet = f"10.231.{(os.getpid() + i * 7) % 250 + 1}"
            run = lambda *a: subprocess.run(list(a), check=True, capture_output=True)  # noqa: E731
            run("ip", "netns", "add", ns)
            self.netns[i] = ns
            run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            run("ip", "link", "set", ns_if, "netns", ns)
            run("ip", "addr", "add", f"{subnet}.1/30", "dev", host_if)
            run("ip", "link", "set", host_if, "up")
            run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{subnet}.2/30", "dev", ns_if)
            run("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
            run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            self.addrs[i] = f"{subnet}.2"

    def close(self) -> None:
        for i, ns in enumerate(self.netns):
            if ns:
                subprocess.run(["ip", "link", "del", f"{self.tag}h{i}"], capture_output=True)
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class HAProxy:
    def __init__(self, addrs: list[str], workdir: Path):
        self.tcp, self.h2, self.http, self.stats = free_port(), free_port(), free_port(), free_port()
        self.check_ports = free_port(), free_port()
        env = {**os.environ, "CHATFORGE_REPLICA_A": addrs[0], "CHATFORGE_REPLICA_B": addrs[1],
               "CHATFORGE_GRPC_PORT": str(GRPC_PORT), "CHATFORGE_HTTP_PORT": str(HTTP_PORT),
               "CHATFORGE_METRICS_PORT": str(METRICS_PORT),
               "CHATFORGE_LB_ADDR": "127.0.0.1", "CHATFORGE_LB_TCP_PORT": str(self.tcp),
               "CHATFORGE_LB_H2_PORT": str(self.h2), "CHATFORGE_LB_HTTP_PORT": str(self.http),
               "CHATFORGE_LB_STATS_PORT": str(self.stats),
               "CHATFORGE_LB_CHECK_A_PORT": str(self.check_ports[0]),
               "CHATFORGE_LB_CHECK_B_PORT": str(self.check_ports[1])}
        self.log = workdir / "haproxy.log"
        # -db: stay in the foreground (no daemon), so the process is ours to stop.
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(HAPROXY_CFG)], env=env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: http_get(self.stats_url)[0] == 200, 10, "HAProxy's stats page")

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.stats}/stats;csv"

    def servers(self, backend: str) -> dict[str, dict[str, str]]:
        status, body = http_get(self.stats_url)
        if status != 200:
            return {}
        rows = csv.DictReader(io.StringIO(body.lstrip("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == backend and r["svname"] in ("a", "b")}

    def status(self, backend: str, server: str) -> str:
        return self.servers(backend).get(server, {}).get("status", "")

    def target(self, mode: str) -> str:
        port = {"tcp": self.tcp, "h2": self.h2, "http": self.http}[mode]
        return f"127.0.0.1:{port}"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _client(mode: str, target: str):
    """One caller's client: ChatbotClient (gRPC modes) or HttpChatClient (http), each on its own connection."""
    if mode == "http":
        # Its own httpx pool: its own keep-alive connection to HAProxy, which balances each request.
        return HttpChatClient(target, timeout=20)
    # Its own TCP connection per caller: gRPC shares one subchannel (one connection) between channels with the
    # same target and arguments, and a TCP-mode balancer spreads connections, not calls, so 8 callers on one
    # connection all reached one replica and the victim sometimes served nothing before the event.
    return ChatbotClient(target, timeout=20, options=[("grpc.use_local_subchannel_pool", 1)])


def _error(e: Exception) -> str:
    if isinstance(e, ChatbotError):
        return f"{e.code.name}: {e.details[:80]}"
    if isinstance(e, HttpChatError):
        return f"{e.status_name} {e.code or ''}: {e.message[:80]}"
    return f"{type(e).__name__}: {str(e)[:80]}"  # httpx: the connection broke after the response began


# What a failed call raises: the gRPC client's error; the HTTP client's error status (HAProxy's own 5xx
# included) or no answer after its retries, an httpx error for a reply stream cut after its first token,
# and ValueError for an event cut in the middle.
CALL_ERRORS = (ChatbotError, HttpChatError, httpx.HTTPError, ValueError)


def _load(target: str, on_half: threading.Event, started_at: list[float], mode: str = "h2") -> tuple[int, list[tuple]]:
    """8 callers, 1,000 Classify + 200 Reply; sets on_half once half of them finished.

    Returns (calls, failures) with each failure (time, rpc, started_reply, error): a Reply counts as
    started once a token arrived."""
    tasks = ["reply" if i % 6 == 0 else "classify" for i in range(N_CLASSIFY + N_REPLY)]
    lock, nxt, done, failures = threading.Lock(), [0], [0], []
    half = len(tasks) // 2

    def caller(k: int) -> None:
        with _client(mode, target) as client:
            while True:
                with lock:
                    if nxt[0] >= len(tasks):
                        return
                    i = nxt[0]
                    nxt[0] += 1
                t0, got = time.monotonic(), 0
                try:
                    if tasks[i] == "reply":
                        for chunk in client.reply_stream(f"안녕하세요 {i}", model="chat", max_new_tokens=6):
                            got += 0 if chunk.is_final else 1
                    else:
                        client.classify(f"hello there {i}", model="intent")
                except CALL_ERRORS as e:
                    with lock:
                        failures.append((t0, tasks[i], got > 0, _error(e)))
                with lock:
                    done[0] += 1
                    if done[0] == half:
                        started_at.append(time.monotonic())
                        on_half.set()

    threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return len(tasks), failures


class Failover:
    def __init__(self, chat: Path, intent: Path, workdir: Path, use_netns: bool | None = None,
                 drain_delay: float = 2.0, grace: float = 5.0):
        self.workdir = workdir
        self.topo = Topology(use_netns)
        self.replicas = [Replica(chat, intent, self.topo.addrs[i], GRPC_PORT, METRICS_PORT,
                                 workdir / f"replica-{'ab'[i]}.log", netns=self.topo.netns[i], grace=grace,
                                 drain_delay=drain_delay, http_port=HTTP_PORT) for i in (0, 1)]
        self.lb: HAProxy | None = None

    def __enter__(self) -> Failover:
        try:
            for r in self.replicas:
                r.start()
            self.lb = HAProxy(self.topo.addrs, self.workdir)
            for r in self.replicas:
                # The host reaches a namespace's address through its veth pair, as HAProxy does.
                wait_for(lambda r=r: ready(r.readyz), WAIT, f"replica {r.host} ready")
            self.wait_up("a")
            self.wait_up("b")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for r in self.replicas:
            r.stop()
        if self.lb:
            self.lb.close()
        self.topo.close()

    def wait_up(self, server: str, timeout: float = WAIT) -> float:
        assert self.lb is not None
        return wait_for(lambda: all(self.lb.status(b, server) == "UP" for b in BACKEND.values()), timeout,
                        f"HAProxy marks replica {server} UP")

    def run(self, mode: str, scenario: str) -> Result:
        assert self.lb is not None
        victim = self.replicas[0]
        if victim.proc is None or victim.proc.poll() is not None:
            victim.start()
        self.wait_up("a")
        self.wait_up("b")
        backend = BACKEND[mode]
        target = self.lb.target(mode)
        half, started_at, out = threading.Event(), [], {}
        t_start = time.monotonic()
        loader = threading.Thread(target=lambda: out.update(zip(("calls", "failures"),
                                                                _load(target, half, started_at, mode), strict=True)))
        loader.start()
        if not half.wait(timeout=600):
            raise TimeoutError("the load never reached its halfway mark")
        served = int(self.lb.servers(backend)["a"]["stot"])
        sig = {"drain": signal.SIGTERM, "kill": signal.SIGKILL, "hang": signal.SIGSTOP}[scenario]
        t_event = time.monotonic()
        victim.signal(sig)
        detach = reattach = exit_code = None
        # A drain leaves the pool as NOLB (no new calls, open streams carry on) and is DOWN once the
        # process exits; a dead or hung replica must be DOWN (its connections closed) at once.
        gone = ("NOLB", "DOWN") if scenario == "drain" else ("DOWN",)
        with contextlib.suppress(TimeoutError):
            detach = wait_for(lambda: self.lb.status(backend, "a").startswith(gone), 30,
                              f"HAProxy takes replica a out after {scenario}", interval=0.02)
        state = self.lb.status(backend, "a")
        if scenario == "kill":
            victim.wait(timeout=10)
            t_restart = time.monotonic()
            victim.start()
            with contextlib.suppress(TimeoutError):
                reattach = wait_for(lambda: self.lb.status(backend, "a") == "UP", WAIT, "re-attach after restart")
                reattach = time.monotonic() - t_restart
        loader.join(timeout=600)
        if scenario == "drain":
            exit_code = victim.wait(timeout=30)
        if scenario == "hang":
            t_cont = time.monotonic()
            victim.signal(signal.SIGCONT)
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: self.lb.status(backend, "a") == "UP", WAIT, "re-attach after SIGCONT")
                reattach = time.monotonic() - t_cont
        failures = out.get("failures", [])
        t_detached = t_event + detach if detach is not None else float("inf")
        return Result(
            mode=mode, scenario=scenario, calls=out.get("calls", 0), failed=len(failures),
            failed_started_replies=sum(1 for f in failures if f[2]),
            failed_after_detach=sum(1 for f in failures if f[0] > t_detached),
            detach_s=None if detach is None else round(detach, 2), detach_state=state.split()[0] if state else "",
            reattach_s=None if reattach is None else round(reattach, 2),
            exit_code=exit_code, served_by_victim_before=served,
            seconds=round(time.monotonic() - t_start, 1),
            errors=sorted({f"{f[1]}{' (started)' if f[2] else ''}: {f[3]}" for f in failures})[:5])


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if ln.startswith("Model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} threads, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"


def table(results: list[Result]) -> str:
    head = ("| mode | scenario | calls | failed | of them started replies | failed after detach | detach s "
            "| detached as | re-attach s | exit |")
    lines = [head, "| " + " | ".join("---" for _ in range(10)) + " |"]
    for r in results:
        lines.append(f"| {r.mode} | {r.scenario} | {r.calls} | {r.failed} | {r.failed_started_replies} | "
                     f"{r.failed_after_detach} | {r.detach_s} | {r.detach_state} | {r.reattach_s if r.reattach_s is not None else '-'} | "
                     f"{r.exit_code if r.exit_code is not None else '-'} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse

    from deploy_helpers import train_tiny_bundles

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chat", type=Path, help="generation bundle (default: train a tiny one)")
    p.add_argument("--intent", type=Path, help="classification bundle (default: train a tiny one)")
    p.add_argument("--modes", default=",".join(MODES), help="tcp, h2 (gRPC) and http (the HTTP API)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--loopback", action="store_true", help="no network namespaces")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    os.environ.setdefault("CHATFORGE_ENV", "test")
    with tempfile.TemporaryDirectory(prefix="chatforge-failover-") as tmp:
        work = Path(tmp)
        if a.chat is None or a.intent is None:
            print("training two tiny bundles (seconds)...", flush=True)
            a.chat, a.intent = train_tiny_bundles(work)
        results = []
        with Failover(a.chat, a.intent, work, use_netns=False if a.loopback else None) as f:
            print(f"replicas: {f.topo.kind} {f.topo.addrs}; HAProxy TCP :{f.lb.tcp}, HTTP/2 :{f.lb.h2}, "
                  f"HTTP API :{f.lb.http}, stats http://127.0.0.1:{f.lb.stats}/stats", flush=True)
            for mode in a.modes.split(","):
                for sc in a.scenarios.split(","):
                    r = f.run(mode, sc)
                    results.append(r)
                    print(f"{mode:4} {sc:5}: {r.failed} failed of {r.calls} ({r.failed_started_replies} started "
                          f"replies, {r.failed_after_detach} after detach), detach {r.detach_s} s, re-attach "
                          f"{r.reattach_s} s, exit {r.exit_code}, {r.seconds} s" + "".join(f"\n      {e}" for e in r.errors),
                          flush=True)
        print()
        print(table(results))
        print(f"\nmachine: {machine()}")
        if a.json:
            a.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

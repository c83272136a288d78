"""process: what makes a server a program: workers, signals, logs, flags.

Workers sharing a port (SO_REUSEPORT), each kept to a CPU of its own;
signals taken with sigwait; a graceful drain on SIGTERM; log reopening on
SIGHUP; token files, TLS contexts, sizes, the flags every server shares, and
an argparse that takes the Go original's ``-port 4001`` spelling.
"""

import argparse
import ctypes
import logging
import os
import re
import signal
import ssl
import sys
import threading

from httpd import DRAIN_TIMEOUT, AccessLogWriter, access_log

PR_SET_PDEATHSIG = 1      # prctl(2)

log = logging.getLogger("process")


# --- Processes: signals, workers, logs -----------------------------------------

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def serve(servers, on_stop=None):
    """Run servers until SIGTERM or SIGINT, then drain them; returns exit code.

    Signals are blocked and taken with sigwait rather than handled: a handler
    runs between two bytecodes of the main thread, and one that set an Event
    while the main thread was inside Event.wait() deadlocked on its lock.
    Threads inherit the mask, so it must be set before any thread starts."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    threading.stack_size(512 * 1024)    # thousands of idle clients stay cheap
    for srv in servers:
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
    while signal.sigwait(SIGNALS) == signal.SIGHUP:
        reopen_logs()
    log.info("shutting down: draining in-flight requests")
    ok = all([srv.drain() for srv in servers])
    if on_stop:
        on_stop()
    for handler in access_log.handlers:
        handler.flush()
    if not ok:
        log.warning("some requests did not finish within %ds", DRAIN_TIMEOUT)
    return 0


def die_with_parent():
    """Have the kernel send this (forked) process SIGTERM when its parent
    dies: a worker must not go on serving a port once its master was killed
    (kill -9, the OOM killer), where nobody would ever stop it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass                    # not Linux: workers stop with the master's SIGTERM
    if os.getppid() == 1:       # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def serve_workers(workers, on_start=None, pin=True):
    """Serve each worker's servers in a process of its own.

    workers is a list of lists of servers; the workers' servers are bound to
    the same ports with SO_REUSEPORT, and the kernel spreads connections
    across them.  This process serves the first worker and, on SIGTERM,
    stops the others and waits for them.  on_start runs in every process
    once forked (threads don't survive a fork, so none may start before).

    With pin and several workers, each keeps to a CPU of its own, in turn
    over the CPUs this process may use.  A worker's threads take turns on
    one GIL anyway; handing it over on one CPU is cheap, while waking a
    thread on another (idle) CPU cost more than the request itself: blob
    GETs over 16 connections ran at 13k/s and 117 us of CPU each unpinned,
    31k/s and 50 us pinned."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)     # see serve()
    cpus = sorted(os.sched_getaffinity(0)) if pin and len(workers) > 1 else []
    for srv in (srv for servers in workers for srv in servers):
        srv.cpus = set(cpus) or None
    children = []
    for index, servers in enumerate(workers[1:], 1):
        pid = os.fork()
        if pid == 0:
            die_with_parent()
            keep_to_cpu(cpus, index)
            for other in workers:
                if other is not servers:
                    for srv in other:
                        srv.socket.close()
            if on_start:
                on_start()
            os._exit(serve(servers))
        children.append(pid)
        for srv in servers:
            srv.socket.close()
    keep_to_cpu(cpus, 0)
    if on_start:
        on_start()
    code = serve(workers[0])
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        code = code or (os.waitstatus_to_exitcode(status) != 0)
    return int(code)


def keep_to_cpu(cpus, index):
    """Keep this thread, and the threads it starts, to cpus[index] (in turn)."""
    if cpus:
        try:
            os.sched_setaffinity(0, {cpus[index % len(cpus)]})
        except OSError:
            pass                # the CPU went away meanwhile: run anywhere


def setup_logging(verbose, access_log_file=None, serving=True):
    """Log to stderr; a server's access log (Common Log Format) there too, or
    to a file."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if serving:
        access_log.propagate = False
        access_log.addHandler(AccessLogWriter(access_log_file))


def reopen_logs():
    """SIGHUP: reopen the access log file, so logrotate can move it away."""
    for handler in access_log.handlers:
        if isinstance(handler, AccessLogWriter) and handler.path:
            handler.reopen = True
            handler.flush()


# --- Settings: tokens, TLS, sizes, flags -------------------------------------

def parse_size(text):
    """Parse '512M', '2G', '1048576' into bytes; raise ValueError otherwise."""
    m = re.fullmatch(r"([0-9]+)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError("bad size %r (use e.g. 512M, 2G)" % text)
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


def parse_age(text):
    """'7d', '12h', '30m', '90s' or '3600' -> seconds; ValueError otherwise."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)([dhms]?)", text.strip())
    if not m:
        raise ValueError("bad age %r (use e.g. 7d, 12h, 30m, 90s)" % text)
    return float(m.group(1)) * {"d": 86400, "h": 3600, "m": 60}.get(m.group(2), 1)


def read_token(path):
    """The secret in a token file, stripped; exits with a message if unusable."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit("cannot read token file %s: %s" % (path, e))
    if not token or not all(" " < c <= "~" for c in token):
        sys.exit("token file %s: expected one printable ASCII word" % path)
    return token


def tls_context(cert, key):
    """A server-side SSL context, or None without a certificate."""
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def add_server_args(parser):
    """Flags every server shares: workers, logging, tokens and TLS."""
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes sharing the port(s) (default: one per "
                        "CPU, %(default)s here)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let workers move between CPUs (by default each "
                        "of several workers keeps to a CPU of its own)")
    parser.add_argument("--access-log", metavar="FILE",
                        help="write the access log here (reopened on SIGHUP) "
                        "instead of stderr")
    parser.add_argument("--cluster-token", metavar="FILE",
                        help="shared secret of sos-server, replicate and "
                        "blob-servers")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with "
                        "this certificate (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="its private key")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that also takes Go-style single-dash long flags (-port 4001)."""

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        longs = {s for a in self._actions for s in a.option_strings
                 if s.startswith("--")}
        fixed = []
        for arg in args:
            name = arg.split("=", 1)[0]
            if name.startswith("-") and not name.startswith("--") and \
                    "-" + name in longs:
                arg = "-" + arg
            fixed.append(arg)
        return super().parse_args(fixed, namespace)

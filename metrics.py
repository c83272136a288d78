"""metrics: request counters and latency histograms, in Prometheus text.

Hand-written (stdlib only).  Each connection counts into a Tally of its own,
summed when /metrics is scraped, so no request waits on a lock that every
other request takes too.
"""

import bisect
import threading


class Tally:
    """One connection's request figures, kept without a lock: only its own
    thread writes them.  Histogram counts are per bucket, not cumulative."""

    def __init__(self):
        self.requests = {}        # (route, status) -> count
        self.latency = {}         # route -> [count per bucket..., +Inf, sum]
        self.bytes = [0, 0]       # in, out

    def observe(self, route, status, seconds, bytes_in, bytes_out):
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = [0] * (len(Metrics.BUCKETS) + 2)
        hist[bisect.bisect_left(Metrics.BUCKETS, seconds)] += 1
        hist[-1] += seconds
        self.bytes[0] += bytes_in
        self.bytes[1] += bytes_out

    def add(self, other):
        """Add other's figures into these."""
        for key, n in list(other.requests.items()):
            self.requests[key] = self.requests.get(key, 0) + n
        for route, hist in list(other.latency.items()):
            mine = self.latency.setdefault(route, [0] * len(hist))
            for i, n in enumerate(list(hist)):
                mine[i] += n
        self.bytes = [a + b for a, b in zip(self.bytes, other.bytes)]


class Metrics:
    """Request counters and latency histograms in Prometheus text format.

    Hand-written (stdlib only): counters by route and status, bytes in and
    out, and a latency histogram per route.  Programs add their own gauges
    and counters at render time.  Each connection counts into a Tally of its
    own, summed when /metrics is scraped, so no request waits on a lock
    that every other request takes too."""

    BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)

    def __init__(self, prefix):
        self.prefix = prefix
        self.lock = threading.Lock()
        self.closed = Tally()     # the figures of connections that ended
        self.open = set()         # the Tallies of live connections

    def tally(self):
        """A new connection's Tally; hand it back with retire()."""
        t = Tally()
        with self.lock:
            self.open.add(t)
        return t

    def retire(self, t):
        with self.lock:
            self.open.discard(t)
            self.closed.add(t)

    def total(self):
        with self.lock:
            total = Tally()
            for t in [self.closed, *self.open]:
                total.add(t)
        return total

    def render(self, extra=()):
        """The exposition text; extra is [(name, type, help, [(labels, value)])]."""
        p = self.prefix
        t = self.total()
        families = [
            ("%s_requests_total" % p, "counter", "HTTP requests by route and status",
             [({"route": r, "status": str(st)}, n)
              for (r, st), n in sorted(t.requests.items())]),
            ("%s_http_bytes_total" % p, "counter", "HTTP body bytes by direction",
             [({"direction": "in"}, t.bytes[0]), ({"direction": "out"}, t.bytes[1])])]
        hist_lines = []
        for route, hist in sorted(t.latency.items()):
            cumulative = 0
            for bound, n in zip(self.BUCKETS + ("+Inf",), hist):
                cumulative += n
                hist_lines.append('%s_request_seconds_bucket{route="%s",le="%s"} %d'
                                  % (p, route, bound, cumulative))
            hist_lines.append('%s_request_seconds_sum{route="%s"} %.6f'
                              % (p, route, hist[-1]))
            hist_lines.append('%s_request_seconds_count{route="%s"} %d'
                              % (p, route, cumulative))
        out = []
        for name, kind, text, samples in families + list(extra):
            out.append("# HELP %s %s\n# TYPE %s %s" % (name, text, name, kind))
            for labels, value in samples:
                lab = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\")
                                            .replace('"', '\\"')) for k, v in
                               sorted(labels.items()))
                out.append("%s%s %s" % (name, "{%s}" % lab if lab else "", value))
        out.append("# HELP %s_request_seconds Request latency by route\n"
                   "# TYPE %s_request_seconds histogram" % (p, p))
        out.extend(hist_lines)
        return "\n".join(out) + "\n"

"""Metrics: the Prometheus text format, checked line by line, and the /metrics endpoint."""

from __future__ import annotations

import asyncio
import math
import random
import re
import threading

import pytest

from offscan import metrics
from offscan.metrics import Counter, Histogram, Registry, start_metrics_server

# -- a small parser for text exposition format 0.0.4 (prometheus_client is not a dependency) --

_SAMPLE_RE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|\})')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

Sample = tuple[str, frozenset[tuple[str, str]]]


def parse(text: str) -> tuple[dict[str, tuple[str, str]], dict[Sample, float], list[Sample]]:
    """Families ``{name: (type, help)}``, samples ``{(name, labels): value}`` and their order;
    asserts the structural rules a Prometheus scraper relies on."""
    assert text == "" or text.endswith("\n")
    families: dict[str, tuple[str, str]] = {}
    helps: dict[str, str] = {}
    samples: dict[Sample, float] = {}
    order: list[Sample] = []
    current = None
    for line in text.splitlines():
        assert line, "no blank lines"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in helps, f"HELP twice for {name}"
            helps[name] = re.sub(r"\\[\\n]", lambda m: _UNESCAPE[m.group()], help_text)
            continue
        if line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            assert name not in families, f"TYPE twice for {name}"
            assert name in helps, "HELP comes before TYPE here"
            families[name] = (kind, helps[name])
            current = name
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE_RE.fullmatch(line)
        assert m, f"not a sample line: {line!r}"
        name, label_text, value = m.groups()
        labels: list[tuple[str, str]] = []
        if label_text:
            rest = label_text[1:]
            while rest:
                lm = _LABEL_RE.match(rest)
                assert lm, f"bad labels in {line!r}"
                raw = lm.group(2)
                labels.append(
                    (lm.group(1), re.sub(r'\\[\\"n]', lambda x: _UNESCAPE[x.group()], raw))
                )
                rest = rest[lm.end() :]
                if lm.group(3) == "}":
                    assert rest == "", line
        assert current is not None
        kind = families[current][0]
        allowed = {current}
        if kind == "histogram":
            allowed = {f"{current}_bucket", f"{current}_sum", f"{current}_count"}
        assert name in allowed, f"sample {name} outside its family {current}"
        key = (name, frozenset(labels))
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)  # Go's ParseFloat accepts what Python's float does here
        order.append(key)
    return families, samples, order


def L(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def test_counter_and_gauge_render() -> None:
    reg = Registry()
    events = reg.counter("offscan_events_total", "File events by kind.", ("kind",))
    events.inc(kind="create")
    events.inc(2, kind="close_write")
    events.inc(kind="create")
    detections = reg.counter("offscan_detections_total", "Infected files.")
    depth = reg.gauge("offscan_inflight", "Scans in flight.")
    depth.inc(3)
    depth.dec()
    queue = [1, 2, 3, 4]
    reg.gauge("offscan_queue_depth", "Queued requests.", fn=lambda: len(queue))
    rss = reg.gauge("offscan_rss_bytes", "Resident memory.", ("proc",))
    rss.set(1.5e9, proc="appliance")

    families, samples, _ = parse(reg.render())
    assert families == {
        "offscan_events_total": ("counter", "File events by kind."),
        "offscan_detections_total": ("counter", "Infected files."),
        "offscan_inflight": ("gauge", "Scans in flight."),
        "offscan_queue_depth": ("gauge", "Queued requests."),
        "offscan_rss_bytes": ("gauge", "Resident memory."),
    }
    assert samples == {
        ("offscan_events_total", L(kind="create")): 2,
        ("offscan_events_total", L(kind="close_write")): 2,
        ("offscan_detections_total", L()): 0,  # unlabelled series exist from the start
        ("offscan_inflight", L()): 2,
        ("offscan_queue_depth", L()): 4,
        ("offscan_rss_bytes", L(proc="appliance")): 1.5e9,
    }
    assert events.value(kind="create") == 2 and events.value(kind="never") == 0
    assert detections.value() == 0
    queue.append(5)  # a callback gauge is read at render time
    assert parse(reg.render())[1][("offscan_queue_depth", L())] == 5


def test_render_lines_exactly() -> None:
    reg = Registry()
    reg.counter("c_total", "A counter.", ("reason",)).inc(reason="digest")
    reg.histogram("h_seconds", "Latency.", buckets=(0.5, 1)).observe(0.7)
    assert reg.render().splitlines() == [
        "# HELP c_total A counter.",
        "# TYPE c_total counter",
        'c_total{reason="digest"} 1.0',
        "# HELP h_seconds Latency.",
        "# TYPE h_seconds histogram",
        'h_seconds_bucket{le="0.5"} 0.0',
        'h_seconds_bucket{le="1.0"} 1.0',
        'h_seconds_bucket{le="+Inf"} 1.0',
        "h_seconds_sum 0.7",
        "h_seconds_count 1.0",
    ]
    assert Registry().render() == ""


def test_label_values_and_help_are_escaped() -> None:
    reg = Registry()
    nasty = 'C:\\dir\\"quoted"\nnext line}, x="y'
    c = reg.counter("files_total", 'Help with \\ backslash\nand newline "quotes" kept.', ("path",))
    c.inc(path=nasty)
    c.inc(path="plain")
    text = reg.render()
    lines = text.splitlines()
    assert len(lines) == 4  # the newline in the value did not break the line
    assert lines[0] == r'# HELP files_total Help with \\ backslash\nand newline "quotes" kept.'
    assert lines[2] == r'files_total{path="C:\\dir\\\"quoted\"\nnext line}, x=\"y"} 1.0'
    families, samples, _ = parse(text)
    assert families["files_total"][1] == 'Help with \\ backslash\nand newline "quotes" kept.'
    assert samples[("files_total", L(path=nasty))] == 1
    assert samples[("files_total", L(path="plain"))] == 1


def test_histogram_observe_times_equals_repeated_observations() -> None:
    reg = Registry()
    once = reg.histogram("a_seconds", "A.", ("source",), buckets=(1, 2, 5))
    many = reg.histogram("b_seconds", "B.", ("source",), buckets=(1, 2, 5))
    for v, n in ((0.5, 3), (1.5, 1), (4.0, 64), (9.0, 2)):
        for _ in range(n):
            once.observe(v, source="x")
        many.observe(v, times=n, source="x")
    many.observe(3.0, times=0, source="x")  # nothing observed
    assert many.count(source="x") == once.count(source="x") == 70
    assert many.sum(source="x") == pytest.approx(once.sum(source="x"))
    assert many.quantile(0.5, source="x") == once.quantile(0.5, source="x")
    assert many.quantile(0.99, source="x") == once.quantile(0.99, source="x")
    _, samples, _ = parse(reg.render())
    for le in ("1.0", "2.0", "5.0", "+Inf"):
        a = samples[("a_seconds_bucket", L(source="x", le=le))]
        assert samples[("b_seconds_bucket", L(source="x", le=le))] == a
    with pytest.raises(ValueError):
        many.observe(1.0, times=-1, source="x")
    with pytest.raises(ValueError):  # reserved: it would shadow the count
        reg.histogram("c_seconds", "C.", ("times",))


def test_histogram_buckets_are_cumulative() -> None:
    reg = Registry()
    h = reg.histogram("verdict_seconds", "Verdict latency.", ("source",), buckets=(1, 2, 5))
    for v in (0.5, 1, 1.5, 3, 100):  # 1 falls in le=1: upper bounds are inclusive
        h.observe(v, source="engine")
    h.observe(0.1, source="cache")
    _, samples, order = parse(reg.render())

    def bucket(le: str, source: str = "engine") -> float:
        return samples[("verdict_seconds_bucket", L(source=source, le=le))]

    assert [bucket(le) for le in ("1.0", "2.0", "5.0", "+Inf")] == [2, 3, 4, 5]
    assert samples[("verdict_seconds_count", L(source="engine"))] == 5
    assert samples[("verdict_seconds_sum", L(source="engine"))] == pytest.approx(106)
    assert [bucket(le, "cache") for le in ("1.0", "2.0", "5.0", "+Inf")] == [1, 1, 1, 1]
    # Within a series, buckets come in increasing le, ending with +Inf == _count.
    engine_buckets = [
        dict(k[1])["le"]
        for k in order
        if k[0].endswith("_bucket") and dict(k[1])["source"] == "engine"
    ]
    assert engine_buckets == ["1.0", "2.0", "5.0", "+Inf"]
    assert h.count(source="engine") == 5 and h.sum(source="cache") == pytest.approx(0.1)


def test_default_buckets_and_quantiles() -> None:
    h = Histogram("latency_seconds", "Latency.")
    assert h.buckets == tuple(float(b) for b in metrics.DEFAULT_BUCKETS)
    assert math.isnan(h.quantile(0.5))
    for i in range(1, 101):  # 1 ms .. 100 ms, uniform
        h.observe(i / 1000)
    lines = [line for line in h.render_lines() if "_bucket" in line]
    assert len(lines) == len(metrics.DEFAULT_BUCKETS) + 1
    assert h.quantile(0.5) == pytest.approx(0.05, abs=0.005)
    assert h.quantile(0.99) == pytest.approx(0.099, abs=0.005)
    assert h.quantile(0) == pytest.approx(0.001)  # clamped to the smallest observation
    assert h.quantile(1) == pytest.approx(0.1)
    h.observe(60)  # beyond the last bucket: the estimate is the largest seen, not infinity
    assert h.quantile(1) == 60
    with pytest.raises(ValueError):
        h.quantile(1.5)


def test_registry_create_or_get_and_validation() -> None:
    reg = Registry()
    c = reg.counter("x_total", "X.", ("a",))
    assert reg.counter("x_total", "X.", ("a",)) is c
    with pytest.raises(ValueError, match="already exists"):
        reg.gauge("x_total", "X.")
    with pytest.raises(ValueError, match="already exists"):
        reg.counter("x_total", "X.", ("b",))
    h = reg.histogram("lat", "L.", buckets=(1, 2))
    assert reg.histogram("lat", "L.", buckets=(1, 2)) is h
    with pytest.raises(ValueError, match="other buckets"):
        reg.histogram("lat", "L.", buckets=(1, 3))
    with pytest.raises(ValueError, match="clashes"):
        reg.counter("lat_count", "clash with the histogram's series")
    for bad_name in ("", "1abc", "a-b", "a b"):
        with pytest.raises(ValueError, match="invalid metric name"):
            reg.counter(bad_name, "bad")
    with pytest.raises(ValueError, match="invalid label"):
        Counter("ok_total", "ok", ("__reserved",))
    with pytest.raises(ValueError, match="reserved"):
        Histogram("ok", "ok", ("le",))
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram("ok", "ok", buckets=(2, 1))
    with pytest.raises(ValueError, match="do not match"):
        c.inc()
    with pytest.raises(ValueError, match="do not match"):
        c.inc(a="1", b="2")
    with pytest.raises(ValueError, match="only go up"):
        c.inc(-1, a="1")


def test_failing_callback_gauge_does_not_break_the_page() -> None:
    reg = Registry()
    reg.gauge("broken", "Raises.", fn=lambda: 1 / 0)
    reg.counter("ok_total", "Still here.").inc()
    import logging

    logging.getLogger("offscan.metrics").disabled = True
    try:
        _, samples, _ = parse(reg.render())
    finally:
        logging.getLogger("offscan.metrics").disabled = False
    assert samples == {("ok_total", L()): 1}


def test_counters_are_thread_safe() -> None:
    c = Counter("n_total", "N.", ("t",))
    h = Histogram("h", "H.")

    def work() -> None:
        for _ in range(5000):
            c.inc(t="x")
            h.observe(0.01)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value(t="x") == 20000
    assert h.count() == 20000


# -- the HTTP endpoint ---------------------------------------------------------------------


async def http(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, half-close, and read the whole answer (status 0 if there is none)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    if "content-length" in headers and not raw.startswith(b"HEAD"):
        assert int(headers["content-length"]) == len(body)
    return int(status), headers, body


def make_registry() -> Registry:
    reg = Registry()
    reg.counter("offscan_events_total", "Events.", ("kind",)).inc(kind='we"ird')
    reg.histogram("offscan_verdict_seconds", "Latency.").observe(0.003)
    return reg


def test_http_serves_metrics_and_404() -> None:
    reg = make_registry()

    async def main() -> None:
        server = await start_metrics_server(reg, "127.0.0.1", 0)
        try:
            assert server.port > 0
            status, headers, body = await http(
                server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            assert status == 200
            assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert body.decode() == reg.render()
            parse(body.decode())
            status, _, body = await http(server.port, b"GET /metrics?debug=1 HTTP/1.0\r\n\r\n")
            assert status == 200 and body
            status, headers, body = await http(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert status == 200 and body == b"" and int(headers["content-length"]) > 0
            for target in (b"/", b"/metricsx", b"/metrics/", b"/favicon.ico"):
                status, _, _ = await http(server.port, b"GET " + target + b" HTTP/1.1\r\n\r\n")
                assert status == 404, target
            status, headers, _ = await http(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert status == 405 and "GET" in headers["allow"]
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_http_survives_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.3)
    reg = make_registry()
    rng = random.Random(4)

    async def main() -> None:
        server = await start_metrics_server(reg, "127.0.0.1", 0)
        port = server.port
        try:
            bad = [
                rng.randbytes(1000) + b"\r\n\r\n",
                b"\x00\xff\xfe\r\n\r\n",
                b"GET /metrics\r\n\r\n",  # HTTP/0.9 style
                b"GET /metrics HTTP/2.0\r\n\r\n",
                b"GET  /metrics HTTP/1.1\r\n\r\n",
                b"GET metrics HTTP/1.1\r\n\r\n",
                b"get /metrics HTTP/1.1\r\n\r\n",
                "GET /m\u00e9trics HTTP/1.1\r\n\r\n".encode(),
                b"GET /metrics HTTP/1.1\r\nHost",  # cut off mid-headers
            ]
            for raw in bad:
                status, _, _ = await http(port, raw)
                assert status == 400, raw
            status, _, _ = await http(port, b"A" * 20000)  # no newline, over the limit
            assert status == 431
            headers = b"".join(b"X-%d: y\r\n" % i for i in range(200))
            status, _, _ = await http(port, b"GET /metrics HTTP/1.1\r\n" + headers + b"\r\n")
            assert status == 431
            assert await http(port, b"") == (0, {}, b"")  # connect and hang up
            # A client that never finishes its request is dropped after the timeout.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metr")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await writer.wait_closed()
            # Many random requests, then the endpoint still works.
            for _ in range(30):
                await http(port, rng.randbytes(rng.randrange(1, 3000)))
            status, _, body = await http(port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert status == 200 and body.decode() == reg.render()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_close_drops_idle_clients() -> None:
    async def main() -> None:
        server = await start_metrics_server(Registry(), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # never finishes
        await writer.drain()
        await asyncio.sleep(0.05)
        server.close()
        await asyncio.wait_for(server.wait_closed(), 2)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        await writer.wait_closed()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", server.port)

    asyncio.run(main())

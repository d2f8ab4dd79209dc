"""The load-test harness: histogram percentiles, workload, arrivals, report, and short runs
against real servers (the fake-backend server, and the no-op server the harness ships)."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from embedrpc.cli import main
from embedrpc.client.bench import (
    BenchConfig,
    Histogram,
    LengthSpec,
    NoopEmbedder,
    TextGenerator,
    WorkerResult,
    build_report,
    connect,
    drive,
    format_report,
    load_corpus,
    make_workload,
    poisson_gaps,
    pool_from_texts,
    request_pool,
    run,
    start_noop_server,
    write_plot,
)
from embedrpc.v1 import embedder_pb2 as pb

from .helpers import running_server

# -- histogram ---------------------------------------------------------------------------


def _tolerance(hist: Histogram, value: float) -> float:
    """The histogram's stated bound: half a unit, or value / 2**(bits + 1)."""
    return max(hist.unit / 2, value * hist.relative_precision) + 1e-12


def _nearest_rank(values: np.ndarray, p: float) -> float:
    """The smallest value with at least p% of the values <= it, in exact arithmetic.
    (numpy's method="inverted_cdf" is the same rule, but computes p/100 in floating
    point: at p=99.9 it can land one rank higher.)"""
    ordered = np.sort(values)
    rank = max(1, math.ceil(Fraction(str(p)) * len(ordered) / 100))
    return float(ordered[rank - 1])


def test_histogram_uniform_ms_against_numpy() -> None:
    values = np.arange(1, 10001) / 1000.0  # 1..10000 ms, in seconds
    hist = Histogram()
    hist.record_many(np.random.default_rng(0).permutation(values).tolist())
    assert hist.count == 10000
    assert hist.min == 0.001 and hist.max == 10.0
    assert hist.mean == pytest.approx(values.mean(), rel=1e-12)
    for p in (0, 1, 10, 25, 50, 75, 90, 99, 99.9, 99.99, 100):
        exact = _nearest_rank(values, p)
        assert abs(hist.percentile(p) - exact) <= _tolerance(hist, exact), p
        # numpy's nearest rank agrees up to its one-rank rounding (1 ms here)
        numpy_rank = float(np.percentile(values, p, method="inverted_cdf"))
        assert abs(hist.percentile(p) - numpy_rank) <= 0.001 + _tolerance(hist, exact), p
        # numpy's default (linear interpolation) differs by less than one 1 ms step
        linear = float(np.percentile(values, p))
        assert abs(hist.percentile(p) - linear) <= 0.001 + _tolerance(hist, linear), p
    # the known values of nearest rank on 1..10000 ms
    assert hist.percentile(50) == pytest.approx(5.000, rel=hist.relative_precision)
    assert hist.percentile(99) == pytest.approx(9.900, rel=hist.relative_precision)
    assert hist.percentile(99.9) == pytest.approx(9.990, rel=hist.relative_precision)


def test_histogram_wide_range_against_numpy() -> None:
    rng = np.random.default_rng(1)
    values = rng.lognormal(math.log(0.002), 1.5, size=50_000)  # ~10 µs .. seconds
    hist = Histogram()
    hist.record_many(values.tolist())
    for p in (5, 50, 90, 99, 99.9, 99.99):
        exact = _nearest_rank(values, p)
        assert abs(hist.percentile(p) - exact) <= _tolerance(hist, exact), p
    assert hist.max == values.max() and hist.min == values.min()


def test_histogram_bucket_error_bound_for_single_values() -> None:
    rng = np.random.default_rng(2)
    for value in np.concatenate([rng.uniform(0, 0.01, 300), rng.lognormal(0, 3, 300)]):
        hist = Histogram()
        hist.record(float(value))
        hist.record(0.0)
        hist.record(1e6)  # other values, so min/max clamping does not hide the bucket
        assert abs(hist.percentile(50) - value) <= _tolerance(hist, value)


def test_histogram_merge_and_round_trip() -> None:
    rng = np.random.default_rng(3)
    a_values, b_values = rng.exponential(0.01, 1000), rng.exponential(0.1, 500)
    a, b, both = Histogram(), Histogram(), Histogram()
    a.record_many(a_values.tolist())
    b.record_many(b_values.tolist())
    both.record_many(np.concatenate([a_values, b_values]).tolist())
    a.merge(b)
    copy = Histogram.from_dict(json.loads(json.dumps(a.to_dict())))
    for h in (a, copy):
        assert h.count == 1500
        assert h.mean == pytest.approx(both.mean, rel=1e-12)
        assert [h.percentile(p) for p in (50, 99, 100)] == \
            [both.percentile(p) for p in (50, 99, 100)]
    with pytest.raises(ValueError, match="different unit"):
        a.merge(Histogram(unit=1e-3))


def test_histogram_empty_and_invalid() -> None:
    hist = Histogram()
    assert math.isnan(hist.percentile(50)) and math.isnan(hist.mean)
    with pytest.raises(ValueError, match=">= 0"):
        hist.record(-1.0)
    with pytest.raises(ValueError, match=">= 0"):
        hist.record(float("nan"))
    with pytest.raises(ValueError, match=r"0\.\.100"):
        hist.percentile(101)


# -- workload ------------------------------------------------------------------------------


def test_corpus_lines_and_jsonl(tmp_path: Path) -> None:
    lines = tmp_path / "texts.txt"
    lines.write_text("first text\n\n  second, with spaces  \n北京\n", encoding="utf-8")
    assert load_corpus(lines) == ["first text", "  second, with spaces  ", "北京"]

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a", "id": 1}\n\n{"text": "b\\nc"}\n', encoding="utf-8")
    assert load_corpus(jsonl) == ["a", "b\nc"]
    sniffed = tmp_path / "docs.data"  # no suffix: recognised by its first line
    sniffed.write_text('{"text": "x"}\n', encoding="utf-8")
    assert load_corpus(sniffed) == ["x"]


def test_corpus_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a \"text\""):
        load_corpus(bad)
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not JSON"):
        load_corpus(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no texts"):
        load_corpus(empty)
    with pytest.raises(ValueError, match="cannot read corpus"):
        load_corpus(tmp_path / "missing.txt")


def test_length_specs() -> None:
    rng = np.random.default_rng(0)
    assert (LengthSpec.parse("fixed:7").sample(rng, 10) == 7).all()
    uniform = LengthSpec.parse("uniform:3:9").sample(rng, 20_000)
    assert uniform.min() == 3 and uniform.max() == 9
    assert uniform.mean() == pytest.approx(6.0, abs=0.05)  # sd of the mean ≈ 0.014
    spec = LengthSpec.parse("lognormal:40:0.8:4:400")
    lengths = spec.sample(rng, 20_000)
    assert lengths.min() >= 4 and lengths.max() <= 400
    assert np.median(lengths) == pytest.approx(40, rel=0.05)
    assert str(spec) == "lognormal:40:0.8:4:400"
    for bad in ("fixed", "uniform:9:3", "lognormal:0:1", "normal:3:4", "fixed:x"):
        with pytest.raises(ValueError, match=r"lengths|expected"):
            LengthSpec.parse(bad)


@pytest.mark.parametrize("use_faker", [False, True])
def test_generator_lengths_languages_and_seed(use_faker: bool) -> None:
    if use_faker:
        pytest.importorskip("faker")
    locales = ["en_US", "ru_RU", "zh_CN"]
    gen = TextGenerator(locales=locales, seed=5, use_faker=use_faker)
    texts = gen.texts(60, LengthSpec.parse("fixed:6"), query=True)
    assert texts == TextGenerator(locales=locales, seed=5, use_faker=use_faker).texts(
        60, LengthSpec.parse("fixed:6"), query=True)  # reproducible
    assert all(t.endswith(("?", "？")) for t in texts)
    spaced = [t for t in texts if " " in t]
    assert spaced and all(len(t.split()) == 6 for t in spaced)  # words, for spaced scripts
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in texts)  # Chinese
    assert any(any("\u0400" <= ch <= "\u04ff" for ch in t) for t in texts)  # Cyrillic
    docs = gen.texts(20, LengthSpec.parse("fixed:30"))
    assert all(len(d.split()) == 30 for d in docs if not any("\u4e00" <= c <= "\u9fff"
                                                             for c in d))


def test_generator_from_a_vocabulary() -> None:
    words = ["alpha", "beta", "gamma", "北京"]
    gen = TextGenerator(words=words, seed=3)
    texts = gen.texts(200, LengthSpec.parse("uniform:1:9"))
    assert texts == TextGenerator(words=words, seed=3).texts(200, LengthSpec.parse("uniform:1:9"))
    assert all(1 <= len(t.split(" ")) <= 9 and set(t.split(" ")) <= set(words) for t in texts)
    assert {w for t in texts for w in t.split(" ")} == set(words)
    assert gen.texts(3, LengthSpec.parse("fixed:5"), query=True)[0].count(" ") == 4  # plain
    with pytest.raises(ValueError, match="replaces locales"):
        TextGenerator(words=words, locales=["en_US"])
    with pytest.raises(ValueError, match="empty"):
        TextGenerator(words=[])


def test_request_pool_mixes_queries_and_documents() -> None:
    config = BenchConfig(batch=3, query_fraction=0.25, texts=200, dimensions=32,
                         encoding="float16", locales=("en_US", "ja_JP"))
    workload = make_workload(config)
    assert len(workload.documents) == 150 and len(workload.queries) == 50
    pool = request_pool(config, workload, seed=0, size=4000)
    requests = [pb.EmbedRequest.FromString(body) for body, _ in pool]
    assert all(len(r.inputs) == 3 and count == 3 for r, (_, count) in zip(requests, pool,
                                                                           strict=True))
    queries = [r for r in requests if r.prompt_name == "query"]
    # binomial(4000, 0.25): sd 27, so ±5 sd is ±137
    assert abs(len(queries) - 1000) <= 137
    assert all(set(r.inputs) <= set(workload.queries) for r in queries)
    assert all(r.dimensions == 32 and r.encoding == pb.ENCODING_FLOAT16_BYTES
               for r in requests)


# -- arrivals ------------------------------------------------------------------------------


def test_poisson_gaps_rate_and_shape() -> None:
    rate, n = 1000.0, 200_000
    gaps = np.fromiter(poisson_gaps(rate, np.random.default_rng(4)), float, count=n)
    # The mean of n exponential gaps has sd mean/sqrt(n) (0.22% here); allow 1%.
    assert n / gaps.sum() == pytest.approx(rate, rel=0.01)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.02)  # exponential: CV 1
    assert (gaps > 1 / rate).mean() == pytest.approx(math.exp(-1), abs=0.005)
    # arrivals in disjoint 1 s windows: Poisson counts, variance = mean
    counts = np.bincount(np.cumsum(gaps).astype(int))[:-1]
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.2)


# -- report ------------------------------------------------------------------------------


def _known_result() -> WorkerResult:
    result = WorkerResult()
    for ms in range(1, 1001):  # 1..1000 ms
        result.latency.record(ms / 1000)
    result.ok, result.embeddings, result.tokens, result.sent = 1000, 4000, 50_000, 1003
    result.errors = {"RESOURCE_EXHAUSTED": 2, "INVALID_ARGUMENT": 1}
    result.timeline = {0: Histogram(), 1: Histogram()}
    result.timeline[0].record(0.004)
    result.timeline[1].record(0.002)
    result.timeline_errors = {1: 3}
    return result


def test_report_json_against_known_inputs() -> None:
    config = BenchConfig(target="127.0.0.1:1", concurrency=4, duration=2.0, batch=4)
    report = build_report(config, _known_result(), elapsed=2.0,
                          server={"model": "m", "dimensions": 8})
    json.dumps(report)  # JSON-ready
    assert report["requests_per_s"] == 500.0
    assert report["embeddings_per_s"] == 2000.0
    assert report["tokens_per_s"] == 25_000.0
    lat = report["latency_ms"]
    assert set(lat) >= {"p50", "p90", "p99", "p999", "max", "mean"}
    # nearest rank over 1..1000 ms: p50 = 500, p90 = 900, p99 = 990, p99.9 = 999 (±0.05%)
    for key, ms in (("p50", 500), ("p90", 900), ("p99", 990), ("p999", 999)):
        assert lat[key] == pytest.approx(ms, rel=1 / 2048), key
    assert lat["max"] == 1000.0 and lat["mean"] == pytest.approx(500.5)
    assert report["errors"] == {"INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": 2}
    assert report["failed"] == 3
    assert [row["second"] for row in report["timeline"]] == [0, 1]
    assert report["timeline"][1] == {"second": 1, "requests": 1, "errors": 3, "p50_ms": 2.0,
                                     "p99_ms": 2.0, "max_ms": 2.0}
    c = report["config"]
    assert (c["target"], c["mode"], c["call"], c["concurrency"], c["batch"]) == \
        ("127.0.0.1:1", "closed", "Embed", 4, 4)
    assert "send_lag_ms" not in report

    text = format_report(report)
    assert "model m (8 dims)" in text
    assert "closed loop, 4 clients" in text
    assert "requests           1,000          500.0 /s" in text
    assert f"p50 {lat['p50']:.2f}" in text and "max 1000.00" in text
    assert "errors      INVALID_ARGUMENT 1, RESOURCE_EXHAUSTED 2" in text


def test_report_open_loop_and_empty() -> None:
    config = BenchConfig(rate=100.0, duration=1.0)
    report = build_report(config, WorkerResult(), elapsed=1.0)
    assert report["requests_per_s"] == 0.0
    assert report["latency_ms"]["p50"] is None and report["send_lag_ms"]["max"] is None
    assert report["config"]["concurrency"] == 1000  # open loop: the in-flight cap
    text = format_report(report)
    assert "open loop 100 req/s (Poisson)" in text and "p50 n/a" in text


def test_config_errors_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="--rate must be > 0"):
        BenchConfig(rate=0)
    with pytest.raises(ValueError, match="--encoding must be one of"):
        BenchConfig(encoding="f64")
    with pytest.raises(ValueError, match="exceeds --time-limit"):
        BenchConfig(duration=100, time_limit=50)
    with pytest.raises(ValueError, match="--streams needs --stream"):
        BenchConfig(streams=2)
    with pytest.raises(ValueError, match="must not exceed --concurrency"):
        BenchConfig(concurrency=1, processes=2)


def test_plot_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    config = BenchConfig(duration=2.0)
    result = _known_result()
    path = tmp_path / "latency.png"
    write_plot(path, build_report(config, result, elapsed=2.0), result.latency)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 450)


# -- runs against real servers ---------------------------------------------------------------


def _quick(target: str, **kwargs: object) -> BenchConfig:
    # No warm-up unless a test is about it: with one, a closed-loop client whose first call
    # runs past warm-up and window (a busy machine, two test processes) measures nothing.
    defaults: dict[str, object] = {"target": target, "warmup": 0.0, "texts": 64,
                                   "locales": ("en_US", "ru_RU", "zh_CN"),
                                   "progress": False, "lengths": "lognormal:10:0.5:2:30"}
    defaults.update(kwargs)
    return BenchConfig(**defaults)  # type: ignore[arg-type]


def _check_consistent(report: dict, batch: int) -> None:
    assert report["errors"] == {}
    assert report["requests"] > 0
    assert report["sent"] == report["requests"]
    assert report["embeddings"] == report["requests"] * batch
    assert report["tokens"] >= report["embeddings"]  # every text is at least one token
    assert sum(row["requests"] for row in report["timeline"]) == report["requests"]
    assert report["requests_per_s"] == pytest.approx(report["requests"] / report["elapsed_s"],
                                                     rel=1e-3)
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]


def test_closed_loop_unary_against_fake_server(fake_server, capsys) -> None:
    _, target = fake_server
    result = run(_quick(target, concurrency=4, duration=1.0, batch=3, progress=True,
                        warmup=0.2))
    report = result.report
    _check_consistent(report, batch=3)
    assert report["server"]["dimensions"] == 64
    assert report["warmup"]["requests"] > 0  # warm-up ran and was left out
    # every client's last answer comes after the 1 s window closes
    assert 1.0 <= report["elapsed_s"] < 10.0  # bounded: the window, then the last answers
    assert "req/s" in capsys.readouterr().err  # the progress line


def test_several_replicas_share_the_load(fake_model_dir) -> None:
    # Two servers named as one comma-separated --target: round_robin spreads the calls.
    with running_server(model=str(fake_model_dir), backend="fake") as (one, a), \
            running_server(model=str(fake_model_dir), backend="fake") as (two, b):
        report = run(_quick(f"{a},{b}", concurrency=4, duration=1.0, batch=2)).report
        _check_consistent(report, batch=2)
        served = [one.router.batched_tokens, two.router.batched_tokens]
        assert min(served) > 0.25 * sum(served), served  # both took a real share
        assert sum(served) >= report["tokens"]  # every measured token was embedded by one


def test_stream_against_fake_server(fake_server) -> None:
    _, target = fake_server
    report = run(_quick(target, concurrency=6, duration=1.0, batch=2, stream=True,
                        streams=2)).report
    _check_consistent(report, batch=2)
    assert report["config"]["call"] == "EmbedStream"


def test_open_loop_rate_against_fake_server(fake_server) -> None:
    _, target = fake_server
    report = run(_quick(target, rate=300.0, duration=1.0, batch=1)).report
    _check_consistent(report, batch=1)
    # Poisson arrivals in 1 s at 300/s: sd sqrt(300) ≈ 17; allow 5 sd
    assert abs(report["sent"] - 300) <= 87
    assert report["send_lag_ms"]["max"] is not None


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_requests_are_counted_by_code(fake_server, stream: bool) -> None:
    _, target = fake_server
    report = run(_quick(target, concurrency=2, duration=0.5, dimensions=100_000,
                        stream=stream)).report
    assert report["requests"] == 0 and report["embeddings"] == 0
    assert set(report["errors"]) == {"INVALID_ARGUMENT"}
    assert report["errors"]["INVALID_ARGUMENT"] == report["sent"] > 0
    assert report["latency_ms"]["p50"] is None


@contextmanager
def _noop_server(dimensions: int = 16, delay: float = 0.0) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(
        start_noop_server(0, dimensions=dimensions, delay=delay), loop).result(30)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_noop_server_answers_every_encoding() -> None:
    noop = NoopEmbedder(dimensions=10)
    for encoding, row_bytes in ((pb.ENCODING_FLOAT32_BYTES, 40), (pb.ENCODING_FLOAT16_BYTES, 20),
                                (pb.ENCODING_UBINARY, 2)):
        response = pb.EmbedResponse.FromString(noop.answer(pb.EmbedRequest(
            inputs=["abcd", "efghijkl"], encoding=encoding, request_id="r7")))
        assert (response.count, response.dimensions, len(response.data)) == \
            (2, 10, 2 * row_bytes)
        assert response.request_id == "r7" and response.usage.prompt_tokens == 1 + 2 + 2
    response = pb.EmbedResponse.FromString(noop.answer(pb.EmbedRequest(
        inputs=["a"], encoding=pb.ENCODING_FLOAT, dimensions=4)))
    assert [list(e.values) for e in response.embeddings] == [[0.0] * 4]


def test_open_loop_counts_queueing_from_the_intended_send_time() -> None:
    """A server that answers one request per 25 ms (40/s) offered 60/s with one request
    in flight: the backlog grows, and latency measured from each request's intended
    send time grows with it. A closed loop on the same server sees ~25 ms throughout."""
    delay = 0.025
    with _noop_server(delay=delay) as target:
        closed = run(_quick(target, concurrency=1, duration=0.5)).report
        opened = run(_quick(target, rate=60.0, concurrency=1, duration=1.0)).report
    assert delay * 1000 <= closed["latency_ms"]["p50"] < 2.5 * delay * 1000
    lat = opened["latency_ms"]
    assert lat["min"] >= delay * 1000
    # ~70 arrivals in 1.2 s need ~1.75 s of service: the last wait about 0.5 s
    assert lat["p90"] > 8 * delay * 1000
    assert opened["send_lag_ms"]["p90"] > 5 * delay * 1000  # the harness waited for a slot
    assert opened["errors"] == {}


def test_drive_sends_a_given_pool_and_shows_each_answer() -> None:
    """What the benchmarks use: their own requests, in turn, on one open channel, with
    every answer passed to on_answer; an on_answer that raises ends the run."""
    pool = pool_from_texts([["a"], ["b", "c"], ["d", "e", "f"]], dimensions=8)
    seen: list[tuple[float, float, int]] = []

    async def main(target: str) -> tuple[WorkerResult, WorkerResult]:
        config = BenchConfig(target=target, concurrency=2, requests=7, warmup=0.0,
                             query_fraction=0.0, progress=False)
        channel = await connect(config)
        try:
            first = await drive(channel, config, pool, on_answer=lambda start, done, r:
                                seen.append((start, done, r.count)))
            second = await drive(channel, config, pool)  # the channel serves again
            return first, second
        finally:
            await channel.close()

    with _noop_server() as target:
        first, second = asyncio.run(main(target))

        async def failing() -> None:
            config = BenchConfig(target=target, concurrency=4, duration=5.0, warmup=0.0,
                                 query_fraction=0.0, progress=False)
            channel = await connect(config)

            def stop(start: float, done: float, response: pb.EmbedResponse) -> None:
                raise RuntimeError("bad vectors")

            try:
                with pytest.raises(RuntimeError, match="bad vectors"):
                    await drive(channel, config, pool, on_answer=stop)
                # every client stopped with it: nothing is left running on the loop
                assert asyncio.all_tasks() == {asyncio.current_task()}
            finally:
                await channel.close()

        asyncio.run(failing())
    assert first.ok == second.ok == 7 and first.errors == {}
    assert sorted(n for _, _, n in seen) == [1, 1, 1, 2, 2, 3, 3]  # pool in turn from 0
    assert all(done >= start for start, done, _ in seen)
    assert first.embeddings == 13


def test_fixed_request_count_in_several_processes(tmp_path: Path) -> None:
    with _noop_server() as target:
        out = tmp_path / "report.json"
        code = main(["bench", "--target", target, "--requests", "301", "--processes", "2",
                     "--concurrency", "4", "--batch", "2", "--warmup", "0.2", "--texts", "32",
                     "--locales", "en_US",
                     "--progress", "false", "--json", str(out)])
        assert code == 0
        report = json.loads(out.read_text())
    assert report["requests"] == report["sent"] == 301  # split 151 + 150
    assert report["embeddings"] == 602 and report["errors"] == {}
    assert report["config"]["processes"] == 2
    for key in ("requests_per_s", "embeddings_per_s", "tokens_per_s", "latency_ms", "errors"):
        assert key in report


def test_cli_plot_and_bad_options(tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    with _noop_server() as target:
        plot = tmp_path / "run.png"
        assert main(["bench", "--target", target, "--duration", "0.5", "--warmup", "0.1",
                     "--concurrency", "2", "--texts", "16", "--locales", "en_US",
                     "--plot", str(plot), "--progress", "0"]) == 0
        assert plot.read_bytes()[:4] == b"\x89PNG"
        out = capsys.readouterr().out
        assert "model noop (16 dims)" in out and "errors      none" in out
    assert main(["bench", "--rate", "-5"]) == 2
    assert "--rate must be > 0" in capsys.readouterr().err


def test_plot_without_matplotlib_is_an_invalid_option(tmp_path: Path, capsys,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Refused before any load is sent, with the documented status for invalid options.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["bench", "--target", "127.0.0.1:1", "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot needs matplotlib: pip install 'embedrpc[bench]'" in capsys.readouterr().err

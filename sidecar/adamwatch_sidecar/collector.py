"""Render the run state as Prometheus metrics, from the metric table only.

A custom collector re-exports state the sidecar received, at scrape time::

    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> from adamwatch_sidecar.run_state import RunState
    >>> registry = CollectorRegistry()
    >>> collector = RunStateCollector(RunState())
    >>> registry.register(collector)
    >>> b"# TYPE adamwatch_loss gauge" in generate_latest(registry)
    True

:meth:`RunStateCollector.collect` yields fresh prometheus_client metric families
(names, types, help and label names straight from ``METRICS``).
:meth:`RunStateCollector.render_text` writes the same families in the text
exposition format directly from the snapshot; /metrics uses it because
``generate_latest`` escapes every label of every sample again on every scrape,
which costs more than our 25 ms budget at 64 ranks. The tests check that both
paths parse back to identical families.
"""

from __future__ import annotations

import gc
import logging
import math
from typing import Any, Iterator, NamedTuple

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

# render_text writes the 0.0.4 text format, which every Prometheus version reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

from .metric_table import METRICS, MetricSpec
from .run_state import HISTOGRAM_LE, Part, RunState, Snapshot

__all__ = ["RunStateCollector", "CONTENT_TYPE", "format_value"]

log = logging.getLogger(__name__)


def format_value(value: Any) -> str:
    """A sample value as the text format writes it (NaN, +Inf, -Inf, floats)."""
    v = float(value)
    if v != v:
        return "NaN"
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    return repr(v)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _unit(spec: MetricSpec) -> str:
    # prometheus_client appends a unit the name does not end with; the table's
    # names are final, so only pass units that are already the suffix.
    return spec.unit if spec.unit and spec.family_name.endswith("_" + spec.unit) else ""


class RunStateCollector:
    """A prometheus_client collector over a :class:`RunState`.

    Args:
        state: the run state to render at every scrape.
    """

    # label-set text cache: a trainer's label values are the same from one
    # scrape to the next, so each is escaped once. Bounded: cleared when large.
    _CACHE_LIMIT = 200_000

    def __init__(self, state: RunState):
        self.state = state
        self._label_text: dict[tuple[str, tuple[str, ...]], str] = {}
        self._headers: dict[str, bytes] = {}
        self._known: dict[Any, tuple] = {}  # RunState.snapshot_by_trainer's record of each trainer
        self._histograms = frozenset(i for i, spec in enumerate(METRICS) if spec.type == "histogram")
        # render_incremental: trainer key -> its (steps, deep, rest) parts as written
        self._by_trainer: dict[Any, tuple[_Segment, ...]] = {}

    # ------------------------------------------------------------------ prometheus_client
    def describe(self) -> Iterator[Metric]:
        """Empty families, one per table entry (lets a registry check for clashes)."""
        for spec in METRICS:
            yield _family(spec)

    def collect(self) -> Iterator[Metric]:
        """Fresh metric families built from one snapshot of the run state."""
        for spec, samples in self.state.snapshot():
            family = _family(spec)
            if spec.type == "histogram":
                for labels, (cumulative, total, _count) in samples:
                    family.add_metric(list(labels), list(zip(HISTOGRAM_LE, cumulative)), total)
            elif spec.type == "info":
                base = len(spec.labels) - len(_info_keys(spec))
                for labels, _value in samples:
                    family.add_metric(list(labels[:base]), dict(zip(_info_keys(spec), labels[base:])))
            elif spec.type == "summary":
                # quantile-only summary (no _sum/_count): the quantiles of a sample
                # of coordinates, not of observations we could count
                for labels, value in samples:
                    family.add_sample(spec.name, dict(zip(spec.labels, labels)), float(value))
            else:
                for labels, value in samples:
                    family.add_metric(list(labels), float(value))
            yield family

    # ------------------------------------------------------------------ fast text
    def render_text(self, snapshot: Snapshot | None = None) -> bytes:
        """The text exposition format (version 0.0.4) of the current run state.

        Args:
            snapshot: a snapshot to render; a fresh one when None.

        Returns:
            UTF-8 bytes to serve with ``CONTENT_TYPE``.
        """
        if snapshot is None:
            # /metrics: reuse the bytes of trainers and families that did not change
            return self.render_incremental()
        try:
            return self._render(snapshot)
        except Exception:
            # Some trainer's values cannot be written (a bug, or text that is
            # not UTF-8): find those trainers, leave their series out, count them.
            bad = _unrenderable(snapshot)
            self.state.count_render_errors(max(1, len({k for k in bad if k is not None})))
            log.warning("/metrics: left out the series of %d trainer(s) that could not be rendered: %.200s",
                        len(bad), sorted(map(str, bad)))
            return self._render([(spec, [s for s in samples if _trainer_of(spec, s[0]) not in bad
                                         and _renders(spec, s)]) for spec, samples in snapshot])

    def _render(self, snapshot: Snapshot) -> bytes:
        cache = self._label_text
        if len(cache) > self._CACHE_LIMIT:
            cache.clear()
        parts: list[str] = []
        for spec, samples in snapshot:
            parts.append(_header(spec))
            self._body(spec, samples, parts)
        return "".join(parts).encode("utf-8")

    def _body(self, spec: MetricSpec, samples: list, parts: list[str]) -> None:
        """Append the sample lines of one family (no HELP/TYPE) to ``parts``."""
        cache = self._label_text
        append = parts.append
        names = spec.labels
        if spec.type == "histogram":
            bucket_names = names + ("le",)
            for labels, (cumulative, total, count) in samples:
                for le, n in zip(HISTOGRAM_LE, cumulative):
                    key_le = (spec.name, labels + (le,))
                    text = cache.get(key_le)
                    if text is None:
                        text = cache[key_le] = _label_set(bucket_names, labels + (le,))
                    append(f"{spec.name}_bucket{text} {float(n)!r}\n")
                text = _cached(cache, spec.name, names, labels)
                append(f"{spec.name}_count{text} {float(count)!r}\n")
                append(f"{spec.name}_sum{text} {format_value(total)}\n")
            return
        name = spec.name
        get = cache.get
        for labels, value in samples:
            text = get((name, labels))
            if text is None:
                text = cache[(name, labels)] = _label_set(names, labels)
            # fast path: a finite float is written as repr (format_value's answer)
            if type(value) is float and value - value == 0.0:
                append(f"{name}{text} {value!r}\n")
            else:
                append(f"{name}{text} {format_value(value)}\n")

    # ------------------------------------------------------------------ incremental text
    def render_incremental(self) -> bytes:
        """The same exposition as :meth:`render_text`, re-rendering only what changed.

        The run state is copied one trainer at a time under its lock (see
        :meth:`RunState.snapshot_by_trainer`), only for trainers that changed
        since the last scrape, and without their Adam-state statistics unless a
        new deep block came; all formatting happens outside the lock, so ingest
        keeps applying steps during a scrape. A trainer's lines are written in
        its three parts (what STEPs move, the Adam-state statistics, the rest;
        see :meth:`_write_segment`) and kept as bytes with the values they were
        written from, so a scrape formats only the parts whose values moved. A
        trainer whose lines cannot be written is left out and counted in
        ``adamwatch_sidecar_render_errors_total``.
        """
        # The copy allocates ~100 objects per trainer; a full collection of the
        # sidecar's heap in the middle would cost more than the render itself.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._render_incremental()
        except BaseException:
            # The run state's record of what this collector holds (``_known``) may
            # be ahead of the bytes it holds: start over rather than serve stale lines.
            self._known, self._by_trainer = {}, {}
            raise
        finally:
            if collecting:
                gc.enable()

    def _render_incremental(self) -> bytes:
        known = self._known
        specs, trainers, globs = self.state.snapshot_by_trainer(known)
        cache = self._label_text
        if len(cache) > self._CACHE_LIMIT:
            cache.clear()
        old = self._by_trainer
        new: dict[Any, tuple[_Segment, ...]] = {}
        per_family: list[list[bytes]] = [[] for _ in specs]
        bad: list = []
        for key, parts in trainers:
            before = old.get(key)
            if parts is None:  # unchanged since the last scrape: its bytes as they were
                if before is None:
                    # Cannot happen (a failed render resets both records); if it
                    # did, the trainer is left out and counted, and copied whole next time.
                    bad.append(key)
                    known.pop(key, None)
                    continue
                written = before
            else:
                steps, deep, rest = parts
                was_steps, was_deep, was_rest = before if before is not None else (None, None, None)
                try:
                    written = (self._write_segment(specs, steps, was_steps), self._write_segment(specs, deep, was_deep),
                               self._write_segment(specs, rest, was_rest))
                except Exception:
                    bad.append(key)
                    known.pop(key, None)
                    continue
            new[key] = written
            for segment in written:
                for (i, _), chunk in zip(segment.layout, segment.chunks):
                    per_family[i].append(chunk)
        self._by_trainer = new  # only this scrape's trainers: bounded by the state
        if len(known) > len(new):
            for key in [k for k in known if k not in new]:
                del known[key]  # expired or failed
        out: list[bytes] = []
        headers = self._headers
        for spec, chunks, glob in zip(specs, per_family, globs):
            header = headers.get(spec.name)
            if header is None:
                header = headers[spec.name] = _header(spec).encode("utf-8")
            out.append(header)
            out.extend(chunks)
            if glob:
                for sample in glob:
                    try:
                        lines: list[str] = []
                        self._body(spec, [sample], lines)
                        out.append("".join(lines).encode("utf-8"))
                    except Exception:
                        bad.append(None)
        if bad:
            self.state.count_render_errors(len(bad))
            log.warning("/metrics: left out the series of %d trainer(s) that could not be rendered: %.200s",
                        len(bad), sorted(map(str, bad)))
        return b"".join(out)

    def _write_segment(self, specs: list[MetricSpec], part: Part | None, before: _Segment | None) -> _Segment:
        """The lines of one part of a trainer's series, as bytes per family, with what the next scrape reuses.

        ``part`` None: unchanged since the last scrape (``before`` stands). The
        values are written by one ``%`` over a template of the part's label sets
        (``name{labels} %r`` per line, families separated by a NUL), kept while
        the label sets stay the same: a step changes values, rarely labels, so
        formatting the floats is then nearly the only work. Values equal to the
        last scrape's reuse its bytes. A value that is not a finite number (NaN,
        an infinity, a bug), or a label holding a NUL, takes the line-by-line
        writer, which spells it as the text format does or raises.
        """
        if part is None:
            if before is None:
                raise AssertionError("a part reported unchanged has no earlier lines")
            return before
        layout, labels, values = part
        if not layout:
            return _EMPTY
        template = None
        if before is not None and before.layout == layout and before.labels == labels:
            if before.values == values:
                return before
            template = before.template
        numbers = self._numbers(layout, values)
        if numbers is not None:
            if template is None:
                template = self._template(specs, layout, labels)
            if template is not None:
                chunks = (template % numbers).encode("utf-8").split(b"\0")
                return _Segment(layout, labels, values, template, chunks)
        chunks = []
        start = 0
        for i, end in layout:
            lines: list[str] = []
            self._body(specs[i], list(zip(labels[start:end], values[start:end])), lines)
            chunks.append("".join(lines).encode("utf-8"))
            start = end
        return _Segment(layout, labels, values, None, chunks)

    def _numbers(self, layout: list[tuple[int, int]], values: list) -> tuple[float, ...] | None:
        """Every value of a part in line order as floats; None unless all are finite numbers."""
        spans = None  # where the histograms' (cumulative counts, sum, count) are
        start = 0
        for i, end in layout:
            if i in self._histograms:
                spans = spans or []
                spans.append((start, end))
            start = end
        try:
            flat = values
            if spans:
                flat = list(values)
                for start, end in reversed(spans):  # its lines: buckets, count, sum
                    flat[start:end] = [x for cumulative, total, count in values[start:end]
                                       for x in (*cumulative, count, total)]
            numbers = tuple(map(float, flat))
        except (TypeError, ValueError):
            return None
        total = sum(numbers)
        return numbers if total - total == 0.0 else None  # a NaN or infinity (or an overflowing sum)

    def _template(self, specs: list[MetricSpec], layout: list[tuple[int, int]], labels: list) -> str | None:
        """``_body``'s lines for these label sets with ``%r`` for each value, families NUL-separated.

        None when a label value holds a NUL (the separator).
        """
        cache = self._label_text
        families: list[str] = []
        start = 0
        for i, end in layout:
            spec = specs[i]
            name, names = spec.name, spec.labels
            lines: list[str] = []
            for values in labels[start:end]:
                # label text goes into the template: its own % signs are escaped
                text = _cached(cache, name, names, values).replace("%", "%%")
                if spec.type == "histogram":
                    for le in HISTOGRAM_LE:
                        bucket = _cached(cache, name, names + ("le",), values + (le,)).replace("%", "%%")
                        lines.append(f"{name}_bucket{bucket} %r\n")
                    lines.append(f"{name}_count{text} %r\n")
                    lines.append(f"{name}_sum{text} %r\n")
                else:
                    lines.append(f"{name}{text} %r\n")
            families.append("".join(lines))
            start = end
        if any("\0" in f for f in families):
            return None
        return "\0".join(families)


class _Segment(NamedTuple):
    """One part of a trainer's series as the last scrape wrote it."""

    layout: list  # [(family index, end), ...] as in run_state.Part
    labels: list  # the label sets, aligned with values
    values: list  # as the run state gave them: equal next time means these bytes stand
    template: str | None  # the lines with %r for each value, families separated by NUL
    chunks: list  # the lines of each family in ``layout``, as bytes


_EMPTY = _Segment([], [], [], None, [])


def _header(spec: MetricSpec) -> str:
    # 0.0.4 text: HELP/TYPE use the exposed name; info is written as a gauge.
    kind = "gauge" if spec.type == "info" else spec.type
    return f"# HELP {spec.name} {_escape_help(spec.help)}\n# TYPE {spec.name} {kind}\n"


def _trainer_of(spec: MetricSpec, labels: tuple[str, ...]) -> tuple[str, str] | None:
    return (labels[0], labels[1]) if spec.labels[:2] == ("job", "rank") and len(labels) >= 2 else None


def _renders(spec: MetricSpec, sample: tuple[tuple[str, ...], Any]) -> bool:
    """Whether one sample can be written (the slow check, only after a failed render)."""
    labels, value = sample
    try:
        names = spec.labels + (("le",) if spec.type == "histogram" else ())
        _label_set(names, tuple(labels)).encode("utf-8")
        if spec.type == "histogram":
            cumulative, total, count = value
            [float(n) for n in cumulative], format_value(total), float(count)
        else:
            format_value(value)
        return True
    except Exception:
        return False


def _unrenderable(snapshot: Snapshot) -> set:
    """Trainers (job, rank) with a sample that cannot be written; None for a failing sidecar-wide sample."""
    bad: set = set()
    for spec, samples in snapshot:
        for sample in samples:
            if not _renders(spec, sample):
                bad.add(_trainer_of(spec, sample[0]))
    return bad


def _cached(cache: dict, name: str, names: tuple[str, ...], labels: tuple[str, ...]) -> str:
    text = cache.get((name, labels))
    if text is None:
        text = cache[(name, labels)] = _label_set(names, labels)
    return text


def _label_set(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values)) + "}"


def _info_keys(spec: MetricSpec) -> tuple[str, ...]:
    # The info metric's own labels are everything after job and rank.
    return spec.labels[2:]


def _family(spec: MetricSpec) -> Metric:
    unit = _unit(spec)
    if spec.type == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels), unit=unit)
    if spec.type == "counter":
        return CounterMetricFamily(spec.family_name, spec.help, labels=list(spec.labels), unit=unit)
    if spec.type == "histogram":
        return HistogramMetricFamily(spec.name, spec.help, labels=list(spec.labels), unit=unit)
    if spec.type == "info":
        return InfoMetricFamily(spec.family_name, spec.help, labels=list(spec.labels[:2]))
    if spec.type == "summary":
        return Metric(spec.name, spec.help, "summary", unit=unit)
    raise AssertionError(f"{spec.name}: unknown metric type {spec.type!r}")

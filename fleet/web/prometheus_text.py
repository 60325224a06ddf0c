"""The Prometheus text exposition format (version 0.0.4), written directly: a metric family held as the lines it
becomes, byte for byte what prometheus_client's ``generate_latest`` writes of the same family, without its
per-sample objects and checks (about 5 µs a sample to build; a fleet of 1,000 devices exports some 8,000).

:mod:`edgeml.fleet.web.metrics` builds the fleet's families with :func:`gauge` and :func:`counter`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["Family", "counter", "escape", "gauge"]


class Family:
    """A metric family, held as the text format writes it (prometheus_client's families cost ~5 µs a sample to
    build, and a fleet of 1,000 devices exports some 8,000 samples); :meth:`to_client` gives prometheus_client's."""

    __slots__ = ("documentation", "labels", "name", "samples", "type")

    def __init__(self, kind: str, name: str, documentation: str, value: float | None = None,
                 labels: Iterable[str] | None = None) -> None:
        self.type, self.name, self.documentation = kind, name, documentation
        self.labels = list(labels or ())
        self.samples: list[tuple[tuple[str, ...], float]] = [] if value is None else [((), float(value))]

    def add_metric(self, labels: Iterable[str], value: float) -> None:
        """One sample: its label values, in the order of the family's label names."""
        self.samples.append((tuple(labels), float(value)))

    def write(self, out: list[str]) -> None:
        """Append the family's lines, as ``generate_latest`` writes them (labels sorted by name, values escaped)."""
        name = self.name + "_total" if self.type == "counter" else self.name
        text = self.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {text}\n# TYPE {name} {self.type}\n")
        if not self.labels:
            out.extend(f"{name} {_go(value)}\n" for _, value in self.samples)
            return
        order = sorted(range(len(self.labels)), key=self.labels.__getitem__)
        line = name + "{" + ",".join(f'{self.labels[i]}="%s"' for i in order) + "} %s\n"  # names hold no '%'
        # one scan of every label value for a character to escape: fleets' ids and versions almost never have one
        plain = not any(c in "".join(v for values, _ in self.samples for v in values) for c in '\\"\n')
        same_order = order == list(range(len(order)))
        for values, value in self.samples:
            if not plain:
                values = tuple(escape(v) for v in values)
            if not same_order:
                values = tuple(values[i] for i in order)
            number = repr(value)
            if number[-1] in "fn" or (value > 0 and number.find(".") > 6):  # inf, nan, or Go's exponent form
                number = _go(value)
            out.append(line % (*values, number))

    def to_client(self) -> Any:
        """The same family as prometheus_client's (for a ``CollectorRegistry``)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        kind = CounterMetricFamily if self.type == "counter" else GaugeMetricFamily
        family = kind(self.name, self.documentation, labels=self.labels)
        for values, value in self.samples:
            family.add_metric(list(values), value)
        return family


def gauge(name: str, documentation: str, value: float | None = None, labels: Iterable[str] | None = None) -> Family:
    return Family("gauge", name, documentation, value, labels)


def counter(name: str, documentation: str, value: float | None = None, labels: Iterable[str] | None = None) -> Family:
    return Family("counter", name, documentation, value, labels)


def _go(value: float) -> str:
    """A sample value as Go (and so ``generate_latest``) writes it."""
    from prometheus_client.utils import floatToGoString

    return str(floatToGoString(value))


def escape(value: str) -> str:
    """A label value as the text format writes it (backslash, double quote and newline escaped)."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value

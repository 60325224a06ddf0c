"""A real agent process for the crash tests: a model host serving live traffic, a real TufClient over HTTP,
and the update machine. Run as ``python -m tests.edge_agent.update_driver ...``.

It prints one JSON line per persisted transition. With ``--kill-at STATE`` it prints ``{"at": STATE}``
right after the record is persisted in STATE and then waits to be killed (the test sends SIGKILL); with
``--kill-mid-download`` it does the same after the first chunks of the bundle arrived. On finishing it
prints ``{"result": {...}}``: the record's outcome, what serves, and the traffic it served.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tuf.ngclient import Urllib3Fetcher

from edgeml.edge_agent.serving import ModelHost
from edgeml.edge_agent.tuf_client import TufClient
from edgeml.edge_agent.update.health import Thresholds
from edgeml.edge_agent.update.machine import UpdateMachine
from edgeml.edge_agent.update.states import State
from edgeml.edge_agent.update.store import UpdateRecord, UpdateRequest


def say(**data: Any) -> None:
    print(json.dumps(data), flush=True)


def wait_for_kill(at: str) -> None:
    say(at=at)
    threading.Event().wait()


class HangingFetcher(Urllib3Fetcher):
    """HTTP, but a bundle download stops for good after its second chunk."""

    def _fetch(self, url: str) -> Iterator[bytes]:
        for i, chunk in enumerate(super()._fetch(url)):
            if "/targets/" in url and i == 2:
                wait_for_kill("mid-download")
            yield chunk


class Traffic:
    """Requests on the host in a background thread, counted per version by an observer."""

    def __init__(self, host: ModelHost, inputs: np.ndarray) -> None:
        self.host, self.inputs = host, inputs
        self.served: dict[str, int] = {}
        self.errors = 0
        self.stopped = threading.Event()
        host.observers.append(self.observe)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def observe(self, version: str, inputs: Mapping[str, np.ndarray], outputs: Any, latency_s: float,
                ok: bool) -> None:
        self.served[version] = self.served.get(version, 0) + 1

    def run(self) -> None:
        i = 0
        while not self.stopped.is_set():
            if self.host.active is None:
                time.sleep(0.005)
                continue
            try:
                self.host.predict({"input": self.inputs[i % len(self.inputs)][None]})
            except Exception:
                self.errors += 1
            i += 1
            time.sleep(0.002)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--traffic", type=Path, required=True)
    p.add_argument("--version")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at")
    p.add_argument("--kill-mid-download", action="store_true")
    p.add_argument("--thresholds", default="{}")
    p.add_argument("--delta-from", help="the update is offered a delta from this version")
    args = p.parse_args(argv)

    host = ModelHost()
    traffic = Traffic(host, np.load(args.traffic))
    fetcher = HangingFetcher(chunk_size=256 if args.delta_from else 4096) if args.kill_mid_download else None
    client = TufClient(args.root.read_bytes(), args.state_dir / "metadata", args.state_dir / "downloads",
                       f"{args.registry}/metadata/", f"{args.registry}/targets/", fetcher=fetcher)

    def on_transition(record: UpdateRecord, frm: State | None, event: str, to: State) -> None:
        say(state=to.value, event=event)
        if args.kill_at == to.value:
            wait_for_kill(to.value)

    machine = UpdateMachine(args.state_dir, host, client.fetch, on_transition=on_transition, poll_s=0.02,
                            fetch_delta=client.fetch_delta)
    machine.boot()
    traffic.thread.start()
    if args.resume:
        record = machine.resume()
    else:
        record = machine.start(UpdateRequest("digits", args.version, "onnx", rollout="r1",
                                             thresholds=Thresholds.from_dict(json.loads(args.thresholds)),
                                             delta_from=args.delta_from))
    traffic.stopped.set()
    traffic.thread.join()
    pointer = machine.slots.active()
    active = host.active
    say(result={"state": record and record.state, "version": record and record.version,
                "reason": record and record.reason, "chain": record and record.chain(),
                "crashes": record and record.crashes, "history": record and record.history,
                "transfer": record and record.transfer,
                "serving": active and active.version, "pointer": pointer and pointer.version,
                "served": traffic.served, "errors": traffic.errors})
    host.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

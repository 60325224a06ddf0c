"""The on-device agent: runtimes, updates, telemetry and drift (``edgeml agent``).

Where things are::

    agent.py           the daemon: wires everything below to MQTT and the local API
    config.py          agent.toml + the bootstrap file from enrollment
    capabilities.py    what this device can run (reported to the fleet, checked before an update)
    serving.py         ModelHost: the active model (and the previous one during probation), atomic swaps
    api.py             local HTTP / Unix-socket inference API
    preprocess.py      the manifest's preprocessing, in numpy
    update/            the update lifecycle: states.py (the whole transition table), steps.py, machine.py,
                       store.py (the persisted record), slots.py (A/B), health.py (probation checks)
    mqtt_fetcher.py    TUF downloads over MQTT (request/response, resumable); mqtt_broadcast.py: a rollout's
                       broadcast received, the gaps filled by get requests
    tuf_client.py      python-tuf ngclient wrapper: verified bundles, attacks named
    telemetry.py       per-request aggregates and the sender; outbox.py: the durable SQLite outbox
    telemetry_loop.py  telemetry, drift and capture of one agent
    drift.py           streaming drift tests against the bundle's reference statistics; capture.py
    host.py            clock synchronisation, systemd notifications
    runtimes/          onnxruntime, LiteRT, TensorRT behind one load/infer/unload contract

Nothing here imports ``edgeml.fleet``, ``edgeml.train`` or ``edgeml.compile``: a device installs only
``edgeml[agent]`` plus its runtime extra.
"""

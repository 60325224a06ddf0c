"""The fleet server: signed registry, distribution, devices, rollouts, telemetry store, audit, dashboard.

Where things are (each subpackage's docstring maps its modules)::

    registry/      the signed TUF registry, its keys, and distribution of its files over MQTT
    devices/       enrollment, the broker that enforces device identities, the roster consumers check
    rollouts/      staged rollouts: lifecycle table, pure rules, store, controller
    telemetry/     ingestion from MQTT into the database, and the telemetry store
    audit/         the signed audit log
    capture/       captured samples: uploads received and stored, pulled as datasets, labeled, retrained on
    store/         the database: typed tables, migrations
    web/           the HTTP listener: API, dashboard, tokens, Prometheus metrics
    sim/           the fleet simulator, for tests and benchmarks
    server.py      `edgeml fleet serve`: the roles above in one process or several
    operator_api.py what the operator's CLI does, here or on a remote fleet server
    cli.py, cli_rollouts.py, cli_capture.py, cli_options.py   `edgeml fleet ...`
    grafana/       a Grafana dashboard over /metrics

Contracts that both devices and the fleet read (the wire protocol, bundles, capabilities, thresholds) live
in the core, ``edgeml/``; nothing here is imported by a device.
"""

"""The fleet server: signed registry, distribution, devices, rollouts, telemetry store, audit.

Where things are::

    registry.py, tuf_repo.py (pure TUF rules), keys.py    the signed registry
    db.py                                                 SQLAlchemy schema and its migrations
    broker.py, devices.py, embedded_broker.py             Mosquitto config, enrollment, the demo broker
    distribution.py, http_server.py                       files to devices over MQTT and HTTP
    rollout_rules.py (pure), rollouts.py                  staged rollouts and their controller
    ingest.py, telemetry_store.py                         telemetry from MQTT into the database
    audit.py, auth.py                                     the signed audit log, operator tokens
    simulate.py, mqtt_pool.py                             many simulated devices for tests and benchmarks
    cli.py                                                `edgeml fleet ...`
"""

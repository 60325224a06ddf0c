"""Telemetry from the devices into the database, and reading it back.

    admission.py   IngestSettings and check_message: what is admitted before anything is queued
    ingest.py      IngestWorker: telemetry and state from MQTT, checked, batched, stored, acknowledged
    store.py       TelemetryStore: inserts, contiguous highs, device states, the queries of the API
"""

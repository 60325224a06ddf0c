"""Telemetry from the devices into the database, and reading it back at fleet scale.

    admission.py    IngestSettings and check_message: what is admitted before anything is queued
    ingest.py       IngestWorker: telemetry and state from MQTT, checked, batched, stored, acknowledged
    store.py        TelemetryStore: one transaction per batch (rows, books, totals, minute rollups), device
                    states, contiguous highs, the queries of the API
    figures.py      the rules with no I/O: a window's numbers, rollup buckets, what a batch stores (plan_batch)
    writers.py      the ingest transaction's statements for SQLite and for PostgreSQL (psycopg 3)
    rollups.py      reading the minute and hour rollups of a window; rolling a closed hour up
    maintenance.py  Maintenance: hour rollups, retention and PostgreSQL partitions, one process at a time
    backfill.py     schema version 6 from an older telemetry table: its books and rollups
"""

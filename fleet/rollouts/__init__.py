"""Staged rollouts: the lifecycle as data, the pure rules, the store and the controller that runs them.

    states.py      the lifecycle: rollout, device-row and revert states, their transition table, has_work
    options.py     RolloutOptions, validated once at the boundary (CLI, HTTP API, the stored JSON)
    rules.py       planning and the per-tick decision (pure: no I/O, no clock)
    signals.py     model signals from the telemetry store (p99 ratio, error rate, drift)
    store.py       the rollouts and rollout_devices tables: start, status, pause/resume/abort, HTTP routes
    intake.py      DeviceIntake: the devices' states and update events, checked, bounded, recorded
    controller.py  RolloutController: each tick, the intake, then decide, record, then send commands
"""

"""The on-device agent: runtimes, updates, telemetry and drift (``edgeml agent``).

Nothing here imports ``edgeml.fleet``, ``edgeml.train`` or ``edgeml.compile``: a device installs only
``edgeml[agent]`` plus its runtime extra.
"""

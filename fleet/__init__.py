"""The fleet server: signed registry, distribution, devices, rollouts, telemetry store, dashboard."""

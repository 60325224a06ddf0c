"""The update lifecycle: states and transitions, steps, the persisted store, A/B slots."""

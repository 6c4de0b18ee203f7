"""Weight transport from the trainer's parallel layout to the rollout engines (see docs/weight-sync.md).

Reading order: `buckets` (plans and byte layout), `group` (the process group, timeouts, liveness),
`transfer` (one member's double-buffered push), `endpoint` / `receiver` (the members in Ray actors),
`engine` (the driver: setup, push, teardown, metrics, verification). Nothing is imported here, so a
process that only moves bytes does not pay for Ray.
"""

"""Cost estimates of attribution jobs before they run (`POST /v1/queries?dry_run=true`).

`plan` lists a job's phases (rows × passes) per method, `model` turns them into seconds and
peak memory with the fitted `coefficients.json` (refit with `python -m benchmarks.cost_fit`),
`artifacts` finds which cached parts already exist.
"""

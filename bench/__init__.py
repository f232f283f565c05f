"""Conveyor's benchmarks (issue 6): measurement only, never assertions.

Run from the repository root, e.g. `python -m bench.drain`, `python -m bench.all`.
See bench/RESULTS.md for the definitions, the commands and the last measured table.
"""

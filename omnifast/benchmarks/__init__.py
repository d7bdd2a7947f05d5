"""Benchmarks of every op family against the reference ops (installed as ``omnifast.benchmarks``)."""

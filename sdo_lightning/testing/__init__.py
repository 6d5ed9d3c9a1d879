"""Tiny pipelines built in code (no downloads, CPU, seconds) for tests and benchmarks, as
Lightning ships its boring models. Not imported by the library.
"""

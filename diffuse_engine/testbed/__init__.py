"""Benchmarks and conformance checks on the exact Gaussian-mixture test bed, and the
pytest plugin for plugin authors. A service: takes what it measures as arguments.
"""

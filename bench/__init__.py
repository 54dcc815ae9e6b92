"""Benchmarks of the service against the recipe script (`bench/run.sh [--small]`, see bench/README.md)."""

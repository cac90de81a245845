"""Callbacks that make training frameworks' loops peers of a swarm: ``hf`` (transformers) and ``lightning``.

Each module imports its framework; the core package never imports them (extras ``hf``, ``lightning``).
"""

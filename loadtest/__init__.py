"""Load tests of a razor (and a stock) vLLM server: locust mixes, a side-by-side runner and a soak.

``python -m loadtest`` runs locust against razor then stock and prints one table (:mod:`loadtest.run`);
``python -m loadtest.soak`` runs ~100 concurrent streams with cancellations against razor and checks
every completed answer and the KV pools (:mod:`loadtest.soak`). See loadtest/README.md.
"""

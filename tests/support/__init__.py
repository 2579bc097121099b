"""Test support: a real Prometheus server, a fake scraped service, and a backfilled dataset.

Imported as ``support`` (pytest puts ``tests/`` on ``sys.path`` for the root conftest).
"""

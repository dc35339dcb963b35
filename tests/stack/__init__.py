"""Helpers for tests/test_stack.py: a real Prometheus, and the dashboards read the way Grafana reads them."""

"""Fault-injection, crash, bad-input and abuse tests (issue 7); see conftest.py."""

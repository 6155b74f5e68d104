"""Helpers for the spine tests: writer processes driven over stdin."""

"""Hostile tests reuse the live loopback server of the API tests."""

from __future__ import annotations

from tests.api.conftest import live  # noqa: F401

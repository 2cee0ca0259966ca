"""The framework adapters run against the SDK's live test world."""

from tests.sdk.conftest import client, world

__all__ = ["client", "world"]

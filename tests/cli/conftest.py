from tests.api.conftest import live  # noqa: F401 - the shared live-server fixture

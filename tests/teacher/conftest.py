import pytest

from asclepius.testing.server_process import openai_test_server


@pytest.fixture(scope="module")
def server():
    """A roomy server (no rate limiting in practice) for fault and shape tests."""
    with openai_test_server(rpm=100000, tpm=10_000_000, latency_s=0.01) as s:
        yield s

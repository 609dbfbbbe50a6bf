"""Tools for tests and benchmarks (not the product): a local OpenAI-compatible server with limits and faults."""

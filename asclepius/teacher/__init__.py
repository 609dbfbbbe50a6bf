"""The teacher: one OpenAI-compatible client with a cluster-wide rate limiter, an exactly-once request ledger,
cost control and a privacy guard. Every stage that calls an LLM goes through it."""

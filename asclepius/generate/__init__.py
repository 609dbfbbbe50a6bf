"""Synthetic data: case reports → synthetic discharge summaries; notes → questions for 8 tasks (bootstrapped from
seed questions and a growing pool); (note, question) → answers, filtered into the `instructions` table."""

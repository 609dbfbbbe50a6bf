"""Continued pretraining and instruction tuning: data (blocks, packing), DeepSpeed settings, the train loop,
and the Ray Train wiring."""

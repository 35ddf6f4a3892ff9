"""A synthetic multimodal world a CPU learns in minutes: its samples, captions, and the measures that judge them."""

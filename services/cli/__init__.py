"""The ``nextgpt`` command: the composition root, the one place that wires implementations together."""

"""``nextgpt bundle tiny``: the real architectures at tiny width with random weights, built offline."""

"""NExT-GPT's own training stages over a bundle's frozen parts: encoder-side alignment, decoder-side alignment,
modality-switching instruction tuning (``nextgpt train``)."""

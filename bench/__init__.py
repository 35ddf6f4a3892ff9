"""Benchmarks (`make bench`), each run as ``python -m bench.<name>``.

The model libraries' own lines that every serving command drops (``services.runtime.library_noise``) are dropped
here too, before any benchmark module imports those libraries (several do at their top: the lines came first)."""

from services.runtime.library_noise import quiet_model_libraries

quiet_model_libraries()

"""Shared contracts of nextgpt-serve: wire schemas, error types, the bundle manifest, client interfaces.

This package imports no other part of the project (and no torch), so every service and the gateway can
depend on it without pulling each other in.
"""

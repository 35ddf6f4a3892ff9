"""Decode-job bookkeeping shared by the workers (writers) and the gateway (readers): status, events, cancel.
Imports contracts only (no torch), so the gateway may use it."""

"""The public HTTP gateway. Imports the shared contracts and remote clients only, never torch or a service."""

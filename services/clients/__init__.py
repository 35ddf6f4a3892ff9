"""Remote clients of the services (HTTP). They import contracts only, never torch, so the gateway can use them."""

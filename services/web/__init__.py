"""HTTP plumbing shared by the gateway and the services: error handlers, body limits, metrics. No torch."""

"""One package per method; inside each, the pure algorithm apart from each framework adapter."""

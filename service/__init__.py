"""pgolf service: the evaluation engine (service.engine) and the HTTP API around it."""

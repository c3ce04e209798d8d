"""Ray Serve application: FastAPI ingress, batched model hosting, HTTP errors as {"error": ...}."""

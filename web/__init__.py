"""The web layer: what the HTTP API needs beyond its routes in app.py."""

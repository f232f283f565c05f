"""The `flask` commands: thin callers of the core, registered on the app by app.py."""

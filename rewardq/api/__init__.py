"""HTTP API (FastAPI), the CLI and the Python client."""

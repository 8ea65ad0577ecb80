"""The control plane: hutch's own API (`native.py`) and E2B's (`e2b.py`), in one FastAPI app."""

"""hutch: a self-hosted serverless runtime for AI-agent code sandboxes.

Kept import-free on purpose: the in-sandbox agent imports `hutch.agent` and must start in a few
milliseconds.
"""

__version__ = "0.1.0"

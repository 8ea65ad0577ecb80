"""The data plane: affinity-key extraction, route lookup, and the streaming proxy to instances."""

"""freshrec: connectors."""

"""freshrec: features."""

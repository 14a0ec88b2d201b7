"""freshrec: freshrec."""

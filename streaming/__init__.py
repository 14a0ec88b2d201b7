"""freshrec: streaming."""

"""freshrec: serving."""

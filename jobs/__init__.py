"""freshrec: jobs."""

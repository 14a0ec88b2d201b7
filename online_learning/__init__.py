"""freshrec: online_learning."""

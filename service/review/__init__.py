"""The review console: a web page and a JSON API on the node's HTTP port over the decision index."""

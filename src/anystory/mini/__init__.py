"""The mini world: AnyStory's whole setting in miniature, trainable on a CPU (DESIGN §3)."""

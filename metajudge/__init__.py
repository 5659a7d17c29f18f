"""Meta-Rewarding and Temporal Self-Rewarding: the method code (pure functions, no model code)."""

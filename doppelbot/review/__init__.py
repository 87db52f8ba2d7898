"""Review in Saved Messages: draft cards, the owner's answers and commands (pure core)."""

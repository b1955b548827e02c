"""Who may call what, and how much: API keys, limits and budgets."""

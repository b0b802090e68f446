"""Prompt templates (text files) and their renderer; the planner's templates live here."""

"""Model sources: where weights come from (`hf:`, `file:`, `pkg:`) and how they are loaded."""

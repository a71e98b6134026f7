"""cortex: one OpenAI-compatible endpoint in front of a fleet of model-serving machines."""

__version__ = "0.1.0"

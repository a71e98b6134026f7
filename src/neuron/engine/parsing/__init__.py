"""Model output -> answer text, reasoning and tool calls: each family's syntax, a streaming reader
of JSON calls, and an adapter for the response templates that tokenizers ship."""

"""llm-bench: one generate loop, many inference frameworks, numbers you can trust."""

__version__ = "0.1.0"

"""Self-hosted usage metering and usage analytics for API providers."""

__version__ = "0.1.0"

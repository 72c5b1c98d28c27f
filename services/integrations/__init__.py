"""Integrations with outside systems: signed webhooks fed from durable JetStream consumers."""

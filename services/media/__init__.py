"""Photos as evidence: uploaded once, kept in a JetStream Object Store, referenced by events."""

"""Residents' personal data: sealed per resident, keys outside the event stream, crypto-shredding."""

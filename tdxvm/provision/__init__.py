"""Attested channels to a TD: verify its quote, then trust only the keys the quote binds."""

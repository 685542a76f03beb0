"""The slice ledger: durable leases (SQLite) and the pure placement that chooses cards."""

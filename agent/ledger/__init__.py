"""The slice ledger: durable leases (SQLite), host resources included."""

"""The slice ledger: durable leases (SQLite) with host resources; placement lives in agent.placement."""
